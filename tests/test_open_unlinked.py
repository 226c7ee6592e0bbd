"""Files that are open while their name goes away (unlink, or a rename over them): the open fd
keeps working as on kernel overlayfs, and once the last one is closed nothing of the file is
left in the upper. apt writes its downloaded lists through such a file."""
from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Callable

from mounts import kernel_overlay, pyunionfs
from trees import checksum, differences, snapshot


def _fstat(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_nlink, st.st_mode


def _attempt(action: Callable[[], object]) -> object:
    try:
        return action()
    except OSError as exc:
        return errno.errorcode[exc.errno]


def new_file(mnt: Path) -> list:
    fd = os.open(mnt / "new", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"abc")
        os.unlink(mnt / "new")
        os.write(fd, b"defgh" * 1000)
        seen = [_fstat(fd), len(os.pread(fd, 100_000, 0))]
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # opened anew through the fd, as `cat /dev/fd/3`
        try:
            seen += [_fstat(again), os.pread(again, 5, 3)]
        finally:
            os.close(again)
        os.fchmod(fd, 0o600)
        os.fchown(fd, 7, 8)
        os.setxattr(fd, "user.kept", b"1")
        os.ftruncate(fd, 10)
        os.fsync(fd)
        os.utime(fd, ns=(10**9, 2 * 10**9))
        st = os.fstat(fd)
        seen += [_fstat(fd), (st.st_uid, st.st_gid, st.st_mtime_ns), os.getxattr(fd, "user.kept")]
        with mmap.mmap(fd, 10) as mapped:
            mapped[0:3] = b"XYZ"
            mapped.flush()
        seen.append(os.pread(fd, 10, 0))
        return seen
    finally:
        os.close(fd)


def lower_file_written_then_unlinked(mnt: Path) -> list:
    fd = os.open(mnt / "lower-rw", os.O_RDWR)
    reader = os.open(mnt / "lower-rw", os.O_RDONLY)
    try:
        os.unlink(mnt / "lower-rw")
        os.write(fd, b"Z" * 50)
        return [_fstat(fd), os.pread(fd, 100, 0), _fstat(reader), os.pread(reader, 100, 0)]
    finally:
        os.close(fd)
        os.close(reader)


def lower_file_read_then_unlinked(mnt: Path) -> list:
    fd = os.open(mnt / "lower-ro", os.O_RDONLY)  # on pyunionfs, opened by the shim (csrc/fuse_shim.c)
    try:
        os.fsync(fd)
        os.unlink(mnt / "lower-ro")
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            seen = [_fstat(again), os.pread(again, 100, 0)]
        finally:
            os.close(again)
        # The lower file is never touched: the kernel's copy-up meets the whiteout (EEXIST).
        return seen + [_fstat(fd), os.pread(fd, 100, 0), _attempt(lambda: os.fchmod(fd, 0o600))]
    finally:
        os.close(fd)


def renamed_over(mnt: Path) -> list:
    (mnt / "a").write_text("aaaa")
    (mnt / "b").write_text("bb")
    fd = os.open(mnt / "b", os.O_RDWR)
    try:
        os.rename(mnt / "a", mnt / "b")
        os.write(fd, b"123456")
        return [_fstat(fd), os.pread(fd, 100, 0), (mnt / "b").read_text()]
    finally:
        os.close(fd)


def test_open_files_outlive_their_names_as_in_the_kernel(tmp_path, mnt):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "lower-rw").write_text("lower data\n")
    (lower / "lower-ro").write_text("read only\n")
    before = checksum(lower)
    results, uppers = {}, {}
    for name, mount in (("kernel", kernel_overlay), ("pyunionfs", pyunionfs)):
        upper, work, where = tmp_path / f"{name}-upper", tmp_path / f"{name}-work", tmp_path / f"{name}-mnt"
        for path in (upper, work, where):
            path.mkdir()
        with mount([lower], mnt if name == "pyunionfs" else where, upper=upper, workdir=work):
            at = mnt if name == "pyunionfs" else where
            results[name] = [step(at) for step in (new_file, lower_file_written_then_unlinked,
                                                   lower_file_read_then_unlinked, renamed_over)]
            results[name].append(sorted(os.listdir(at)))
        uppers[name] = snapshot(upper, times=False)
    assert results["pyunionfs"] == results["kernel"]
    assert results["kernel"][0][0] == (5003, 0, 0o100644)  # the data written after the unlink, nlink 0
    assert differences(uppers["kernel"], uppers["pyunionfs"]) == []  # nothing of them is left
    assert checksum(lower) == before
