"""FUSE passthrough (unionfs/fs/passthrough.py): files held open while others open, write, map,
truncate, rename and remove them, on kernel overlayfs and on pyunionfs with passthrough on and
off; all three must see the same. The kernel serves upper files itself (the daemon counts them
on SIGUSR1), a lower file only in a read-only union."""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from mounts import daemon_status, kernel_overlay, pyunionfs


def passthrough_nodes(daemon, stderr: Path) -> int:
    """How many nodes the kernel serves, as the daemon says on SIGUSR1."""
    return daemon_status(daemon, stderr, "passthrough")


def until_none_served(daemon, stderr: Path) -> None:
    """The kernel tells the daemon of a close asynchronously (RELEASE): wait for the last."""
    deadline = time.monotonic() + 10
    while passthrough_nodes(daemon, stderr):
        assert time.monotonic() < deadline, "passthrough backing files left after every file was closed"
        time.sleep(0.05)


def held_open(root: Path, served=lambda: 0) -> list:
    """Steps with files held open; what each shows. SERVED() counts passthrough nodes (for the
    mount it is given for), recorded where it must not be zero."""
    seen: list = []
    # A lower file read while another opener copies it up and writes: the reader sees the new
    # data (kernel overlayfs reopens its real file), a later open too.
    reader = os.open(root / "lower-file", os.O_RDONLY)
    seen.append(os.pread(reader, 64, 0))
    writer = os.open(root / "lower-file", os.O_RDWR)
    os.pwrite(writer, b"NEW", 0)
    seen += [os.pread(reader, 64, 0), os.pread(writer, 64, 0), (root / "lower-file").read_bytes()]
    os.close(reader)
    os.close(writer)
    # Now an upper file: reopened for reading, then for writing while that is open.
    reader = os.open(root / "lower-file", os.O_RDONLY)
    writer = os.open(root / "lower-file", os.O_RDWR | os.O_APPEND)
    os.write(writer, b"appended\n")
    seen += [os.pread(reader, 64, 0), os.fstat(reader).st_size]
    seen.append(("served while open", served() > 0))
    # A shared mapping written, seen by read(); truncation by path seen by both fds.
    with mmap.mmap(writer, 0) as mapped:
        mapped[0:3] = b"MAP"
        mapped.flush()
    seen.append(os.pread(reader, 64, 0))
    os.truncate(root / "lower-file", 5)
    seen += [os.pread(reader, 64, 0), os.fstat(writer).st_size]
    os.close(reader)
    os.close(writer)
    # A new file written, renamed over another while open, then removed while still open.
    created = os.open(root / "created", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(created, b"created\n")
    other = os.open(root / "created", os.O_RDONLY)
    os.rename(root / "created", root / "renamed")
    os.unlink(root / "renamed")
    os.pwrite(created, b"after unlink\n", 8)
    seen += [os.pread(other, 64, 0), os.fstat(created).st_nlink, sorted(os.listdir(root))]
    again = os.open(f"/proc/self/fd/{created}", os.O_RDONLY)  # the removed file, opened anew
    seen.append(os.pread(again, 64, 0))
    for fd in (created, other, again):
        os.close(fd)
    # A file created write-only (its backing file is the daemon's read-write fd of it), read and
    # mapped by another opener while the writer still writes.
    writer = os.open(root / "write-only", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(writer, b"first\n")
    reader = os.open(root / "write-only", os.O_RDONLY)
    os.write(writer, b"second\n")
    seen.append(os.pread(reader, 64, 0))
    with mmap.mmap(reader, 0, prot=mmap.PROT_READ) as mapped:
        seen.append(mapped[:])
    os.close(writer)
    os.close(reader)
    # Large writes and reads through a fresh upper file.
    block = os.urandom(1 << 20)
    with open(root / "large", "wb") as f:
        for _ in range(8):
            f.write(block)
    with open(root / "large", "rb") as f:
        seen.append(f.read() == block * 8)
    return seen


def make_lower(root: Path) -> Path:
    lower = root / "lower"
    lower.mkdir(parents=True)
    (lower / "lower-file").write_bytes(b"lower data\n")
    return lower


@pytest.mark.parametrize("passthrough", ["on", "off"])
def test_held_open_files_as_on_kernel_overlayfs(passthrough, tmp_path, mnt):
    lower = make_lower(tmp_path)
    dirs = {name: tmp_path / name for name in ("kmnt", "kupper", "kwork", "upper", "work")}
    for path in dirs.values():
        path.mkdir()
    with kernel_overlay([lower], dirs["kmnt"], "", dirs["kupper"], dirs["kwork"]):
        expected = held_open(dirs["kmnt"])
    stderr = tmp_path / "daemon.err"
    with open(stderr, "w") as err, \
            pyunionfs([lower], mnt, "-o", f"passthrough={passthrough}", upper=dirs["upper"],
                      workdir=dirs["work"], stderr=err) as daemon:
        got = held_open(mnt, lambda: passthrough_nodes(daemon, stderr))
        until_none_served(daemon, stderr)
    served = passthrough == "on"
    expected[expected.index(("served while open", False))] = ("served while open", served)
    assert got == expected
    assert (lower / "lower-file").read_bytes() == b"lower data\n"


def test_a_read_only_union_serves_lower_files_through_the_kernel(tmp_path, mnt):
    lower = make_lower(tmp_path)
    stderr = tmp_path / "daemon.err"
    with open(stderr, "w") as err, pyunionfs([lower], mnt, stderr=err) as daemon:
        with open(mnt / "lower-file", "rb") as f, open(mnt / "lower-file", "rb") as g:
            assert passthrough_nodes(daemon, stderr) == 1
            assert f.read() == g.read() == b"lower data\n"
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                assert mapped[:5] == b"lower"
        until_none_served(daemon, stderr)
