"""The resident side of the fork server (see client.py for the caller's).

One per user and user namespace, started on first use or as a service (`pyunionfs fork-server`).
It imports what a FUSE server and the container launcher need, then listens on a unix socket that
only its user can reach (a 0700 directory; SO_PEERCRED, and the caller's effective capabilities
must cover its own). It keeps one forked spare process, single-threaded, that has rehearsed a
request (_rehearse) and waits for the next caller; the server forks the next one once that caller
has its answer (or a little later: FORK_DELAY). The spare takes on that caller's cgroups, limits
and priorities (caller.py), enters its user and mount namespaces (setns), root and working
directory, takes on its stdio, environment and umask, and runs the command, with a process title
of that command: it is the new FUSE server (or daemonizes one), or the container's launcher,
which the caller's end ends (as it would end the caller's own launcher). A request it cannot take
on (another command, a foreground mount, a context it cannot enter or take on) is declined before
anything is done, and the caller does it the slow way; where the caller's limits or priority are
beyond the server's processes, the server exits too, and the caller starts one of its own."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import os
import select
import shutil
import signal
import socket
import struct
import sys
import time
from typing import Any, Callable, NoReturn, Optional, Protocol, Union

import setproctitle

from unionfs import present
from unionfs.errors import ConfigError
from unionfs.forkserver import caller, client
from unionfs.fs import shim
from unionfs.runtime import sysns

SO_PEERPIDFD = 77  # Linux 6.5: the peer's pidfd, so that its /proc entry is surely its own
_OWN_USER_NS = os.stat("/proc/self/ns/user").st_ino
_OWN_CAPABILITIES = caller.effective_capabilities(caller.own_status())
CONTEXT_FDS = 7  # cwd, root, user ns, mount ns, stdin, stdout, stderr (client.request)
MAX_FDS = 16


class MountRequest(Protocol):
    """A mount as the command line's front (unionfs/cli.py) reads it."""
    foreground: bool

    def rehearse(self, interrupted: Callable[[], bool]) -> None: ...

    def serve_forked(self, ready_fd: int, answered_fd: int) -> int: ...

    def serve_attached(self, ready_fd: int, lifeline_fd: int, answered_fd: int) -> int: ...


class RunRequest(Protocol):
    """A container run (`pyunionfs [--root DIR] run ...`) as the command line's front reads it."""
    preserve_fds: int

    def run(self) -> int: ...


# What reads a command line, for each kind of request (client.MOUNT, client.RUN): its mount or
# run, None if it is none; ConfigError for bad arguments (unionfs/cli.py's mount_request, run_request).
Readers = dict[str, Callable[[list[str]], Optional[Union[MountRequest, RunRequest]]]]


class Declined(Exception):
    """The request is not for a forked server; the caller does it itself."""


