"""The caller's side of the fork server (server.py), in Python: what the launcher uses to have
the server's process serve a container's mount (serve_attached), and what finds, reaches and
starts a server. The pyunionfs command itself is a C program (csrc/front.c) that speaks the same
protocol for mounts that daemonize and container runs, so that those never wait for Python.

The caller sends its command line, environment and umask, and fds of its working and root
directories, its stdio and its user and mount namespaces (SCM_RIGHTS). The server forks a
process that takes all of these on (and its cgroups, limits and priorities: caller.py) and runs
the command. Where the server is absent, declines, or cannot be reached safely, the caller does
the work the slow way (and starts a server for next time)."""
from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Mapping

DISABLE = "PYUNIONFS_FORK_SERVER"  # "off": never use it
DIRECTORY = "PYUNIONFS_FORK_SERVER_DIR"  # where the servers' directories go, instead of the default
IDLE_SECONDS = 300  # a server started on first use exits after this long without a request
PROTOCOL = 4  # csrc/front.c speaks it too
INITIAL_USER_NS = 0xEFFFFFFD  # the kernel's PROC_USER_INIT_INO
SOCKET, LOCK, PID = "socket", "lock", "pid"
# The server's answer to a request it declines because it cannot take on the caller's limits or
# priority: it exits, and the caller starts a server of its own (see caller.Unreachable).
RETIRED = b"retired"


def _fnv1a(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


# Which pyunionfs this is: the Python installation (its prefix) and PYTHONPATH, which decide the
# code `python -m unionfs.cli` runs, and which the command (csrc/front.c) knows without Python. Two
# installations of one user never share a server, which would run the other's code.
_PYTHON = os.fsencode(sys.prefix) + b"\0" + os.environb.get(b"PYTHONPATH", b"")
INSTALLATION = f"{_fnv1a(_PYTHON) >> 32:08x}"
SUN_PATH_MAX = 107  # a unix socket's path, less its NUL
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


def server_connection() -> socket.socket | None:
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


def connect(where: str) -> socket.socket | None:
    """A connection the server in WHERE has accepted, or None if there is none to talk to."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
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


def serve_attached(connection: socket.socket, argv: list[str], name: str, title: str) -> tuple[int | None, str]:
    """Have the server's process serve the mount ARGV for this caller, as a process named NAME
    with TITLE as its command line, that unmounts and exits once CONNECTION closes (so when the
    caller ends). A pidfd of it, or None if the server declined; and why the mount failed (""
    once it is live)."""
    pidfd = _send(connection, argv, ATTACHED, (name, title))
    return pidfd, "" if pidfd is None else _outcome(connection)


def request_message(kind: str, umask: int, title: tuple[str, str] | None, argv: list[str],
                    environment: Mapping[bytes, bytes]) -> bytes:
    """A request as server._take reads it (and csrc/front.c writes it): fields that each end with
    a NUL, which no argument or environment entry holds: PROTOCOL, KIND, UMASK, the served
    process's name and title (empty: the server makes them), the number of arguments, ARGV, then
    each NAME=VALUE of ENVIRONMENT."""
    name, text = title or ("", "")
    fields = [b"%d" % PROTOCOL, kind.encode(), b"%d" % umask, name.encode(), text.encode(), b"%d" % len(argv),
              *map(os.fsencode, argv), *(b"%s=%s" % entry for entry in environment.items())]
    return b"\0".join(fields) + b"\0"


def _send(connection: socket.socket, argv: list[str], kind: str, title: tuple[str, str] | None) -> int | None:
    """Send the request of KIND (TITLE: an attached server's process name and title); a pidfd of
    the process that took it on (sent with the answer: no pid can be reused in between), or None
    if none did."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    opened = [os.open(".", os.O_PATH | flags), os.open("/", os.O_PATH | flags),
              os.open("/proc/self/ns/user", flags), os.open("/proc/self/ns/mnt", flags)]
    try:
        umask = os.umask(0)
        os.umask(umask)
        message = request_message(kind, umask, title, argv, os.environb)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in [*opened, 0, 1, 2])
        connection.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        reply, ancillary, _, _ = connection.recvmsg(32, socket.CMSG_SPACE(4))
    except OSError:  # a closed stdio fd, a server that went away: nothing was done
        return None
    finally:
        for fd in opened:
            os.close(fd)
    received = [int.from_bytes(data[:4], sys.byteorder) for level, message_type, data in ancillary
                if level == socket.SOL_SOCKET and message_type == socket.SCM_RIGHTS and len(data) >= 4]
    if reply == b"go" and received:
        return received[0]
    if reply == RETIRED:
        start_server()
    for fd in received:
        os.close(fd)
    return None


def _outcome(connection: socket.socket) -> str:
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
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the caller's stays open in it
            environment = dict(os.environ, PYUNIONFS_TITLE_ROOM="." * 8192)
            # -P: `-m` would put the working directory first on the module path, and a unionfs
            # package there (another checkout, or one planted where root works) would be run.
            os.execve(sys.executable, [sys.executable, "-P", "-m", "unionfs.cli", "fork-server"], environment)
    finally:
        os._exit(0)
