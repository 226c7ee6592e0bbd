"""Inside the container: the root filesystem set up on the union, pivot_root, the command, and a
small PID 1 that reaps and forwards signals. Runs in a fresh process of the launcher that has not
started threads (after fork), in new mount, PID, UTS and IPC namespaces."""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field

from unionfs import sysns
from unionfs.sysns import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

HOST_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx", "core": "/proc/kcore"}
# runc/crun's default spec: hidden and read-only paths of /proc and /sys.
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# podman's default capability set (containers.conf); every other one leaves the bounding set.
KEPT_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31}  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID
# SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT SETFCAP
LAST_CAP = 40
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH)
# Exit statuses of `pyunionfs run` that are not the command's own, as in podman.
EXIT_LAUNCHER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127


@dataclass
class Volume:
    source: str
    target: str
    read_only: bool = False


@dataclass
class ContainerSpec:
    root: str  # the union's mountpoint, which becomes /
    command: list[str]
    env: dict[str, str]
    cwd: str = "/"
    hostname: str = "pyunionfs"
    uid: int = 0
    gid: int = 0
    volumes: list[Volume] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    net_none: bool = False
    init: bool = True
    etc_files: dict[str, str] = field(default_factory=dict)  # container path -> host file, bound ro


def _inside(spec: ContainerSpec, path: str) -> str:
    return os.path.join(spec.root, path.lstrip("/"))


def _ensure(path: str, is_dir: bool) -> None:
    """Make a mount target that the image lacks (in the upper layer, as other runtimes do)."""
    if os.path.lexists(path):
        return
    os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
    if not is_dir:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


# Flags a user namespace may not drop from a mount it did not make: a read-only remount repeats them.
LOCKED_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, sysns.MS_NOEXEC),
                (os.ST_NOATIME, sysns.MS_NOATIME), (os.ST_NODIRATIME, sysns.MS_NODIRATIME),
                (os.ST_RELATIME, sysns.MS_RELATIME))


def _bind(source: str, target: str, read_only: bool) -> None:
    sysns.mount(source, target, None, MS_BIND | MS_REC)
    if read_only:  # a second call: MS_RDONLY is ignored on the first bind
        current = os.statvfs(target).f_flag
        kept = sum(flag for st_flag, flag in LOCKED_FLAGS if current & st_flag)
        sysns.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _setup_dev(spec: ContainerSpec) -> None:
    dev = _inside(spec, "/dev")
    _ensure(dev, True)
    sysns.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name in HOST_DEVICES:  # bound, not made: the union is nodev, and mknod is for root only
        if os.path.exists(f"/dev/{name}"):
            _ensure(os.path.join(dev, name), False)
            _bind(f"/dev/{name}", os.path.join(dev, name), False)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"))
    sysns.mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620")
    os.mkdir(os.path.join(dev, "shm"))
    sysns.mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                "mode=1777,size=65536k")


def _mask(spec: ContainerSpec) -> None:
    for path in MASKED_PATHS:
        target = _inside(spec, path)
        if os.path.isdir(target):
            sysns.mount("tmpfs", target, "tmpfs", MS_RDONLY)
        elif os.path.exists(target):
            _bind(_inside(spec, "/dev/null"), target, False)
    for path in READONLY_PATHS:
        target = _inside(spec, path)
        if os.path.exists(target):
            _bind(target, target, True)


def _loopback_up() -> None:
    siocsifflags, iff_up, iff_loopback, iff_running = 0x8914, 0x1, 0x8, 0x40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", iff_up | iff_loopback | iff_running))


def setup_root(spec: ContainerSpec) -> None:
    """Mount /proc, /dev, /sys, /tmp, volumes and generated files on the union, then make it /."""
    sysns.mount(None, "/", None, MS_REC | sysns.MS_PRIVATE)
    _ensure(_inside(spec, "/proc"), True)
    sysns.mount("proc", _inside(spec, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _setup_dev(spec)
    _ensure(_inside(spec, "/sys"), True)
    try:
        sysns.mount("sysfs", _inside(spec, "/sys"), "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except PermissionError:  # rootless without a network namespace of its own: the host's, read-only
        _bind("/sys", _inside(spec, "/sys"), True)
    for path in ["/tmp", *spec.tmpfs]:
        _ensure(_inside(spec, path), True)
        sysns.mount("tmpfs", _inside(spec, path), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, host_file in spec.etc_files.items():
        _ensure(_inside(spec, path), False)
        _bind(host_file, _inside(spec, path), True)
    for volume in spec.volumes:
        _ensure(_inside(spec, volume.target), os.path.isdir(volume.source))
        _bind(volume.source, _inside(spec, volume.target), volume.read_only)
    _mask(spec)
    sysns.sethostname(spec.hostname)
    if spec.net_none:
        _loopback_up()
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no way
    # back to the host tree (chroot would: the classic escape works against it).
    os.chdir(spec.root)
    sysns.pivot_root(".", ".")
    sysns.umount(".", sysns.MNT_DETACH)
    os.chdir("/")


def _exec_command(spec: ContainerSpec) -> None:
    """Become the command: new session, no new privileges, podman's capabilities, the user."""
    os.setsid()
    sysns.prctl(sysns.PR_SET_NO_NEW_PRIVS, 1)
    for cap in range(LAST_CAP + 1):
        if cap not in KEPT_CAPS:
            try:
                sysns.prctl(sysns.PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a capability this kernel does not know
                    raise
    if (spec.uid, spec.gid) != (0, 0):
        try:
            os.setgroups([])
        except PermissionError:
            pass  # a user namespace with setgroups denied has no supplementary groups to drop
        os.setgid(spec.gid)
        os.setuid(spec.uid)
    os.chdir(spec.cwd)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvpe(spec.command[0], spec.command, spec.env)
    except FileNotFoundError:
        print(f"pyunionfs: {spec.command[0]}: command not found", file=sys.stderr)
        os._exit(EXIT_NOT_FOUND)
    except OSError as exc:
        print(f"pyunionfs: {spec.command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(EXIT_NOT_EXECUTABLE)


def exit_code(status: int) -> int:
    """The shell's convention: the exit code, or 128+N for death by signal N."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def supervise(main_pid: int, watched: int = -1) -> tuple[int, int]:
    """Forward signals to MAIN_PID and reap every child until MAIN_PID (or WATCHED) ends:
    which one ended, and its exit code. As PID 1 this is the container's init."""
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda received, _frame: os.kill(main_pid, received))
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid in (main_pid, watched):
            return pid, exit_code(status)


def run_in_container(spec: ContainerSpec) -> None:
    """The container's first process (PID 1 of its PID namespace); never returns."""
    code = EXIT_LAUNCHER_ERROR
    try:
        sysns.unshare(sysns.CLONE_NEWNS | sysns.CLONE_NEWUTS | sysns.CLONE_NEWIPC |
                      (sysns.CLONE_NEWNET if spec.net_none else 0))
        setup_root(spec)
        if not spec.init:
            _exec_command(spec)
        main_pid = os.fork()
        if main_pid == 0:
            _exec_command(spec)
        code = supervise(main_pid)[1]
    except OSError as exc:
        print(f"pyunionfs: setting up the container failed: {exc}", file=sys.stderr)
    finally:
        os._exit(code)
