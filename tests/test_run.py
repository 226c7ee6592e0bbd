"""`pyunionfs run` on a busybox image: exit codes, PID 1, namespaces, writes, signals, volumes,
and what is left when things die (nothing)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mounts import PYUNIONFS
from trees import checksum

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A tiny image: busybox and its applets, /etc/passwd, and a file that is not executable."""
    root = tmp_path_factory.mktemp("image")
    (root / "bin").mkdir()
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


def run(image: Path, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYUNIONFS, "run", "--lower", str(image), *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def run_sh(image: Path, script: str, *options: str) -> subprocess.CompletedProcess:
    return run(image, *options, "--", "sh", "-c", script)


def command_lines() -> dict[int, bytes]:
    """The command line of every process but this one (processes may end while it looks)."""
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                lines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
    return lines


def leftovers(marker: str) -> tuple[list[str], list[int]]:
    """Host mounts and processes that mention MARKER."""
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line]
    return mounts, [pid for pid, line in command_lines().items() if marker.encode() in line]


@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 42", 42), ("kill -9 $$", 137)])
def test_exit_codes(image, script, code):
    assert run_sh(image, script).returncode == code


def test_not_found_and_not_executable(image):
    missing = run(image, "--", "no-such-command")
    assert missing.returncode == 127 and "not found" in missing.stderr
    assert run(image, "--", "/not-executable").returncode == 126


def test_launcher_errors_are_125(image, tmp_path):
    result = subprocess.run([PYUNIONFS, "run", "--lower", str(tmp_path / "missing"), "--", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 125
    assert result.stderr.startswith("pyunionfs: ") and len(result.stderr.splitlines()) == 1


def test_pid_hostname_env_and_root(image):
    result = run_sh(image, 'echo "$$ $(hostname) $container $FOO"; cat /data; cat /etc/hostname; ls /',
                    "--hostname", "box", "-e", "FOO=bar")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2 box pyunionfs bar"  # PID 1 is the launcher's init
    assert lines[1:3] == ["from the image", "box"]
    assert run_sh(image, "echo $$", "--no-init").stdout.strip() == "1"


def test_writes_land_in_the_upper(image, tmp_path):
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    before = checksum(image)
    result = run_sh(image, "echo written > /new; rm /data", "--upper", str(upper), "--workdir", str(work))
    assert result.returncode == 0, result.stderr
    assert (upper / "new").read_text() == "written\n"
    whiteout = os.lstat(upper / "data")
    assert os.major(whiteout.st_rdev) == 0 and os.minor(whiteout.st_rdev) == 0
    assert checksum(image) == before
    again = run_sh(image, "cat /new; ls /data", "--upper", str(upper), "--workdir", str(work))
    assert again.stdout.startswith("written") and again.returncode != 0


def test_sigterm_reaches_a_trap(image, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = subprocess.Popen([PYUNIONFS, "run", "--lower", str(image), "-v", f"{ready}:/ready", "--",
                             "sh", "-c", 'trap "exit 3" TERM; touch /ready/go; while :; do sleep 0.1; done'])
    try:
        deadline = time.monotonic() + 30
        while not (ready / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_no_zombies(image):
    script = ('for i in 1 2 3 4 5; do (sleep 0.1 &) ; done; sleep 1; '
              'cat /proc/[0-9]*/stat | awk \'$3 == "Z"\' | wc -l')
    result = run_sh(image, script)
    assert result.returncode == 0 and result.stdout.strip() == "0"


def test_volumes(image, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    read_only = run_sh(image, "echo x > /ro/f", "-v", f"{shared}:/ro:ro")
    assert read_only.returncode != 0 and "Read-only file system" in read_only.stderr
    writable = run_sh(image, "echo through > /rw/f", "-v", f"{shared}:/rw")
    assert writable.returncode == 0 and (shared / "f").read_text() == "through\n"


def test_no_host_paths_inside(image):
    """The host's tree is gone after pivot_root, and /proc's sensitive files are masked."""
    probe = run_sh(image, "ls /work /proc/1/root/work 2>/dev/null; cat /proc/keys /proc/timer_list | wc -c; "
                          "ls /proc/acpi | wc -l; echo x > /proc/sys/kernel/hostname; "
                          "awk '$5 == \"/\"' /proc/self/mountinfo | wc -l")
    assert probe.stdout.split() == ["0", "0", "1"]  # masked files and dirs are empty; one root
    assert "Read-only file system" in probe.stderr


def test_dead_filesystem_server_is_a_launcher_error(image):
    proc = subprocess.Popen([PYUNIONFS, "run", "--lower", str(image), "--", "sleep", "30"],
                            stderr=subprocess.PIPE, text=True)
    marker = "pyunionfs-run."
    try:
        deadline = time.monotonic() + 30
        servers: list[int] = []
        while not servers and time.monotonic() < deadline:
            servers = [pid for pid, line in command_lines().items()
                       if marker.encode() in line and b"\0mount\0" in line]
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(servers[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 125
        assert "filesystem server died" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(marker) == ([], [])


def test_killing_the_launcher_leaves_nothing(image):
    sleeper = f"{30 + os.getpid() % 1000 / 1000:.3f}"  # a command line no other test runs
    proc = subprocess.Popen([PYUNIONFS, "run", "--lower", str(image), "--", "sleep", sleeper])
    marker = "pyunionfs-run."
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while leftovers(marker) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(marker) == ([], [])
    # the sleeper ran in the container's PID namespace, which died with its init
    assert f"sleep\0{sleeper}\0".encode() not in command_lines().values()


def test_rootless_user_namespace(image, tmp_path):
    """--rootless (the default for non-root users) as root: a user namespace with one id mapped,
    and an upper in the kernel's userxattr format, which kernel overlayfs with userxattr reads."""
    from mounts import kernel_overlay

    upper, work, kernel = tmp_path / "upper", tmp_path / "work", tmp_path / "kernel"
    for path in (upper, work, kernel):
        path.mkdir()
    result = run_sh(image, "cat /proc/self/uid_map; rm -rf /box; mkdir /box; touch /box/new; rm /data",
                    "--rootless", "--upper", str(upper), "--workdir", str(work))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "1"]
    assert "one id mapped" in result.stderr
    assert os.getxattr(upper / "box", "user.overlay.opaque") == b"y"
    assert not [name for name in os.listxattr(upper / "box") if name.startswith("trusted.")]
    with kernel_overlay([image], kernel, "userxattr", upper, work):
        assert os.listdir(kernel / "box") == ["new"]
        assert not (kernel / "data").exists()
