"""`pyunionfs run` on a busybox image: exit codes, PID 1, namespaces, writes, signals, volumes,
and what is left when things die (nothing)."""
from __future__ import annotations

import functools
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.runner import command_lines as process_arguments
from mounts import PYUNIONFS
from trees import checksum
from unionfs import launcher as launcher_module

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
ROOTLESS_USER = "PYUNIONFS_ROOTLESS_USER"  # an unprivileged user with /etc/subuid ranges


def build_image(root: Path) -> Path:
    """A tiny image: busybox and its applets, /etc/passwd, and a file that is not executable."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "data").write_text("from the image\n")
    (root / "box").mkdir()
    (root / "box" / "item").write_text("in the image\n")
    (root / "not-executable").write_text("#!/bin/sh\necho never\n")
    return root


@dataclass
class Launcher:
    """Runs `pyunionfs run` on an image, as root or as an unprivileged user (the rootless tier)."""
    image: Path
    scratch: Path  # where this launcher's user may create directories
    prefix: list[str] = field(default_factory=list)  # drops to the user
    owner: tuple[int, int] | None = None

    def command(self, *args: str) -> list[str]:
        # The launcher's scratch directory goes below ours: one it cannot remove (killed) is
        # removed with ours.
        return [*self.prefix, "env", f"TMPDIR={self.tmp}", PYUNIONFS, "run", "--lower", str(self.image), *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout)

    def run_sh(self, script: str, *options: str) -> subprocess.CompletedProcess:
        return self.run(*options, "--", "sh", "-c", script)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), **kwargs)

    @functools.cached_property
    def tmp(self) -> Path:
        return self.directory("tmp")

    def directory(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.scratch))
        if self.owner:
            os.chown(path, *self.owner)
        return path


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


def unprivileged_launcher(user: str, scratch: Path) -> Launcher:
    """The rootless tier: USER (with subordinate ids), a user-owned image and a usable FUSE node
    of its own, since this machine's /dev/fuse is 0600 root."""
    account = pwd.getpwnam(user)
    uid, gid = account.pw_uid, account.pw_gid
    scratch.chmod(0o755)
    image = build_image(scratch / "image")
    chown_tree(image, uid, gid)
    fuse = scratch / "fuse"
    os.mknod(fuse, 0o600 | stat.S_IFCHR, os.makedev(10, 229))
    os.chown(fuse, uid, gid)
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
              "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={scratch}",
              f"PYUNIONFS_FUSE_DEVICE={fuse}"]
    return Launcher(image, scratch, prefix, (uid, gid))


