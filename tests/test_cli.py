"""The command line: both mount forms, mount(8), umount, signals, and one-line errors."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounts import PYUNIONFS, daemons_for, force_unmount, is_mounted, pyunionfs, stop, tmpfs
from trees import checksum
from unionfs.fs.options import MountConfig, apply_option_string


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("top", "bottom", "upper", "work")}
    for path in paths.values():
        path.mkdir()
    (paths["top"] / "a").write_text("top\n")
    (paths["bottom"] / "a").write_text("bottom\n")
    (paths["bottom"] / "b").write_text("bottom b\n")
    return paths


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYUNIONFS, *args], capture_output=True, text=True, timeout=60, **kwargs)


def wait_for_daemon_exit(mountpoint: Path) -> None:
    """A daemon is not our child, so its exit is polled for."""
    deadline = time.monotonic() + 10
    while daemons_for(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemons_for(mountpoint)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_daemon_mode_returns_once_live(dirs, mnt):
    result = run("mount", f"--lower={dirs['top']}", f"--lower={dirs['bottom']}", str(mnt))
    try:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(mnt)) == ["a", "b"]  # live at once: no waiting
        assert (mnt / "a").read_text() == "top\n"
        assert f"pyunionfs {mnt} fuse.pyunionfs ro," in Path("/proc/mounts").read_text()
    finally:
        result = run("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    wait_for_daemon_exit(mnt)


def test_mount_helper_form_with_escaped_colon(dirs, tmp_path, mnt):
    odd = tmp_path / "odd:name"
    odd.mkdir()
    (odd / "c").write_text("from odd\n")
    lowerdir = f"{str(odd).replace(':', chr(92) + ':')}:{dirs['bottom']}"
    result = run("my-image", str(mnt), "-o", f"rw,dev,suid,lowerdir={lowerdir}")
    try:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(mnt)) == ["a", "b", "c"]
        assert f"my-image {mnt} fuse.pyunionfs ro," in Path("/proc/mounts").read_text()
    finally:
        force_unmount(mnt)
    wait_for_daemon_exit(mnt)


def test_mount_t_fuse_pyunionfs(dirs, mnt):
    # mount(8) runs mount.fuse3 with a fixed PATH; scripts/setup.sh links the command into it.
    assert os.path.realpath("/usr/local/bin/pyunionfs") == os.path.realpath(PYUNIONFS)
    result = subprocess.run(["mount", "-t", "fuse.pyunionfs", "pyunionfs", str(mnt), "-o",
                             f"lowerdir={dirs['top']}:{dirs['bottom']},noatime,x-systemd.automount"],
                            capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "b").read_text() == "bottom b\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    wait_for_daemon_exit(mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(dirs, mnt, signum):
    with pyunionfs([dirs["top"]], mnt) as proc:
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)


def test_debug_logs_in_foreground(dirs, mnt, tmp_path):
    log = tmp_path / "debug.log"
    with open(log, "w") as stderr, pyunionfs([dirs["top"]], mnt, "-d", stderr=stderr):
        os.listdir(mnt)
    assert "opcode: READDIRPLUS" in log.read_text()


def test_umount_of_what_is_not_mounted(mnt):
    assert_one_line_error(run("umount", str(mnt)), "not mounted")


BAD_INPUTS = {
    "missing lower": (lambda d: ["mount", "--lower", str(d["top"] / "nope"), "{mnt}"], "does not exist"),
    "missing upper": (lambda d: ["mount", "--lower", str(d["top"]), "--upper", str(d["upper"] / "x"),
                                 "--workdir", str(d["work"]), "{mnt}"], "does not exist"),
    "missing workdir": (lambda d: ["mount", "--lower", str(d["top"]), "--upper", str(d["upper"]),
                                   "--workdir", str(d["work"] / "x"), "{mnt}"], "does not exist"),
    "missing mountpoint": (lambda d: ["mount", "--lower", str(d["top"]), str(d["top"] / "nope")],
                           "does not exist"),
    "no lower": (lambda d: ["mount", "{mnt}"], "no lower"),
    "upper without workdir": (lambda d: ["mount", "--lower", str(d["top"]), "--upper", str(d["upper"]),
                                         "{mnt}"], "workdir"),
    "mountpoint inside a lower": (lambda d: ["mount", "--lower", str(d["bottom"]), "--lower",
                                             str(d["top"].parent), "{mnt}"], "inside"),
    "mountpoint is the upper": (lambda d: ["mount", "--lower", str(d["top"]), "--upper", str(d["upper"]),
                                           "--workdir", str(d["work"]), str(d["upper"])], "inside the upper"),
    "workdir inside upper": (lambda d: ["mount", "--lower", str(d["top"]), "--upper", str(d["upper"]),
                                        "--workdir", str(d["upper"] / "w"), "{mnt}"], "overlap"),
    "unknown option": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},frobnicate"], "unknown mount option"),
    "bad fsync value": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},fsync=2"], "fsync= takes"),
    "bad id mapping": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},uidmapping=0:100000"], "uidmapping="),
    "bad xattr_permissions": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},xattr_permissions=3"],
                              "xattr_permissions="),
    "plugins": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},plugins=/x.so"], "plugins"),
    "bad FUSE value": (lambda d: ["{mnt}", "-o", f"lowerdir={d['top']},upperdir={d['upper']},"
                                  f"workdir={d['work']},max_read=abc"], "max_read="),
    "too many lowers": (lambda d: ["{mnt}", "-o", "lowerdir=" + ":".join([str(d["top"])] * 501)],
                        "too many lower directories, limit is 500"),
    "too many paths": (lambda d: ["a", "b", "{mnt}", "-o", f"lowerdir={d['top']}"], "MOUNTPOINT"),
    "unknown flag": (lambda d: ["mount", "--bogus", "{mnt}"], "unrecognized"),
}


def test_as_many_lowers_as_the_kernel_takes(tmp_path, mnt):
    """500 lower directories, kernel overlayfs's limit, and an upper."""
    lowers = [tmp_path / f"l{i}" for i in range(500)]
    for lower in lowers:
        lower.mkdir()
    (lowers[-1] / "bottom").write_text("bottom\n")
    (lowers[-1] / "shadowed").write_text("bottom\n")
    (lowers[0] / "shadowed").write_text("top\n")
    for lower in (lowers[0], lowers[-1]):  # a directory merged from the first and the 500th layer
        (lower / "merged").mkdir()
        (lower / "merged" / lower.name).write_text("")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    result = run(str(mnt), "-o", f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}")
    try:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(mnt)) == ["bottom", "merged", "shadowed"]
        assert (mnt / "shadowed").read_text() == "top\n"
        assert sorted(os.listdir(mnt / "merged")) == ["l0", "l499"]
        with open(mnt / "bottom", "a") as f:  # a copy-up from the 500th layer
            f.write("changed\n")
        assert (upper / "bottom").read_text() == "bottom\nchanged\n"
    finally:
        run("umount", str(mnt))
    wait_for_daemon_exit(mnt)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, dirs, mnt):
    make_args, words = BAD_INPUTS[case]
    (dirs["upper"] / "w").mkdir()
    before = {name: checksum(path) for name, path in dirs.items()}
    args = [arg.replace("{mnt}", str(mnt)) for arg in make_args(dirs)]
    assert_one_line_error(run(*args), words)
    assert not is_mounted(mnt)
    assert {name: checksum(path) for name, path in dirs.items()} == before