def run(idle: float, readers: Readers) -> int:
    """Serve requests until IDLE seconds pass without one (0: forever) or SIGTERM/SIGINT."""
    where = client.location()
    if where is None:
        raise ConfigError("no private directory for the fork server (see PYUNIONFS_FORK_SERVER_DIR)")
    lock = os.open(os.path.join(where, client.LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # one is serving already
    shim.load()  # before pyfuse3, as in every server
    import pyfuse3  # noqa: F401  (what the forks must not pay for again)
    import trio  # noqa: F401
    from unionfs.fs import daemon  # noqa: F401
    from unionfs.runtime import containers, launcher  # noqa: F401

    launcher.prepare()

    code_files = _code_files()
    # What is imported now is shared with every fork: keep the collector from touching (and so
    # copying) it in each of them.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        os.unlink(os.path.join(where, client.SOCKET))
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o077)
    try:
        client.with_socket_path(where, listener.bind)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    # A handler that raises (sys.exit, KeyboardInterrupt) may run inside an at-fork callback of
    # os.fork, where Python ignores what it raises: the server would go on as if never signalled.
    # So the handlers do nothing and the C handler's wakeup byte, read in the loop, decides.
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    previous = {signum: signal.signal(signum, _noted) for signum in _WATCHED}
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    with open(os.path.join(where, client.PID), "w") as pid_file:
        pid_file.write(f"{os.getpid()}\n")
    setproctitle.setproctitle("pyunionfs fork-server")
    stage = _make_stage(where)
    spare = Spare(listener, lock, readers, stage, code_files, (wake_r, wake_w), previous)
    waiting = -1  # the spare that waits for a caller (-1: none)
    answering = -1  # the pipe of the spare that took the last caller, until it has answered (-1: none)
    fork_at = 0.0  # when the next spare is forked (see FORK_DELAY), or at once when a caller connects
    quiet_since = time.monotonic()  # when the last caller had its answer (or the server started)
    try:
        while True:
            if waiting < 0 and answering < 0 and time.monotonic() >= fork_at:
                waiting, taken = spare.start()
                deadline = time.monotonic() + idle if idle else None
            if answering >= 0:
                watched, until = answering, answered_by
            elif waiting < 0:
                watched, until = listener.fileno(), fork_at
            else:
                watched, until = taken, deadline
            timeout = None if until is None else max(0.0, until - time.monotonic())
            ready = select.select([watched, wake_r], [], [], timeout)[0]
            if wake_r in ready:
                signums = _drain(wake_r)
                _reap()
                if signums & {signal.SIGTERM, signal.SIGINT}:
                    break
                continue
            if answering >= 0:  # answered (end of file), gone, or slower than ANSWER_WAIT
                retire = bool(ready) and os.read(answering, 1) == RETIRE
                os.close(answering)
                answering = -1
                if retire:
                    break
                now = time.monotonic()
                fork_at = now + FORK_DELAY if connected - quiet_since >= FORK_DELAY else now
                quiet_since = now
                continue
            if waiting < 0:  # the delay is over, or a caller connected: fork its spare now
                fork_at = 0.0
                continue
            note = os.read(taken, 1) if ready else b""
            if ready:
                waiting = -1  # serving, or gone
            if note != TAKEN:
                os.close(taken)
                break  # idle, new code (the next caller starts a new server), or a spare that died
            connected = time.monotonic()
            answering, answered_by = taken, connected + ANSWER_WAIT
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)
        if waiting > 0:
            _end(waiting)
        for name in (client.SOCKET, client.PID):
            try:
                os.unlink(os.path.join(where, name))
            except FileNotFoundError:
                pass
        listener.close()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        os.close(lock)
    return 0


_WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def _noted(signum: int, frame: object) -> None:
    """The Python side of a watched signal: nothing (its wakeup byte is read in the loop)."""


def _drain(fd: int) -> set[int]:
    """The signal numbers written to the wakeup pipe FD since it was last read."""
    signums: set[int] = set()
    try:
        while chunk := os.read(fd, 256):
            signums.update(chunk)
    except BlockingIOError:
        pass
    return signums


# What a spare tells the server when a caller connects: it took the request on, or the server's
# code is stale (it exits; the caller starts a new one). After TAKEN, the spare closes the pipe
# once its caller has its answer (the mount is live, or the launcher started), or after at most
# ANSWER_WAIT seconds the server goes on all the same; or it says RETIRE first (see
# caller.Unreachable): the server exits, and the caller starts one of its own.
TAKEN, STALE, RETIRE = b"t", b"s", b"r"
ANSWER_WAIT = 1.0
# The next spare is forked once the last caller has its answer (before, it would take the CPU the
# caller's mount waits for), and FORK_DELAY seconds later where callers come less often than
# that: the fork and the spare's first steps (some 8 ms of CPU here) would take it from the
# caller's container as it starts (`podman run --rm true` every ~0.4 s: 1.07x fuse-overlayfs's time
# with the fork at once, 1.04x with it 0.1 s later; back to back, where the delayed fork meets the
# next run's start, no difference could be measured). A caller that connects in the meantime has
# its spare forked at once, and so has the next (callers in quick succession find a rehearsed spare).
FORK_DELAY = 0.1
# How long a spare waits for a caller, its rehearsal's union open, before it rehearses requests:
# the caller just answered sends its first requests now, which that CPU would be taken from.
QUIET = 0.05