@pytest.fixture(scope="module", params=["root", "rootless"])
def launcher(request, tmp_path_factory) -> Launcher:
    if request.param == "root":
        scratch = tmp_path_factory.mktemp("run")
        yield Launcher(build_image(scratch / "image"), scratch)
        return
    user = os.environ.get(ROOTLESS_USER)
    if not user:
        pytest.skip(f"the rootless tier needs an unprivileged user with subuid ranges in ${ROOTLESS_USER} "
                    "(scripts/test.sh creates one)")
    # Under /tmp, not pytest's 0700 base directory, which the user could not enter.
    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-rootless-test."))
    yield unprivileged_launcher(user, scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def command_lines() -> dict[int, bytes]:
    """The command line of every process but this one, NUL-separated as in /proc/PID/cmdline."""
    return {pid: b"\0".join(argv) for pid, argv in process_arguments().items()}


def leftovers(command: str) -> tuple[list[str], list[int]]:
    """Host mounts of a launcher, and processes whose command line has COMMAND (the launcher's
    and those it forks, the filesystem server among them, carry the container's command)."""
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    mounts = [line for line in mountinfo if "pyunionfs-run." in line]
    return mounts, [pid for pid, line in command_lines().items() if command.encode() in line]


def comm(pid: int) -> str:
    """PID's process name, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def servers_running(command: list[str]) -> list[int]:
    """The filesystem servers of the launcher that runs COMMAND."""
    return [pid for pid in leftovers("\0".join(command))[1] if comm(pid) == launcher_module.SERVER_NAME]


def unique_sleep() -> list[str]:
    """A sleep command no other test runs."""
    return ["sleep", f"{30 + os.getpid() % 1000 / 1000 + random.randrange(1000) / 1e6:.6f}"]


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 42", 42), ("kill -9 $$", 137)])
def test_exit_codes(launcher, script, code):
    assert launcher.run_sh(script).returncode == code


def test_not_found_and_not_executable(launcher):
    missing = launcher.run("--", "no-such-command")
    assert missing.returncode == 127 and "not found" in missing.stderr
    assert launcher.run("--", "/not-executable").returncode == 126


def test_launcher_errors_are_125(tmp_path):
    result = subprocess.run([PYUNIONFS, "run", "--lower", str(tmp_path / "missing"), "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 125
    assert result.stderr.startswith("pyunionfs: ") and len(result.stderr.splitlines()) == 1


def test_pid_hostname_env_and_root(launcher):
    result = launcher.run_sh('echo "$$ $(hostname) $container $FOO"; cat /data; cat /etc/hostname; ls /',
                             "--hostname", "box", "-e", "FOO=bar")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2 box pyunionfs bar"  # PID 1 is the launcher's init
    assert lines[1:3] == ["from the image", "box"]
    assert launcher.run_sh("echo $$", "--no-init").stdout.strip() == "1"


def test_writes_land_in_the_upper(launcher):
    upper, work = launcher.directory("upper"), launcher.directory("work")
    before = checksum(launcher.image)
    result = launcher.run_sh("echo written > /new; rm /data", "--upper", str(upper), "--workdir", str(work))
    assert result.returncode == 0, result.stderr
    assert (upper / "new").read_text() == "written\n"
    whiteout = os.lstat(upper / "data")
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0
    assert checksum(launcher.image) == before
    again = launcher.run_sh("cat /new; ls /data", "--upper", str(upper), "--workdir", str(work))
    assert again.stdout.startswith("written") and again.returncode != 0


def test_sigterm_reaches_a_trap(launcher):
    ready = launcher.directory("ready")
    proc = launcher.popen("-v", f"{ready}:/ready", "--",
                          "sh", "-c", 'trap "exit 3" TERM; touch /ready/go; while :; do sleep 0.1; done')
    try:
        deadline = time.monotonic() + 30
        while not (ready / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_no_zombies(launcher):
    script = ('for i in 1 2 3 4 5; do (sleep 0.1 &) ; done; sleep 1; '
              'cat /proc/[0-9]*/stat | awk \'$3 == "Z"\' | wc -l')
    result = launcher.run_sh(script)
    assert result.returncode == 0 and result.stdout.strip() == "0"


def test_volumes(launcher):
    shared = launcher.directory("shared")
    read_only = launcher.run_sh("echo x > /ro/f", "-v", f"{shared}:/ro:ro")
    assert read_only.returncode != 0 and "Read-only file system" in read_only.stderr
    writable = launcher.run_sh("echo through > /rw/f", "-v", f"{shared}:/rw")
    assert writable.returncode == 0 and (shared / "f").read_text() == "through\n"


def test_no_host_paths_inside(launcher):
    """The host's tree is gone after pivot_root, and /proc's sensitive files are masked."""
    probe = launcher.run_sh("ls /work /proc/1/root/work 2>/dev/null; cat /proc/keys /proc/timer_list | wc -c; "
                            "ls /proc/acpi | wc -l; echo x > /proc/sys/kernel/hostname; "
                            "awk '$5 == \"/\"' /proc/self/mountinfo | wc -l")
    assert probe.stdout.split() == ["0", "0", "1"]  # masked files and dirs are empty; one root
    assert "Read-only file system" in probe.stderr


def test_dead_filesystem_server_is_a_launcher_error(launcher):
    sleep = unique_sleep()
    proc = launcher.popen("--", *sleep, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        servers: list[int] = []
        while not servers and time.monotonic() < deadline:
            servers = servers_running(sleep)
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(servers[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 125
        assert "filesystem server died" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert leftovers("\0".join(sleep)) == ([], [])


def test_killing_the_launcher_leaves_nothing(launcher):
    sleep = unique_sleep()
    proc = launcher.popen("--", *sleep)
    time.sleep(1.5)
    assert servers_running(sleep)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The children die with the launcher, the sleeper with the PID namespace of its init: soon,
    # not at once.
    deadline = time.monotonic() + 10
    while leftovers("\0".join(sleep)) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers("\0".join(sleep)) == ([], [])


@pytest.mark.parametrize("launcher", ["rootless"], indirect=True)
def test_subordinate_ids(launcher):
    """Rootless with /etc/subuid ranges (newuidmap): the user is root, its range ids 1 and up, and
    a chown inside lands in the upper as the matching subordinate id. A copy-up keeps st_ino
    although a rootless server cannot open the origin's file handle."""
    upper, work = launcher.directory("upper"), launcher.directory("work")
    result = launcher.run_sh("cat /proc/self/uid_map; touch /owned; chown 1000:1000 /owned; touch /mine; "
                             "before=$(stat -c %i /box /data); touch /box/new; chmod 600 /data; ls -l / >/dev/null; "
                             "[ \"$before\" = \"$(stat -c %i /box /data)\" ] || echo st_ino changed >&2",
                             "--upper", str(upper), "--workdir", str(work))
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert (upper / "data").stat().st_mode & 0o777 == 0o600
    uid, gid = launcher.owner
    mapping = [line.split() for line in result.stdout.splitlines()]
    assert mapping[0] == ["0", str(uid), "1"] and mapping[1][0] == "1"
    first_subordinate = int(mapping[1][1])
    assert (upper / "owned").stat().st_uid == first_subordinate + 999
    assert (upper / "mine").stat().st_uid == uid


@pytest.mark.parametrize("launcher", ["root"], indirect=True)
def test_rootless_user_namespace(launcher):
    """--rootless as root (no subuid entry for root): a user namespace with one id mapped, and an
    upper in the kernel's userxattr format, which kernel overlayfs with userxattr reads."""
    from mounts import kernel_overlay

    upper, work, kernel = (launcher.directory(name) for name in ("upper", "work", "kernel"))
    result = launcher.run_sh("cat /proc/self/uid_map; rm -rf /box; mkdir /box; touch /box/new; rm /data",
                             "--rootless", "--upper", str(upper), "--workdir", str(work))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "1"]
    assert "one id mapped" in result.stderr
    assert os.getxattr(upper / "box", "user.overlay.opaque") == b"y"
    assert not [name for name in os.listxattr(upper / "box") if name.startswith("trusted.")]
    with kernel_overlay([launcher.image], kernel, "userxattr", upper, work):
        assert os.listdir(kernel / "box") == ["new"]
        assert not (kernel / "data").exists()
