"""`pyunionfs run`: the union as the root of a command in new namespaces.

Process layout (see shared/reference/launcher-notes.md): the launcher, single-threaded and
without trio or pyfuse3, moves to a private mount namespace (A) and starts the FUSE server there
as a process of its own, so the union is never visible on the host. Its child becomes PID 1 of a
new PID namespace, makes mount namespace B (a child of A), builds the root and pivots into it.
The server stays outside B, and every mount is undone in a `finally`."""
from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field

from unionfs.errors import EXIT_LAUNCHER_ERROR, ConfigError
from unionfs.forkserver import client as fork_client
from unionfs.fs import checks, serve
from unionfs.fs.options import MountConfig
from unionfs.runtime import seccomp, sysns, userns
from unionfs.runtime.container import GENERATED_ETC, KEPT_CAPS, ContainerSpec, run_in_container, supervise

MOUNT_TIMEOUT = 30.0


FUSE_DEVICE_OVERRIDE = "PYUNIONFS_FUSE_DEVICE"  # a usable FUSE device node to bind over /dev/fuse
SCRATCH_PREFIX = "pyunionfs-run."
SERVER_NAME = "pyunionfs-fuse"  # the server's process name (comm), as ps and top show it


@dataclass
class RunConfig:
    lowers: list[str]
    command: list[str]
    upper: str | None = None
    workdir: str | None = None
    rootless: bool = False
    spec: ContainerSpec = field(default_factory=lambda: ContainerSpec(root="", command=[], env={}))
    # Where the run's scratch directory (mountpoint, generated /etc files) goes: the system's
    # temporary directory unless given (a stored container's own directory, so that a launcher
    # killed by SIGKILL leaves nothing outside it).
    scratch_parent: str | None = None


def prepare() -> None:
    """What a resident process (the fork server) does once, so that each container it launches
    starts sooner: the default seccomp filter, compiled."""
    seccomp.compile_profile(seccomp.default(), set(KEPT_CAPS.values()))


@dataclass
class Server:
    """The union's FUSE server, watched through PIDFD: a child of the launcher (CHILD its pid),
    or a fork server's process tied to the launcher by CONNECTION (it unmounts and exits when
    that closes)."""
    pidfd: int
    child: int = -1
    connection: socket.socket | None = None

    def stop(self, unmounted: bool) -> None:
        """Stop it (SIGKILL once the union is unmounted: it has nothing left to write back) and
        wait until it has ended."""
        try:
            if self.child > 0 and os.waitpid(self.child, os.WNOHANG)[0]:
                return  # it ended, and is reaped now
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL if unmounted else signal.SIGTERM)
            if self.child > 0:
                os.waitpid(self.child, 0)
            else:
                select.select([self.pidfd], [], [])
        except (ChildProcessError, ProcessLookupError):
            pass  # reaped already, or gone
        finally:
            os.close(self.pidfd)
            if self.connection is not None:
                self.connection.close()


def _start_server(lowers: list[str], upper: str, workdir: str, mountpoint: str,
                  fork_server: socket.socket | None) -> Server:
    """The FUSE server, in mount namespace A, ended when the launcher ends; once the union is
    mounted. A process of the fork server if it takes it on, else a fork of the launcher."""
    if fork_server is not None:
        argv = ["mount", *[f"--lower={lower}" for lower in lowers], f"--upper={upper}",
                f"--workdir={workdir}", mountpoint]
        # Titled with the launcher's command line, as a server forked by the launcher would be.
        title = " ".join(["pyunionfs", *sys.argv[1:]])
        pidfd, failure = fork_client.serve_attached(fork_server, argv, SERVER_NAME, title)
        if pidfd is not None:
            server = Server(pidfd, connection=fork_server)
            if failure:
                server.stop(unmounted=True)
                raise ConfigError(failure)
            return server
        fork_server.close()
    pid, ready = _fork_server(lowers, upper, workdir, mountpoint)
    server = Server(os.pidfd_open(pid), child=pid)
    try:
        _wait_for_mount(ready)
    except ConfigError:
        server.stop(unmounted=True)
        raise
    return server


