"""`pyunionfs run` on a busybox image: exit codes, PID 1, namespaces, writes, signals, volumes,
and what is left when things die (nothing)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.runner import command_lines as process_arguments
from mounts import PYUNIONFS
from trees import checksum
from unionfs.runtime import launcher as launcher_module

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


@pytest.mark.parametrize("init", [[], ["--no-init"]])
def test_signals_start_at_their_defaults(launcher, init):
    """No signal ignored or blocked in the command, as podman starts it (the launcher's Python
    ignores SIGPIPE and SIGXFSZ, which exec would pass on)."""
    result = launcher.run(*init, "--", "grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"]


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