def test_upper_and_workdir_on_different_filesystems(dirs, tmp_path, mnt):
    with tmpfs(tmp_path / "otherfs") as other:
        result = run("mount", "--lower", str(dirs["top"]), "--upper", str(dirs["upper"]),
                     "--workdir", str(other), str(mnt))
    assert_one_line_error(result, "different filesystems")


def test_mountpoint_already_mounted(dirs, mnt):
    with tmpfs(mnt):
        assert_one_line_error(run("mount", "--lower", str(dirs["top"]), str(mnt)), "already mounted")


def test_stale_mountpoint(dirs, mnt):
    with pyunionfs([dirs["top"]], mnt) as proc:
        proc.kill()
        stop(proc)
        assert_one_line_error(run("mount", "--lower", str(dirs["top"]), str(mnt)), "stale")


@pytest.mark.parametrize("hide, words", [
    ('mount -t tmpfs tmpfs /dev', "No such file"),
    ('touch "{tmp}/plain" && mount --bind "{tmp}/plain" /dev/fuse', "not the FUSE device"),
])
def test_no_usable_fuse_device(dirs, tmp_path, mnt, hide, words):
    # In a private mount namespace, /dev/fuse is taken away or replaced by a plain file.
    script = f'{hide.format(tmp=tmp_path)} && exec "{PYUNIONFS}" mount --lower "{dirs["top"]}" "{mnt}"'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "/dev/fuse", words)


COMMANDS = ("run", "create", "start", "ps", "stop", "kill", "rm", "logs", "inspect", "diff", "commit", "export",
            "load", "save", "import", "images", "tag", "rmi", "image", "mount", "umount")


def test_help_lists_every_command_and_each_has_its_own(dirs):
    result = run("--help")
    assert result.returncode == 0 and "lowerdir" in result.stdout
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert set(COMMANDS) <= set(listed), listed
    for command in COMMANDS:
        own = run(command, "--help")
        assert own.returncode == 0 and own.stdout.startswith(f"usage: pyunionfs {command}"), (command, own.stderr)


def test_fsync_option_follows_fuse_overlayfs():
    config = MountConfig(lowers=[], mountpoint="/m")
    assert config.sync
    apply_option_string(config, "lowerdir=/a,fsync=0")
    assert not config.sync
    apply_option_string(config, "fsync=1")
    assert config.sync


def test_version_as_fuse_overlayfs_prints_it():
    """podman info asks the mount program for `--version`."""
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("pyunionfs: version ") and "FUSE library version 3." in result.stdout
