"""Lower hard links of every type of file: removing, renaming, linking and changing one name
behave as on kernel overlayfs with index=on, for the other names too, also after a remount."""
from __future__ import annotations

import functools
import os
import socket
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mounts import kernel_overlay, pyunionfs
from trees import checksum

KINDS = ("symlink", "fifo", "socket", "device", "file")


def make_three_links(directory: Path, kind: str) -> None:
    first = directory / f"{kind}1"
    if kind == "symlink":
        first.symlink_to("target")
    elif kind == "fifo":
        os.mkfifo(first)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(first))
    elif kind == "device":
        os.mknod(first, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    else:
        first.write_text("data\n")
    for n in (2, 3):
        os.link(first, directory / f"{kind}{n}", follow_symlinks=False)


def _seen(path: Path) -> object:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror
    return stat.filemode(st.st_mode), st.st_nlink, st.st_uid, st.st_ino


def _attempt(action: Callable[[], object]) -> object:
    try:
        action()
        return "ok"
    except OSError as exc:
        return exc.strerror


def steps(d: Path, kind: str) -> list:
    """Each step, then what the other names show (their inode numbers must stay equal)."""
    names = {n: d / f"{kind}{n}" for n in range(1, 6)}
    out = [_attempt(lambda: os.unlink(names[1])), _seen(names[2])[:3]]
    out += [_attempt(lambda: os.chown(names[2], 7, 7, follow_symlinks=False)), _seen(names[3])[:3]]
    out += [_attempt(lambda: os.chmod(names[3], 0o640)), _seen(names[2])[:3]]  # a symlink: its target
    out += [_attempt(lambda: os.rename(names[3], names[4])), _seen(names[2])[:3], _seen(names[4])[:3]]
    out += [_attempt(lambda: os.link(names[2], names[5], follow_symlinks=False)), _seen(names[4])[:3]]
    out.append(len({_seen(names[n])[3] for n in (2, 4, 5)}))
    return out


def index_mounts(tmp_path: Path, mnt: Path) -> Iterator[tuple[str, Path, Callable]]:
    """(name, mountpoint, mount) for kernel overlayfs with index=on and for pyunionfs, each with an
    upper and a work directory of its own: mount(lowers, mountpoint) mounts it."""
    for name, mount, options, where in (("kernel", kernel_overlay, "index=on,redirect_dir=on", tmp_path / "kmnt"),
                                        ("pyunionfs", pyunionfs, None, mnt)):
        upper, work = tmp_path / f"{name}-upper", tmp_path / f"{name}-work"
        for path in (upper, work, where):
            path.mkdir(exist_ok=True)
        extra = {"options": options} if options else {}
        yield name, where, functools.partial(mount, upper=upper, workdir=work, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_lower_hard_links_as_kernel_index(kind, tmp_path, mnt):
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    make_three_links(lower / "d", kind)
    before = checksum(lower)
    results = {}
    for name, where, mount in index_mounts(tmp_path, mnt):
        with mount([lower], where):
            done = steps(where / "d", kind)
            listing = sorted((n, _seen(where / "d" / n)[:3]) for n in os.listdir(where / "d"))
        with mount([lower], where):
            after_remount = sorted((n, _seen(where / "d" / n)[:3]) for n in os.listdir(where / "d"))
            os.unlink(where / "d" / f"{kind}2")  # rm -rf of the directory: every name goes
            for n in os.listdir(where / "d"):
                os.unlink(where / "d" / n)
            os.rmdir(where / "d")
        results[name] = (done, listing, after_remount)
    assert results["pyunionfs"] == results["kernel"]
    assert results["kernel"][0][-1] == 1  # one object, one inode number
    assert checksum(lower) == before


def test_xattrs_set_through_one_lower_hard_link_show_through_the_others(tmp_path, mnt):
    """A name looked up after another name of its object was copied up shows the copy's xattrs
    (the index copy's), not the lower object's, which has none."""
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    make_three_links(lower / "d", "file")
    results = {}
    for name, where, mount in index_mounts(tmp_path, mnt):
        with mount([lower], where):
            os.setxattr(where / "d" / "file1", "user.note", b"set")
            results[name] = [os.getxattr(where / "d" / f"file{n}", "user.note") for n in (2, 3)]
    assert results["pyunionfs"] == results["kernel"] == [b"set", b"set"]