def _fork_server(lowers: list[str], upper: str, workdir: str, mountpoint: str) -> tuple[int, int]:
    """The FUSE server as a child that the launcher's death kills: its pid and the pipe it
    reports on. A fork, not a new interpreter: what the launcher imported is not imported again,
    and only the child imports pyfuse3 and trio."""
    ready_r, ready_w = os.pipe()
    config = MountConfig(lowers=lowers, mountpoint=mountpoint, upper=upper, workdir=workdir)
    sys.stdout.flush()  # the child must not write out the launcher's buffered output again
    sys.stderr.flush()
    pid = sysns.fork_dying_with_parent()
    if pid == 0:
        code = EXIT_LAUNCHER_ERROR
        try:
            os.close(ready_r)
            with open("/proc/self/comm", "w") as comm:  # a fork shares the launcher's command line
                comm.write(SERVER_NAME)
            code = serve.serve(config, foreground=True, ready_fd=ready_w)
        except BaseException as exc:  # a bug: one line on the container's terminal, no traceback
            print(f"pyunionfs: the filesystem server failed: {exc!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    return pid, ready_r


def _wait_for_mount(ready_r: int) -> None:
    """Until the server says the union is mounted; it says why not, or its death ends the pipe."""
    try:
        if not select.select([ready_r], [], [], MOUNT_TIMEOUT)[0]:
            raise ConfigError("the filesystem server did not mount the union in time")
        message = os.read(ready_r, 4096).decode(errors="replace")
    finally:
        os.close(ready_r)
    if message != "ok":
        raise ConfigError(message or "the filesystem server did not mount the union")


def _generated_etc(scratch: str, hostname: str) -> dict[str, str]:
    """/etc/hostname and /etc/hosts for the container, and the host's resolv.conf."""
    hostname_path, hosts_path, resolv_path = GENERATED_ETC
    files = {}
    for target, text in ((hostname_path, f"{hostname}\n"),
                         (hosts_path, f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n")):
        path = os.path.join(scratch, os.path.basename(target))
        with open(path, "w") as f:
            f.write(text)
        files[target] = path
    if os.path.exists(resolv_path):
        files[resolv_path] = os.path.realpath(resolv_path)
    return files


def run(config: RunConfig) -> int:
    """Run the command; its exit code, or 125 when the launcher or the filesystem fails."""
    rootless = config.rootless or os.geteuid() != 0
    if bool(config.upper) != bool(config.workdir):
        raise ConfigError("--upper needs --workdir (on the same filesystem), and --workdir needs --upper")
    fuse_device = os.environ.get(FUSE_DEVICE_OVERRIDE, checks.FUSE_DEVICE)
    checks.check_fuse_device(fuse_device)
    for lower in config.lowers:
        if not os.path.isdir(lower):
            raise ConfigError(f"lower directory does not exist: {lower}")
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=config.scratch_parent)
    server: Server | None = None
    # Made before the launcher enters namespaces of its own: the server checks who connects.
    fork_server = fork_client.server_connection()
    mountpoint = os.path.join(scratch, "root")
    try:
        upper = config.upper or os.path.join(scratch, "upper")
        workdir = config.workdir or os.path.join(scratch, "work")
        for path in (upper, workdir, mountpoint):
            os.makedirs(path, exist_ok=True)
        if rootless:
            userns.enter_user_namespace()
        else:
            sysns.unshare(sysns.CLONE_NEWNS)
        sysns.mount(None, "/", None, sysns.MS_REC | sysns.MS_PRIVATE)
        if fuse_device != checks.FUSE_DEVICE:
            sysns.mount(fuse_device, checks.FUSE_DEVICE, None, sysns.MS_BIND)
        server = _start_server(config.lowers, upper, workdir, mountpoint, fork_server)
        fork_server = None  # the server's now, or closed
        spec = config.spec
        spec.root = mountpoint
        spec.command = config.command
        spec.etc_files = {**_generated_etc(scratch, spec.hostname), **spec.etc_files}
        return _run_container(spec, server)
    finally:
        if fork_server is not None:
            fork_server.close()
        _clean_up(mountpoint, server, scratch)


def _run_container(spec: ContainerSpec, server: Server) -> int:
    sysns.unshare(sysns.CLONE_NEWPID)
    child = sysns.fork_dying_with_parent()
    if child == 0:
        run_in_container(spec)  # never returns
    code = supervise(child, watched_fd=server.pidfd)
    if code is None:  # the union is gone: whatever the command does now is not its result
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        print("pyunionfs: the filesystem server died; the container was stopped", file=sys.stderr)
        return EXIT_LAUNCHER_ERROR
    return code


def _clean_up(mountpoint: str, server: Server | None, scratch: str) -> None:
    """Unmount the union (the namespace would keep it, with the server, alive), stop the server,
    remove the scratch directory."""
    unmounted = _unmount(mountpoint)
    if server is not None:
        server.stop(unmounted=unmounted)
    shutil.rmtree(scratch, ignore_errors=True)


def _unmount(mountpoint: str) -> bool:
    """Unmount what is mounted at MOUNTPOINT, lazily if it is busy: whether nothing is left there.
    (No look at /proc/self/mountinfo first: reading it costs a container start a millisecond.)"""
    for flags in (0, sysns.MNT_DETACH):
        try:
            sysns.umount(mountpoint, flags)
            return True
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point: never mounted
                return True
    return False
