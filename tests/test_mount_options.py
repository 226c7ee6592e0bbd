"""fuse-overlayfs's mount options, as containers/storage and users pass them: each run the same way
on pyunionfs and on fuse-overlayfs (the reference for these options), with what a user sees
compared."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from mounts import PYUNIONFS, helper_mount, overlay_options
from trees import ACL_ACCESS, as_user, grant_to_nobody, reads_as_nobody
from unionfs.errors import ConfigError
from unionfs.fs.options import MountConfig, apply_option_string

FUSE_OVERLAYFS = "fuse-overlayfs"


def owners(root: Path) -> dict[str, tuple[int, int, int, int | None]]:
    """Owner, mode and link count of everything below ROOT (ROOT itself as "."). A merged
    directory's link count is 1 in pyunionfs, as in kernel overlayfs, and counted in
    fuse-overlayfs: left out."""
    result = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [".", *dirs, *files] if dirpath == str(root) else [*dirs, *files]:
            st = os.lstat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
            result[rel] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), nlink)
    return result


def make_lower(root: Path) -> Path:
    lower = root / "lower"
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "file").write_text("lower\n")
    (lower / "dir" / "inner").write_text("inner\n")
    os.chown(lower / "file", 1, 2)
    os.chown(lower / "dir", 3, 4)
    return lower


def on_both(tmp_path: Path, extra: str, steps: Callable[[Path], object]) -> dict[str, tuple]:
    """Run STEPS on a writable mount of the same lower by each program with the extra options;
    what STEPS returns, then the owners seen through the mount and stored in the upper."""
    lower = make_lower(tmp_path)
    results = {}
    for program in (PYUNIONFS, FUSE_OVERLAYFS):
        base = tmp_path / os.path.basename(program)
        dirs = [base / name for name in ("upper", "work", "mnt")]
        for path in dirs:
            path.mkdir(parents=True)
        upper, work, mnt = dirs
        with helper_mount(program, mnt, overlay_options([lower], upper, work, extra)):
            outcome = steps(mnt)
            seen = owners(mnt)
        results[os.path.basename(program)] = (outcome, seen, owners(upper))
    return results


def read_only_on_both(lower: Path, variants: tuple[str, ...], scratch: Path,
                      observe: Callable[[Path], object]) -> dict[tuple[str, str], object]:
    """OBSERVE(mountpoint) of a read-only union of LOWER, through pyunionfs and fuse-overlayfs,
    with each of the extra option strings VARIANTS; by (program, variant)."""
    seen = {}
    for program in (PYUNIONFS, FUSE_OVERLAYFS):
        for options in variants:
            mnt = scratch / f"mnt-{os.path.basename(program)}-{options}"
            mnt.mkdir()
            with helper_mount(program, mnt, overlay_options([lower], extra=options)):
                seen[os.path.basename(program), options] = observe(mnt)
    return seen


def assert_same(results: dict[str, tuple]) -> None:
    ours, theirs = results["pyunionfs"], results[FUSE_OVERLAYFS]
    assert ours[0] == theirs[0], "the steps' outcome"
    assert ours[1] == theirs[1], "what the mount shows"
    # fuse-overlayfs leaves .wh..wh..opq files and its own xattrs in the upper; owners compared.
    assert {k: v[:2] for k, v in ours[2].items()} == \
        {k: v[:2] for k, v in theirs[2].items() if not k.endswith(".wh..wh..opq")}, "what the upper stores"


def test_containers_storage_option_strings(tmp_path, mnt):
    """The three forms containers/storage writes (note the empty element), read-only included."""
    lower = make_lower(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    for extra in (",volatile", "", ","):
        with helper_mount(PYUNIONFS, mnt, overlay_options([lower], upper, work, extra)):
            (mnt / "written").write_text(extra)
    assert (upper / "written").read_text() == ","
    with helper_mount(PYUNIONFS, mnt, overlay_options([upper, lower])):
        assert (mnt / "file").read_text() == "lower\n"
        with pytest.raises(OSError) as exc:
            (mnt / "new").write_text("x")
        assert exc.value.errno == errno.EROFS


def _create_and_chown(mnt: Path, user: tuple[int, int]) -> list:
    """Files made by root and by a mapped USER, a chown into the mapping and one out of it."""
    os.chmod(mnt, 0o777)
    (mnt / "by-root").write_text("r")
    made = as_user(*user, "touch", str(mnt / "by-user")).returncode
    os.chown(mnt / "file", 100005, 100006)
    try:
        os.chown(mnt / "dir" / "inner", 5, 6)  # shown id 5 is in no range
        outside = "ok"
    except OSError as exc:
        outside = errno.errorcode[exc.errno]
    return [made, outside]


@pytest.mark.parametrize("mapping, user, file_owner", [
    # containers/storage's form
    ("uidmapping=:0:100000:65536,gidmapping=:0:100000:65536", (100007, 100008), (100005, 100006)),
    # uid 100005 is in no range: stored as the overflow id 65534, which shows as 200001 + 65533
    ("uidmapping=0:100000:1:1:200001:65535,gidmapping=0:100000:65536", (200007, 100008), (265534, 100006)),
])
def test_id_mapping_matches_fuse_overlayfs(shared_tmp, mapping, user, file_owner):
    results = on_both(shared_tmp, mapping, lambda mnt: _create_and_chown(mnt, user))
    assert_same(results)
    assert results["pyunionfs"][0] == [0, "ok"]  # the mapped user could create its file
    assert results["pyunionfs"][1]["file"][:2] == file_owner


@pytest.mark.parametrize("squash", ["squash_to_root", "squash_to_uid=7,squash_to_gid=8",
                                    "squash_to_root,squash_to_uid=7"])
def test_squash_matches_fuse_overlayfs(tmp_path, squash):
    def steps(mnt: Path) -> list:
        (mnt / "new").write_text("n")
        os.chown(mnt / "file", 9, 9)
        return sorted(os.listdir(mnt))

    results = on_both(tmp_path, squash, steps)
    assert_same(results)


def test_static_nlink_matches_fuse_overlayfs(tmp_path):
    def steps(mnt: Path) -> list:
        (mnt / "newdir" / "a").mkdir(parents=True)
        return [os.stat(mnt / d).st_nlink for d in ("dir", "newdir", "newdir/a")]

    results = on_both(tmp_path, "static_nlink", steps)
    assert results["pyunionfs"][0] == results[FUSE_OVERLAYFS][0] == [1, 1, 1]


def test_noacl_ignores_acls_as_fuse_overlayfs(shared_tmp):
    lower = shared_tmp / "lower"
    lower.mkdir()
    (lower / "secret").write_text("s\n")
    os.chmod(lower / "secret", 0o600)
    os.setxattr(lower / "secret", ACL_ACCESS, grant_to_nobody())
    readable = read_only_on_both(lower, ("", "noacl"), shared_tmp, lambda mnt: reads_as_nobody(mnt / "secret"))
    assert readable == {("pyunionfs", ""): True, ("pyunionfs", "noacl"): False,
                        (FUSE_OVERLAYFS, ""): True, (FUSE_OVERLAYFS, "noacl"): False}


def test_noxattrs_refuses_xattrs_as_fuse_overlayfs(tmp_path):
    def steps(mnt: Path) -> list:
        outcomes = []
        for action in (lambda: os.listxattr(mnt / "file"), lambda: os.getxattr(mnt / "file", "user.x"),
                       lambda: os.setxattr(mnt / "file", "user.x", b"1")):
            try:
                outcomes.append(("ok", action()))
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno])
        return outcomes

    results = on_both(tmp_path, "noxattrs=1", steps)
    assert results["pyunionfs"][0] == results[FUSE_OVERLAYFS][0] == [errno.errorcode[errno.EOPNOTSUPP]] * 3


def test_timeout_zero_sees_new_lower_names(tmp_path, mnt):
    """timeout= is how long the kernel may cache entries: with 0, a name added to a layer after
    a failed lookup is found at the next one."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for timeout, found_later in (("timeout=0", True), ("", False)):
        (lower / "late").unlink(missing_ok=True)
        with helper_mount(PYUNIONFS, mnt, overlay_options([lower], extra=timeout)):
            assert not (mnt / "late").exists()
            (lower / "late").write_text("late\n")
            assert (mnt / "late").exists() == found_later


