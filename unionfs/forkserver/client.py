"""The caller's side of the fork server (server.py). `pyunionfs` imports this before anything
else, so it uses builtin modules only: a mount handed to the server costs the caller little more
than Python's own start.

The caller sends its command line, environment and umask, and fds of its working and root
directories, its stdio and its user and mount namespaces (SCM_RIGHTS). The server forks a
process that takes all of these on (and its cgroups, limits and priorities: caller.py) and runs
the command: a mount that daemonizes, or a container (`pyunionfs run`); the caller relays its
exit code, and for a container the signals it gets. Where the server is absent, declines, or
cannot be reached safely, the caller does the work the slow way (and starts a server for next
time)."""
from __future__ import annotations

import _signal
import _socket
import os
import stat
import sys

from unionfs.errors import EXIT_LAUNCHER_ERROR, FORWARDED_SIGNALS

DISABLE = "PYUNIONFS_FORK_SERVER"  # "off": never use it
DIRECTORY = "PYUNIONFS_FORK_SERVER_DIR"  # where the servers' directories go, instead of the default
IDLE_SECONDS = 300  # a server started on first use exits after this long without a request
PROTOCOL = 2
INITIAL_USER_NS = 0xEFFFFFFD  # the kernel's PROC_USER_INIT_INO
SOCKET, LOCK, PID = "socket", "lock", "pid"


