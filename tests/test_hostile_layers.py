"""Nothing reaches past the layers: objects swapped for symlinks in the upper, symlinked work
and index directories, a second mount on the same upper, crafted redirects and metacopy files
without data. Each is checked against what kernel overlayfs does, and nothing outside the layers
may change."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from mounts import PYUNIONFS, force_unmount, kernel_overlay, pyunionfs, tmpfs
from trees import checksum


def _attempt(action: Callable[[], object]) -> str:
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "host")}
    for path in dirs.values():
        path.mkdir()
    (dirs["host"] / "secret").write_text("host data\n")
    os.chmod(dirs["host"] / "secret", 0o600)
    (dirs["host"] / "dir").mkdir()
    (dirs["host"] / "dir" / "kept").write_text("kept\n")
    return dirs


SWAP_STEPS = {
    "chmod": lambda p: os.chmod(p, 0o666),
    "chown": lambda p: os.chown(p, 7, 7),
    "truncate": lambda p: os.truncate(p, 0),
    "utime": lambda p: os.utime(p, ns=(10**9, 10**9)),
    "setxattr": lambda p: os.setxattr(p, "user.x", b"1"),
    "removexattr": lambda p: os.removexattr(p, "user.kept"),
    "open O_TRUNC": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
    "append": lambda p: (lambda fd: (os.write(fd, b"x"), os.close(fd)))(os.open(p, os.O_WRONLY | os.O_APPEND)),
    "getxattr": lambda p: os.getxattr(p, "user.kept"),
    "link": lambda p: os.link(p, p.with_name("linked")),
    "rename": lambda p: os.rename(p, p.with_name("renamed")),
    "unlink": lambda p: os.unlink(p),
}


@pytest.mark.parametrize("step", sorted(SWAP_STEPS))
def test_an_upper_file_swapped_for_a_symlink_leads_nowhere(step, layout, mnt):
    """Someone who can write the upper (another mount of it once, a user sharing it) replaces a
    file the union knows by a symlink to a host file: no change through the union reaches it."""
    os.setxattr(layout["host"] / "secret", "user.kept", b"host")
    before = checksum(layout["host"])
    with pyunionfs([layout["lower"]], mnt, upper=layout["upper"], workdir=layout["work"]):
        (mnt / "f").write_text("mine\n")
        os.setxattr(mnt / "f", "user.kept", b"mine")
        os.stat(mnt / "f")  # the kernel and the daemon know the object now
        (layout["upper"] / "f").unlink()
        (layout["upper"] / "f").symlink_to(layout["host"] / "secret")
        _attempt(lambda: SWAP_STEPS[step](mnt / "f"))
    assert checksum(layout["host"]) == before


def test_a_second_mount_of_an_upper_or_workdir_is_refused(layout, tmp_path, mnt):
    second, other_work, other_upper = tmp_path / "second", tmp_path / "other-work", tmp_path / "other-upper"
    for path in (second, other_work, other_upper):
        path.mkdir()
    with pyunionfs([layout["lower"]], mnt, upper=layout["upper"], workdir=layout["work"]):
        for upper, work, what in ((layout["upper"], other_work, "upper directory"),
                                  (other_upper, layout["work"], "workdir")):
            before = checksum(work)
            try:
                result = subprocess.run([PYUNIONFS, "mount", f"--lower={layout['lower']}", f"--upper={upper}",
                                         f"--workdir={work}", str(second)], capture_output=True, text=True)
            finally:
                force_unmount(second)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
            assert f"{what} is in use by another mount" in result.stderr
            assert checksum(work) == before
    with pyunionfs([layout["lower"]], mnt, upper=layout["upper"], workdir=layout["work"]):
        pass  # free again once unmounted


def test_a_symlinked_work_dir_is_replaced_and_its_target_left_alone(layout, mnt):
    (layout["work"] / "work").symlink_to(layout["host"] / "dir")
    before = checksum(layout["host"])
    with pyunionfs([layout["lower"]], mnt, upper=layout["upper"], workdir=layout["work"]):
        (mnt / "new").write_text("new\n")
    assert checksum(layout["host"]) == before
    assert (layout["work"] / "work").is_dir() and not (layout["work"] / "work").is_symlink()


def test_a_symlinked_index_dir_is_refused_as_in_the_kernel(layout, tmp_path, mnt):
    (layout["work"] / "index").symlink_to(layout["host"] / "dir")
    (layout["lower"] / "a").write_text("linked\n")
    os.link(layout["lower"] / "a", layout["lower"] / "b")
    before = checksum(layout["host"])
    kernel = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                             f"lowerdir={layout['lower']},upperdir={layout['upper']},workdir={layout['work']},index=on",
                             str(mnt)], capture_output=True, text=True)
    assert kernel.returncode != 0  # the kernel refuses it too (ENOTDIR)
    result = subprocess.run([PYUNIONFS, "mount", f"--lower={layout['lower']}", f"--upper={layout['upper']}",
                             f"--workdir={layout['work']}", str(mnt)], capture_output=True, text=True)
    assert result.returncode == 1 and "index: Not a directory" in result.stderr and result.stderr.count("\n") == 1
    assert checksum(layout["host"]) == before


REDIRECTS = {"absolute-escape": b"/../../../etc", "relative-escape": b"../../..", "dot-dot": b"..",
             "dot": b".", "empty-component": b"/a//b", "relative-path": b"x/y", "absolute-ok": b"/elsewhere"}


def test_crafted_redirects_fail_their_own_entry_as_in_the_kernel(tmp_path, mnt):
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (bottom / "p" / "plain").mkdir(parents=True)
    (bottom / "elsewhere").mkdir()
    (bottom / "elsewhere" / "found").write_text("found\n")
    for name, value in REDIRECTS.items():
        (top / "p" / name).mkdir(parents=True)
        os.setxattr(top / "p" / name, "trusted.overlay.redirect", value)
    (top / "p" / "plain").mkdir()
    seen = {}
    for system, mount, where in (("kernel", kernel_overlay, tmp_path / "kmnt"), ("pyunionfs", pyunionfs, mnt)):
        where.mkdir(exist_ok=True)
        extra = {"options": "redirect_dir=on"} if system == "kernel" else {}
        with mount([top, bottom], where, **extra):
            seen[system] = (sorted(os.listdir(where / "p")),
                            {name: _attempt(lambda: os.listdir(where / "p" / name)) for name in sorted(REDIRECTS)},
                            sorted(os.listdir(where / "p" / "absolute-ok")))
    assert seen["pyunionfs"] == seen["kernel"]
    assert seen["kernel"][0] == sorted([*REDIRECTS, "plain"]) and seen["kernel"][2] == ["found"]


def test_a_metacopy_file_without_its_data_gives_eio_as_in_the_kernel(tmp_path, mnt):
    lower, upper, work, kmnt = (tmp_path / name for name in ("lower", "upper", "work", "kmnt"))
    for path in (lower, upper, work, kmnt):
        path.mkdir()
    (lower / "f").write_bytes(os.urandom(100_000))
    with kernel_overlay([lower], kmnt, "metacopy=on,redirect_dir=on", upper, work):
        os.chmod(kmnt / "f", 0o600)  # a metadata-only copy-up
    assert os.getxattr(upper / "f", "trusted.overlay.metacopy") == b""
    (lower / "f").unlink()
    results = {}
    with kernel_overlay([lower], kmnt, "metacopy=on,redirect_dir=on", upper, work):
        results["kernel"] = _attempt(lambda: (kmnt / "f").read_bytes())
    with pyunionfs([lower], mnt, upper=upper, workdir=work):
        results["pyunionfs"] = _attempt(lambda: (mnt / "f").read_bytes())
    assert results == {"kernel": "EIO", "pyunionfs": "EIO"}


def test_enospc_during_copy_up_leaves_no_half_file(tmp_path, mnt):
    """A copy-up that runs out of space fails whole: the lower file is untouched, and neither the
    upper nor the work directory keeps a part of the copy."""
    lower, space = tmp_path / "lower", tmp_path / "space"
    lower.mkdir()
    (lower / "big").write_bytes(os.urandom(4 << 20))
    before = checksum(lower)
    with tmpfs(space):
        subprocess.run(["mount", "-o", "remount,size=2m", str(space)], check=True)
        (space / "upper").mkdir()
        (space / "work").mkdir()
        with pyunionfs([lower], mnt, upper=space / "upper", workdir=space / "work"):
            assert _attempt(lambda: (mnt / "big").open("ab").close()) == "ENOSPC"
            assert (mnt / "big").read_bytes()[:16] == (lower / "big").read_bytes()[:16]
        assert os.listdir(space / "upper") == [] and os.listdir(space / "work" / "work") == []
    assert checksum(lower) == before