def test_debug_option(tmp_path, mnt):
    lower = make_lower(tmp_path)
    log = tmp_path / "log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([PYUNIONFS, "-o", overlay_options([lower], extra="debug"), str(mnt)],
                                stderr=stderr)
        try:
            deadline = 200
            while not (mnt / "file").exists() and deadline:
                deadline -= 1
                subprocess.run(["sleep", "0.05"])
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            proc.wait(timeout=20)
    assert "opcode: LOOKUP" in log.read_text()  # -o debug logs and stays in the foreground


def test_option_values_parsed_as_fuse_overlayfs():
    config = MountConfig(lowers=[], mountpoint="/m")
    apply_option_string(config, "lowerdir=/a,,volatile,threaded=1,fast_ino=1,writeback=0,plugins=,"
                                "timeout=2.5,noxattrs=0,xattr_permissions=2,allow_root,splice_write")
    assert not config.sync and config.timeout == 2.5 and config.xattrs and config.xattr_permissions == 2
    apply_option_string(config, "squash_to_root,squash_to_uid=7")
    uids, gids = config.id_maps()
    assert (uids.shown(123), gids.shown(123)) == (7, 0)  # squash_to_uid wins over squash_to_root
    apply_option_string(config, "uidmapping=:0:1000:10")
    uids, _ = config.id_maps()
    assert (uids.stored(1005), uids.stored(5), uids.squash) == (5, uids.overflow, 7)
    for bad in ("uidmapping=1:2", "squash_to_uid=-1", "timeout=soon", "writeback=yes", "fsync=2"):
        with pytest.raises(ConfigError):
            apply_option_string(config, bad)