def _fnv1a(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


# Which pyunionfs this is (where its code is): two installations of one user never share a
# server, which would run the other's code.
INSTALLATION = f"{_fnv1a(os.fsencode(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))) >> 32:08x}"
SUN_PATH_MAX = 107  # a unix socket's path, less its NUL
# Mounts that stay in the foreground are served by the caller itself: it is the server.
FOREGROUND_FLAGS = frozenset({"-f", "-d", "--debug", "-h", "--help"})
# What a request asks of the server's process: to mount and daemonize, to serve a mount for a
# caller that stays (the launcher's FUSE server), or to run a container as `pyunionfs run`.
MOUNT, ATTACHED, RUN = "mount", "attached", "run"


def location(create: bool = True) -> str | None:
    """The directory of this user's server in this user namespace (made if CREATE), or None if
    it is missing or could be someone else's: it must be a directory of ours that only we can use."""
    euid = os.geteuid()
    userns = os.stat("/proc/self/ns/user").st_ino
    base = os.environ.get(DIRECTORY)
    if not base:
        if euid == 0 and userns == INITIAL_USER_NS:
            base = "/run/pyunionfs"
            if create:
                os.makedirs(base, 0o755, exist_ok=True)
        else:
            base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    path = os.path.join(base, f"pyunionfs-fork-{euid}-{userns}-{INSTALLATION}")
    try:
        if create:
            os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != euid or info.st_mode & 0o077:
        return None
    return path


def is_background_mount(argv: list[str]) -> bool:
    """Whether ARGV may be a mount that daemonizes (the server has the last word): `mount ...`,
    or the mount-helper form, which always has -o."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    if not words or FOREGROUND_FLAGS.intersection(words):
        return False
    return words[0] == "mount" or any(word.startswith("-o") for word in words)


def mount(argv: list[str]) -> int | None:
    """Run the mount ARGV in a process of the fork server: its exit code; or None if the caller
    must mount by itself (not a background mount, no server yet, or the server declined), in
    which case nothing has been done."""
    if not is_background_mount(argv):
        return None
    connection = server_connection()
    if connection is None:
        return None
    try:
        return request(connection, argv)
    finally:
        connection.close()


def is_container_run(argv: list[str]) -> bool:
    """Whether ARGV is `[--root DIR] run ...`."""
    if argv[:1] == ["--root"]:
        argv = argv[2:]
    return argv[:1] == ["run"]


def run_container(argv: list[str]) -> int | None:
    """Run the container ARGV (`[--root DIR] run ...`) in a process of the fork server, passing
    on the signals the launcher forwards: its exit code; or None if the caller must run it by
    itself (no server yet, or it declined), in which case nothing has been done."""
    connection = server_connection()
    if connection is None:
        return None
    try:
        launcher = _send(connection, argv, RUN, None)
        if launcher is None:
            return None
        for signum in FORWARDED_SIGNALS:
            _signal.signal(signum, lambda received, _frame: _forward(launcher, received))
        try:
            reply = connection.recv(32)
        except OSError:
            reply = b""
        if reply.startswith(b"exit "):
            return int(reply[5:])
        print("pyunionfs: the container's launcher ended without an exit status", file=sys.stderr)
        return EXIT_LAUNCHER_ERROR
    finally:
        connection.close()


def _forward(pidfd: int, signum: int) -> None:
    try:
        _signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass  # it has ended; its exit status is on the way


def server_connection() -> _socket.socket | None:
    """A connection this user's server has accepted; None where it is turned off, there is no
    safe directory for it, or none runs yet (one is started for next time)."""
    if os.environ.get(DISABLE) == "off":
        return None
    try:
        where = location()
    except OSError:
        return None
    if where is None:
        return None
    connection = connect(where)
    if connection is None:
        start_server()
    return connection


def connect(where: str) -> _socket.socket | None:
    """A connection the server in WHERE has accepted, or None if there is none to talk to."""
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        with_socket_path(where, connection.connect)
        if connection.recv(16) == b"hello":  # it checked who we are
            return connection
    except OSError:
        pass
    connection.close()
    return None


def with_socket_path(where: str, use) -> None:
    """USE(the path of the socket in WHERE): through the directory's fd when the path is longer
    than a unix socket address takes."""
    path = os.path.join(where, SOCKET)
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        use(path)
        return
    fd = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        use(f"/proc/self/fd/{fd}/{SOCKET}")
    finally:
        os.close(fd)


def request(connection: _socket.socket, argv: list[str]) -> int | None:
    """Send the mount ARGV, which daemonizes; its exit code, or None if the server declined it."""
    pidfd = _send(connection, argv, MOUNT, None)
    if pidfd is None:
        return None
    os.close(pidfd)
    reason = _outcome(connection)
    if reason:
        print(f"pyunionfs: {reason}", file=sys.stderr)
        return 1
    return 0


def serve_attached(connection: _socket.socket, argv: list[str], name: str, title: str) -> tuple[int | None, str]:
    """Have the server's process serve the mount ARGV for this caller, as a process named NAME
    with TITLE as its command line, that unmounts and exits once CONNECTION closes (so when the
    caller ends). A pidfd of it, or None if the server declined; and why the mount failed (""
    once it is live)."""
    pidfd = _send(connection, argv, ATTACHED, (name, title))
    return pidfd, "" if pidfd is None else _outcome(connection)


def _send(connection: _socket.socket, argv: list[str], kind: str, title: tuple[str, str] | None) -> int | None:
    """Send the request of KIND (TITLE: an attached server's process name and title); a pidfd of
    the process that took it on (sent with the answer: no pid can be reused in between), or None
    if none did."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    opened = [os.open(".", os.O_PATH | flags), os.open("/", os.O_PATH | flags),
              os.open("/proc/self/ns/user", flags), os.open("/proc/self/ns/mnt", flags)]
    try:
        umask = os.umask(0)
        os.umask(umask)
        message = repr((PROTOCOL, kind, argv, dict(os.environ), umask, title)).encode()
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in [*opened, 0, 1, 2])
        connection.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        reply, ancillary, _, _ = connection.recvmsg(32, _socket.CMSG_SPACE(4))
    except OSError:  # a closed stdio fd, a server that went away: nothing was done
        return None
    finally:
        for fd in opened:
            os.close(fd)
    received = [int.from_bytes(data[:4], sys.byteorder) for level, message_type, data in ancillary
                if level == _socket.SOL_SOCKET and message_type == _socket.SCM_RIGHTS and len(data) >= 4]
    if reply == b"go" and received:
        return received[0]
    for fd in received:
        os.close(fd)
    return None


def _outcome(connection: _socket.socket) -> str:
    """What the process serving the mount says: "" once it is live, else why it is not."""
    try:
        reply = connection.recv(4096)
    except OSError:
        reply = b""
    if reply == b"ok":
        return ""
    return reply.decode(errors="replace") or "the filesystem server ended before the mount was live"


def start_server() -> None:
    """Start a server for the next mount (this one goes on without it): detached, in a
    session of its own, with room in its environment for the process titles of the servers it
    forks (which it writes over its own command line)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            environment = dict(os.environ, PYUNIONFS_TITLE_ROOM="." * 8192)
            # -P: `-m` would put the working directory first on the module path, and a unionfs
            # package there (another checkout, or one planted where root works) would be run.
            os.execve(sys.executable, [sys.executable, "-P", "-m", "unionfs.cli", "fork-server",
                                       "--idle", str(IDLE_SECONDS)], environment)
    finally:
        os._exit(0)
