"""Inside the container: the root filesystem set up on the union, pivot_root, the command, and a
small PID 1 that reaps and forwards signals. Runs in a fresh process of the launcher that has not
started threads (after fork), in new mount, PID, UTS and IPC namespaces."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Iterator

from unionfs.errors import EXIT_LAUNCHER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, FORWARDED_SIGNALS
from unionfs.runtime import seccomp, sysns
from unionfs.runtime.sysns import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC

# Mount targets setup_root() makes in the union where the image has none; with the launcher's
# generated /etc files, they are the runtime's, not the container's changes (diff, commit).
RUNTIME_MOUNTS = ("/proc", "/dev", "/sys", "/tmp")
GENERATED_ETC = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
HOST_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx", "core": "/proc/kcore"}
# runc/crun's default spec: hidden and read-only paths of /proc and /sys.
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# podman's default capability set (containers.conf); every other one leaves the bounding set.
KEPT_CAPS = {0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 3: "CAP_FOWNER", 4: "CAP_FSETID", 5: "CAP_KILL",
             6: "CAP_SETGID", 7: "CAP_SETUID", 8: "CAP_SETPCAP", 10: "CAP_NET_BIND_SERVICE",
             18: "CAP_SYS_CHROOT", 31: "CAP_SETFCAP"}
LAST_CAP = 40


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
    user: str = ""  # USER[:GROUP], names or ids, resolved in the container; "" is root
    volumes: list[Volume] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    net_none: bool = False
    init: bool = True
    etc_files: dict[str, str] = field(default_factory=dict)  # container path -> host file, bound ro
    preserve_fds: int = 0  # fds 3 to 3+N-1 of the caller go to the command, as podman's --preserve-fds
    seccomp: seccomp.Profile | None = field(default_factory=seccomp.default)  # None: unconfined


MAX_SYMLINKS = 40  # as the kernel allows on one path


class Root:
    """The container's root (the union), as an fd. Every mount target in it is resolved inside
    it, as runc does with securejoin: symlinks in the image are followed as the container would
    follow them, but never out of it (an absolute one starts again at this root, ".." stops
    there); a missing target is made there, following no symlink; and the mount goes onto the
    target's fd (/proc/self/fd/N). Nothing in the image can send a mount, or a file the launcher
    makes, anywhere else."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def _open(self, components: list[str], flags: int) -> int:
        """Open COMPONENTS, which _resolve() made free of symlinks."""
        return sysns.open_in_root(self.fd, "/".join(components) or ".", flags, sysns.RESOLVE_NO_SYMLINKS)

    def _resolve(self, path: str) -> tuple[list[str], int]:
        """PATH as components below the root, with the symlinks on the way resolved inside it;
        and how many of them (from the first) exist."""
        todo = [part for part in path.split("/") if part not in ("", ".")]
        done: list[str] = []
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            parent = self._open(done, os.O_PATH | os.O_DIRECTORY)
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                link = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:  # made later, with what follows it: no symlink below
                found = len(done)
                done.append(name)
                for rest in todo:
                    done = done[:-1] if rest == ".." else [*done, rest]
                return done, min(found, len(done))
            finally:
                os.close(parent)
            if link is None:
                done.append(name)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            if link.startswith("/"):
                done = []
            todo = [part for part in link.split("/") if part not in ("", ".")] + todo
        return done, len(done)

    @contextlib.contextmanager
    def opened(self, path: str) -> Iterator[str]:
        """A path for mount(2) that leads to PATH in the root (crossing mounts on the way)."""
        fd = self._open(self._resolve(path)[0], os.O_PATH)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def kind(self, path: str) -> int | None:
        """The file type of PATH in the root (stat.S_IFMT), or None when there is none."""
        try:
            with self.opened(path) as target:
                return stat.S_IFMT(os.stat(target).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None

    @contextlib.contextmanager
    def target(self, path: str, is_dir: bool) -> Iterator[str]:
        """opened(PATH), made first if absent (in the upper layer, as other runtimes do): a
        directory, or an empty file. Only what is missing is made: on FUSE, a mkdir of an entry
        that exists still costs the server a LOOKUP (O_EXCL lookups are never cached)."""
        components, found = self._resolve(path)
        for i in range(found, len(components)):
            name = components[i]
            parent = self._open(components[:i], os.O_PATH | os.O_DIRECTORY)
            try:
                if i == len(components) - 1 and not is_dir:
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=parent))
                else:
                    os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
        with self.opened(path) as target:
            yield target