OVERRIDE = "user.containers.override_stat"


def make_masked_lower(root: Path) -> Path:
    """A layer as containers/storage stores it with force_mask: real modes masked, the owner
    and mode that count in user.containers.override_stat, on the root too."""
    lower = root / "masked"
    (lower / "bin").mkdir(parents=True)
    (lower / "bin" / "su").write_text("#!/bin/sh\n")
    for path, value in ((lower, "0:0:755"), (lower / "bin", "0:0:755"), (lower / "bin" / "su", "0:0:4755")):
        os.chmod(path, 0o700)
        os.setxattr(path, OVERRIDE, value.encode())
    return lower


def test_override_stat_of_lower_layers_read_as_fuse_overlayfs(tmp_path):
    lower = make_masked_lower(tmp_path)
    seen = read_only_on_both(lower, ("xattr_permissions=2", ""), tmp_path, owners)
    assert seen["pyunionfs", "xattr_permissions=2"] == seen[FUSE_OVERLAYFS, "xattr_permissions=2"]
    assert seen["pyunionfs", "xattr_permissions=2"]["bin/su"][2] == 0o4755
    # Without the option pyunionfs shows the real modes, as kernel overlayfs does (fuse-overlayfs
    # reads the xattrs whenever a layer root has one).
    assert seen["pyunionfs", ""]["bin/su"][2] == 0o700


def test_xattr_permissions_keep_owners_and_modes_in_the_upper_xattr(tmp_path, mnt):
    lower = make_masked_lower(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    options = overlay_options([lower], upper, work, "xattr_permissions=2")
    with helper_mount(PYUNIONFS, mnt, options):
        os.chown(mnt / "bin" / "su", 5, 6)
        os.chmod(mnt / "bin" / "su", 0o4711)
        (mnt / "bin" / "new").write_text("n")
        os.chmod(mnt / "bin" / "new", 0o640)
        (mnt / "dir").mkdir(mode=0o750)
        os.symlink("new", mnt / "bin" / "link")
        shown = owners(mnt)
        listed = os.listxattr(mnt / "bin" / "su")
        with pytest.raises(OSError) as refused:
            os.setxattr(mnt / "bin" / "su", OVERRIDE, b"0:0:777")
    assert shown["bin/su"][:3] == (5, 6, 0o4711)
    assert shown["bin/new"][2] == 0o640 and shown["dir"][2] == 0o750
    assert OVERRIDE not in listed and refused.value.errno == errno.EPERM
    # The real owner and mode stay as the daemon made them; the xattr holds the ones that count.
    real = os.lstat(upper / "bin" / "su")
    assert (real.st_uid, stat.S_IMODE(real.st_mode)) == (0, 0o700)
    assert os.getxattr(upper / "bin" / "su", OVERRIDE) == b"5:6:4711"
    assert os.getxattr(upper, OVERRIDE) == b"0:0:755"  # the upper is marked, from the lower root
    with helper_mount(PYUNIONFS, mnt, options):
        assert owners(mnt) == shown