@dataclasses.dataclass
class Spare:
    """What forking the process that serves the next caller takes from the server."""
    listener: socket.socket
    lock: int
    readers: Readers
    stage: str | None  # where it rehearses (see _make_stage); None: it does not
    code_files: dict[str, int]
    server_fds: tuple[int, ...]  # the server's own: its wakeup pipe
    handlers: dict[int, Any]  # the signal handlers from before the server's own

    def start(self) -> tuple[int, int]:
        """Fork the spare: its pid, and a pipe on which it says TAKEN or STALE once a caller has
        connected (end of file: it died), and which it closes once it has answered that caller."""
        taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
        server = os.getpid()
        spare = os.fork()
        if spare:
            os.close(taken_w)
            return spare, taken_r
        code = 1
        try:
            # While it waits, it goes with the server: another parent means the server is gone already.
            sysns.prctl(sysns.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != server:
                return
            signal.set_wakeup_fd(-1)
            for signum, handler in self.handlers.items():
                signal.signal(signum, handler)
            # The server's lock is held as long as any process has it open: a FUSE server that
            # kept it would keep the next fork server from starting after this one exits.
            for fd in (self.lock, taken_r, *self.server_fds):
                os.close(fd)
            setproctitle.setproctitle("pyunionfs fork-server spare")
            if self.stage is not None and not self._caller_waits():
                _rehearse(self.readers, self.stage, self._requests_interrupted())
            connection, _ = self.listener.accept()
            sysns.prctl(sysns.PR_SET_PDEATHSIG, 0)  # it serves now: it outlives the server
            self.listener.close()
            stale = _stale(self.code_files)
            os.write(taken_w, STALE if stale else TAKEN)
            if not stale:
                try:
                    request = _take(connection)
                except (OSError, ValueError, RecursionError, MemoryError):
                    request = None  # a caller that went away, or a malformed request
                if request is not None:
                    _serve_request(connection, *request, self.readers, taken_w)  # does not return
            connection.close()
            code = 0
        finally:
            os._exit(code)


    def _caller_waits(self, within: float = 0.0) -> bool:
        """Does a caller wait to be accepted, or come WITHIN seconds?"""
        return bool(select.select([self.listener], [], [], within)[0])

    def _requests_interrupted(self) -> Callable[[], bool]:
        """The rehearsal's INTERRUPTED: its union is opened at once, then asked whether to stop
        before the requests, which wait QUIET seconds for a caller first, and between them."""
        asked = False

        def interrupted() -> bool:
            nonlocal asked
            within, asked = (0.0 if asked else QUIET), True
            return self._caller_waits(within)
        return interrupted


def _end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass  # reaped already


# The rehearsal's union (see _rehearse): a lower layer with a directory and a file in it, an upper
# layer, a work directory and a mount point, in the server's directory.
STAGE = "rehearsal"
_STAGE_DIRS = ("lower", "lower/etc", "upper", "work", "mnt")


def _make_stage(where: str) -> str | None:
    """The rehearsal's union in WHERE, made anew; None if it cannot be made (no rehearsals)."""
    stage = os.path.join(where, STAGE)
    shutil.rmtree(stage, ignore_errors=True)  # a server that died left it
    try:
        os.mkdir(stage, 0o700)
        for name in _STAGE_DIRS:
            os.mkdir(os.path.join(stage, name), 0o700)
        hostname = os.path.join(stage, "lower", "etc", "hostname")
        os.close(os.open(hostname, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
        return None
    return stage


def _rehearse(readers: Readers, stage: str, interrupted: Callable[[], bool]) -> None:
    """Do, in a spare, what serving a mount does up to the mount and after it, on the union in
    STAGE, until INTERRUPTED() (a caller waits): read a mount's command line, take on this
    process's own context, open the union, answer requests on it (daemon.rehearse) and close
    it. A fork shares every page with the server until one side writes to it, and Python writes
    to every object it uses (reference counts): those pages are copied now, while no caller
    waits for it (some 7 ms of page faults per mount here, and 3 ms more in the mount's first
    requests). It changes nothing a request would see; if it fails, the request goes on all the
    same. Only the spare that waits for a caller rehearses: one at a time."""
    lower, upper, work, mountpoint = (os.path.join(stage, name) for name in ("lower", "upper", "work", "mnt"))
    opened: list[int] = []
    try:
        readers[client.RUN](["run", "--lower", lower, "--", "true"])
        served = readers[client.MOUNT]([mountpoint, "-o", f"lowerdir={lower},upperdir={upper},workdir={work}"])
        flags = os.O_RDONLY | os.O_CLOEXEC
        opened = [os.open(".", os.O_PATH | flags), os.open("/", os.O_PATH | flags),
                  os.open("/proc/self/ns/user", flags), os.open("/proc/self/ns/mnt", flags),
                  os.pidfd_open(os.getpid())]
        caller.take_on(os.getpid(), opened[-1], caller.status("self"))
        _enter_context(opened)
        if served is not None:
            served.rehearse(interrupted)
    except Exception:  # noqa: BLE001  (only a rehearsal)
        pass
    finally:
        for fd in opened:
            os.close(fd)
        with contextlib.suppress(OSError):
            for name in os.listdir(upper):  # what it copied up: the next one copies it up again
                shutil.rmtree(os.path.join(upper, name), ignore_errors=True)


def stop() -> int:
    """Stop this user's server, if one runs."""
    where = client.location(create=False)
    if where is not None:
        _stop_server_in(where)
    return 0


def stop_all(base: str) -> None:
    """Stop every server whose directory is in BASE (a PYUNIONFS_FORK_SERVER_DIR), whoever's:
    what a test session or a benchmark that gave them that directory does at its end."""
    for entry in os.scandir(base):
        _stop_server_in(entry.path)


def _stop_server_in(where: str) -> None:
    """SIGTERM to the server whose directory is WHERE, if one runs; then wait until it is gone."""
    try:
        with open(os.path.join(where, client.PID)) as pid_file:
            pidfd = os.pidfd_open(int(pid_file.read()))
    except (OSError, ValueError):
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        select.select([pidfd], [], [], 10)  # readable once it has exited
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _code_files() -> dict[str, int]:
    """The modification times of the pyunionfs code this process runs: a server that runs old
    code after an upgrade or a checkout would be wrong."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.abspath(path).startswith(root + os.sep):
            files[path] = os.stat(path).st_mtime_ns
    return files


def _stale(files: dict[str, int]) -> bool:
    try:
        return any(os.stat(path).st_mtime_ns != mtime for path, mtime in files.items())
    except OSError:
        return True


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _trusted(connection: socket.socket) -> tuple[int, int, dict[str, str]] | None:
    """The caller's pid, a pidfd of it and its caller.status(), if it is this user, in this user
    namespace, with at least this process's effective capabilities (a root process that dropped
    some must not get them back through us); else None."""
    pid, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.geteuid():
        return None
    try:
        pidfd = connection.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:  # before Linux 6.5
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
    try:
        status = caller.status(pid)
        if (os.stat(f"/proc/{pid}/ns/user").st_ino == _OWN_USER_NS
                and not _OWN_CAPABILITIES & ~caller.effective_capabilities(status)):
            signal.pidfd_send_signal(pidfd, 0)  # still the process we looked at
            return pid, pidfd, status
    except OSError:
        pass
    os.close(pidfd)
    return None


def _take(connection: socket.socket) -> tuple[int, dict[str, str], list[int], tuple[
        str, list[str], dict[str, str], int, tuple[str, str] | None]] | None:
    """Check the caller and read its request: its pid and status, the fds it sent (after a pidfd
    of it) and what it asks (see _serve_request); None for a caller or a request to turn away."""
    trusted = _trusted(connection)
    if trusted is None:
        return None
    pid, pidfd, status = trusted
    fds: list[int] = [pidfd]  # left open when turned away: the spare exits
    connection.send(b"hello")
    message, ancillary, _, _ = connection.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
    for level, message_type, data in ancillary:
        if level == socket.SOL_SOCKET and message_type == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    if len(fds) < 1 + CONTEXT_FDS:
        return None
    request = _parse(message)
    return None if request is None else (pid, status, fds, request)


def _parse(message: bytes) -> tuple[str, list[str], dict[str, str], int, tuple[str, str] | None] | None:
    """The kind, argv, environment, umask and title (None: none) of a request as
    client.request_message writes it; None if it is not one. The caller's arguments and
    environment need not be UTF-8: they are decoded as the file system's names are."""
    fields = message.split(b"\0")
    if len(fields) < 7 or fields.pop() != b"":  # each field ends with a NUL
        return None
    protocol, kind, umask, name, title, count = fields[:6]
    try:
        kind, argc, mask = kind.decode(), int(count), int(umask)
        if (protocol != b"%d" % client.PROTOCOL or kind not in (client.MOUNT, client.ATTACHED, client.RUN)
                or not 0 <= argc <= len(fields) - 6 or not 0 <= mask <= 0o777):
            return None
        environment = dict(map(os.fsdecode, entry.split(b"=", 1)) for entry in fields[6 + argc:])
        titled = (name.decode(), title.decode()) if name else None
    except ValueError:  # not a number, not UTF-8, an entry without "="
        return None
    return kind, [os.fsdecode(word) for word in fields[6:6 + argc]], environment, mask, titled


def _serve_request(connection: socket.socket, pid: int, status: dict[str, str], fds: list[int],
                   request: tuple[str, list[str], dict[str, str], int, tuple[str, str] | None],
                   readers: Readers, answered_fd: int) -> NoReturn:
    """In the spare: take on the caller's context (PID, its STATUS, FDS: its pidfd and the context
    fds client._send sent) and serve REQUEST (client._send's kind, argv, environment, umask and
    title), or decline; close ANSWERED_FD once the caller has its answer."""
    kind, argv, environment, umask, title = request
    started = False
    code = 1
    try:
        try:
            caller.take_on(pid, fds[0], status)
        except caller.Unreachable:
            os.write(answered_fd, RETIRE)
            connection.send(client.RETIRED)
            raise Declined from None
        except caller.Unlike:
            raise Declined from None
        _enter_context(fds[1:])
        _take_environment(environment)
        os.umask(umask)
        served = _read(readers[client.RUN if kind == client.RUN else client.MOUNT], argv)
        if served.foreground if kind != client.RUN else served.preserve_fds:
            raise Declined  # a foreground mount's server is the caller; the caller's other fds are not here
        for target, fd in zip((0, 1, 2), fds[5:8]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        name, title = title or ("pyunionfs", " ".join(["pyunionfs", *argv]))
        if kind == client.RUN:
            code = _launch(connection, served, argv, title, answered_fd)
        else:
            _say_go(connection, os.pidfd_open(os.getpid()))
            started = True
            present.set_title(name, title)
            # It says "ok" on the connection, or what failed.
            if kind == client.ATTACHED:
                code = served.serve_attached(os.dup(connection.fileno()), connection.detach(), answered_fd)
            else:
                code = served.serve_forked(connection.detach(), answered_fd)
    except BaseException as exc:  # noqa: BLE001  (declined, or a bug: one line, never a traceback)
        if started and not isinstance(exc, SystemExit):
            print(f"pyunionfs: {exc!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _take_environment(environment: dict[str, str]) -> None:
    """Make os.environ ENVIRONMENT, changing only what differs: clear() and update() would unset
    and set each variable, one call each (half a millisecond for 35)."""
    for name in [name for name in os.environ if name not in environment]:
        del os.environ[name]
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _read(reader: Callable[[list[str]], Optional[Union[MountRequest, RunRequest]]],
          argv: list[str]) -> Union[MountRequest, RunRequest]:
    try:
        served = reader(argv)
    except ConfigError:
        raise Declined from None  # the caller says what is wrong, as it would without us
    if served is None:
        raise Declined
    return served


def _say_go(connection: socket.socket, pidfd: int) -> None:
    """Tell the caller its request is taken on, by the process PIDFD refers to (closed after)."""
    try:
        connection.sendmsg([b"go"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pidfd))])
    finally:
        os.close(pidfd)


def _launch(connection: socket.socket, request: RunRequest, argv: list[str], title: str, answered_fd: int) -> int:
    """Be the container's launcher, as the caller would have run it, with the caller's command
    line; the caller gets its exit status. The caller's end ends it as it would end a launcher of
    the caller's own: the connection closing raises SIGIO here (O_ASYNC), whose default action
    ends the process, and the FUSE server and the container's init with it (PR_SET_PDEATHSIG).
    ANSWERED_FD is closed once it starts: its mount asks the next spare."""
    present.set_title("pyunionfs", title)
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    fcntl.fcntl(connection, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(connection, fcntl.F_SETFL, fcntl.fcntl(connection, fcntl.F_GETFL) | os.O_ASYNC)
    _say_go(connection, os.pidfd_open(os.getpid()))
    os.close(answered_fd)
    if select.select([connection], [], [], 0)[0]:  # the caller sends nothing more: it is gone
        return 1
    os.environ[client.DISABLE] = "off"  # its FUSE server is a fork of it, already imported
    sys.argv = ["pyunionfs", *argv]
    code = request.run()
    sys.stdout.flush()
    sys.stderr.flush()
    connection.send(b"exit %d" % code)
    return code


def _enter_context(fds: list[int]) -> None:
    """Join the caller's user and mount namespaces, root and working directory. Raises Declined
    where this process may not (the kernel's checks on setns and chroot decide)."""
    cwd, root, userns, mntns = fds[:4]
    try:
        for fd, kind, own in ((userns, sysns.CLONE_NEWUSER, "user"), (mntns, sysns.CLONE_NEWNS, "mnt")):
            if os.fstat(fd).st_ino != os.stat(f"/proc/self/ns/{own}").st_ino:
                sysns.setns(fd, kind)
        root_info, own_root = os.fstat(root), os.stat("/")
        if (root_info.st_dev, root_info.st_ino) != (own_root.st_dev, own_root.st_ino):
            os.fchdir(root)
            os.chroot(".")
        os.fchdir(cwd)
    except OSError:
        raise Declined from None