def _bind(root: Root, source: str, path: str, is_dir: bool, read_only: bool) -> None:
    """Bind SOURCE (a host path, or /proc/self/fd/N) at PATH in ROOT, with the mounts below it;
    READ_ONLY makes all of them read-only, as bwrap's --ro-bind and podman's :ro do."""
    with root.target(path, is_dir) as target:
        sysns.mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        with root.opened(path) as mounted:  # now the root of the new mount
            fd = os.open(mounted, os.O_PATH | os.O_CLOEXEC)
            try:
                sysns.make_read_only(fd)
            finally:
                os.close(fd)


def _setup_dev(root: Root) -> None:
    with root.target("/dev", True) as dev:
        sysns.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name in HOST_DEVICES:  # bound, not made: the union is nodev, and mknod is for root only
        if os.path.exists(f"/dev/{name}"):
            _bind(root, f"/dev/{name}", f"/dev/{name}", False, False)
    with root.opened("/dev") as dev:
        dev_fd = os.open(dev, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, target in DEV_LINKS.items():
            os.symlink(target, name, dir_fd=dev_fd)
        for name in ("pts", "shm"):
            os.mkdir(name, 0o755, dir_fd=dev_fd)
    finally:
        os.close(dev_fd)
    with root.opened("/dev/pts") as pts:
        sysns.mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    with root.opened("/dev/shm") as shm:
        sysns.mount("shm", shm, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")


def _mask(root: Root) -> None:
    for path in MASKED_PATHS:
        kind = root.kind(path)
        if kind == stat.S_IFDIR:
            with root.opened(path) as target:
                sysns.mount("tmpfs", target, "tmpfs", MS_RDONLY)
        elif kind is not None:
            _bind(root, "/dev/null", path, False, False)
    for path in READONLY_PATHS:
        if root.kind(path) is not None:
            with root.opened(path) as target:
                _bind(root, target, path, True, True)


def _loopback_up() -> None:
    siocsifflags, iff_up, iff_loopback, iff_running = 0x8914, 0x1, 0x8, 0x40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", iff_up | iff_loopback | iff_running))


def setup_root(spec: ContainerSpec) -> None:
    """Mount /proc, /dev, /sys, /tmp, volumes and generated files on the union, then make it /."""
    sysns.mount(None, "/", None, MS_REC | sysns.MS_PRIVATE)
    root = Root(spec.root)
    try:
        with root.target("/proc", True) as proc:
            sysns.mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _setup_dev(root)
        try:
            with root.target("/sys", True) as sys_dir:
                sysns.mount("sysfs", sys_dir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except PermissionError:  # rootless without a network namespace of its own: the host's, read-only
            _bind(root, "/sys", "/sys", True, True)
        for path in ["/tmp", *spec.tmpfs]:
            with root.target(path, True) as target:
                sysns.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for path, host_file in spec.etc_files.items():
            _bind(root, host_file, path, False, True)
        for volume in spec.volumes:
            _bind(root, volume.source, volume.target, os.path.isdir(volume.source), volume.read_only)
        _mask(root)
    finally:
        root.close()
    sysns.sethostname(spec.hostname)
    if spec.net_none:
        _loopback_up()
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no way
    # back to the host tree (chroot would: the classic escape works against it).
    os.chdir(spec.root)
    sysns.pivot_root(".", ".")
    sysns.umount(".", sysns.MNT_DETACH)
    os.chdir("/")


def _exec_command(spec: ContainerSpec, syscall_filter: seccomp.Filter | None) -> None:
    """Become the command: new session, no new privileges, podman's capabilities, the user, the
    seccomp filter."""
    os.setsid()
    sysns.prctl(sysns.PR_SET_NO_NEW_PRIVS, 1)
    for cap in range(LAST_CAP + 1):
        if cap not in KEPT_CAPS:
            try:
                sysns.prctl(sysns.PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a capability this kernel does not know
                    raise
    uid, gid, groups = resolve_user(spec.user)
    if (uid, gid, groups) != (0, 0, []):
        try:
            os.setgroups(groups)
        except PermissionError:
            pass  # a user namespace with setgroups denied has no supplementary groups to drop
        os.setgid(gid)
        os.setuid(uid)
    os.chdir(spec.cwd)
    _default_signals()
    if syscall_filter is not None:  # last: it applies to every call after it
        syscall_filter.load()
    try:
        os.execvpe(spec.command[0], spec.command, spec.env)
    except FileNotFoundError:
        print(f"pyunionfs: {spec.command[0]}: command not found", file=sys.stderr)
        os._exit(EXIT_NOT_FOUND)
    except OSError as exc:
        print(f"pyunionfs: {spec.command[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(EXIT_NOT_EXECUTABLE)


def _default_signals() -> None:
    """Every signal at its default action and none blocked, as podman starts a container: the
    launcher's Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec."""
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):  # numbers without a signal behind them
                signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _entries(path: str) -> list[list[str]]:
    """The colon-separated lines of the container's PATH (/etc/passwd, /etc/group), if any."""
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.count(":") >= 3]
    except OSError:
        return []


def resolve_user(user: str) -> tuple[int, int, list[int]]:
    """USER[:GROUP] (names or ids) as uid, gid and supplementary groups, from the container's
    own /etc/passwd and /etc/group, as runc does: a user without a group takes its passwd entry's;
    an id not in passwd is taken as it is, with group 0."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _entries("/etc/passwd")
    entry = next((e for e in passwd if (e[2] if name.isdigit() else e[0]) == name), None)
    if entry is None and not name.isdigit():
        raise OSError(errno.ENOENT, f"unable to find user {name}: no matching entry in /etc/passwd")
    uid = int(name) if name.isdigit() else int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    groups = _entries("/etc/group")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = next((g for g in groups if g[0] == group), None)
            if match is None:
                raise OSError(errno.ENOENT, f"unable to find group {group}: no matching entry in /etc/group")
            gid = int(match[2])
    login = entry[0] if entry is not None else None
    supplementary = sorted({int(g[2]) for g in groups if login and login in g[3].split(",") and g[2].isdigit()})
    return uid, gid, supplementary


def exit_code(status: int) -> int:
    """The shell's convention: the exit code, or 128+N for death by signal N."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def supervise(main_pid: int, watched_fd: int = -1) -> int | None:
    """Forward signals to MAIN_PID and reap every child until MAIN_PID ends: its exit code. As
    PID 1 this is the container's init. WATCHED_FD (a pidfd), once readable, ends the wait
    early: None."""
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda received, _frame: os.kill(main_pid, received))
    if watched_fd < 0:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == main_pid:
                return exit_code(status)
    # Wait for either: a child's end wakes the wait through the signal wakeup fd.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_fd = signal.set_wakeup_fd(wake_w)
    previous_handler = signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        while True:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == main_pid:
                    return exit_code(status)
                if pid == 0:
                    break
            if watched_fd in select.select([wake_r, watched_fd], [], [])[0]:
                return None
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
    finally:
        signal.signal(signal.SIGCHLD, previous_handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(wake_r)
        os.close(wake_w)


def run_in_container(spec: ContainerSpec) -> None:
    """The container's first process (PID 1 of its PID namespace); never returns."""
    code = EXIT_LAUNCHER_ERROR
    try:
        # The caller's open files, and the launcher's, stay out (as runc closes them): only 0-2
        # and the fds asked for with --preserve-fds reach the container.
        os.closerange(3 + spec.preserve_fds, os.sysconf("SC_OPEN_MAX"))
        # Compiled while libseccomp is still in reach: the host's files are gone after setup.
        syscall_filter = seccomp.compile_profile(spec.seccomp, set(KEPT_CAPS.values())) if spec.seccomp else None
        sysns.unshare(sysns.CLONE_NEWNS | sysns.CLONE_NEWUTS | sysns.CLONE_NEWIPC |
                      (sysns.CLONE_NEWNET if spec.net_none else 0))
        setup_root(spec)
        if not spec.init:
            _exec_command(spec, syscall_filter)
        main_pid = os.fork()
        if main_pid == 0:
            _exec_command(spec, syscall_filter)
        code = supervise(main_pid)
    except Exception as exc:  # one line on the container's terminal, never a traceback
        print(f"pyunionfs: setting up the container failed: {exc}", file=sys.stderr)
    finally:
        os._exit(code)
