"""Mounting and serving a union: the FUSE session, daemonizing, signals and unmounting."""
from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import stat
import sys
import types
from typing import Callable

import pyfuse3
import trio

from unionfs.fs import checks, shim
from unionfs.fs.ops import DOT_ENTRIES, UnionOperations
from unionfs.fs.inodes import AttrView
from unionfs.fs.layers import LayerStack, privileged
from unionfs.fs.passthrough import MAX_STACK_DEPTH
from unionfs.errors import ConfigError
from unionfs.fs.options import MountConfig
from unionfs.fs.union import Union

log = logging.getLogger("pyunionfs")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Allocations between collections of the youngest objects (Python's default: 700). A listing makes
# several objects per entry, nearly all kept (nodes), which the default threshold traverses again
# and again: 7-13% of a listing's CPU, 3-4% with these thresholds.
GC_THRESHOLDS = (50_000, 20, 10)


def open_union(config: MountConfig) -> Union:
    """Check CONFIG and open its layers; nothing is mounted yet."""
    checks.validate(config)
    try:
        stack = LayerStack(config.lowers, config.upper, user_xattr=config.user_xattr,
                           xattr_permissions=config.xattr_permissions)
        uids, gids = config.id_maps()
        view = AttrView(config.timeout, uids, gids, config.static_nlink)
        return Union(stack, None if config.read_only else config.workdir, view,
                     redirect_dirs=config.redirect_dirs, sync=config.sync, xattrs=config.xattrs)
    except OSError as exc:
        raise ConfigError(f"cannot open layer {exc.filename}: {exc.strerror}") from None


def rehearse(config: MountConfig, interrupted: Callable[[], bool]) -> None:
    """Open CONFIG's union, answer on it, without a mount and with the shim detached, the kinds of
    request a container's start sends, and close it; stop early once INTERRUPTED() is true. A
    fork server's spare does this on a throwaway union before its caller comes: Python writes to
    every object it uses (reference counts, specialized bytecode), a fork copies each page written
    to, and the caller's mount and first requests would wait for that copying otherwise."""
    with shim.detached():
        union = open_union(config)
        try:
            if not interrupted():
                trio.run(_answer_rehearsal, UnionOperations(union, acl=config.acl), interrupted)
        finally:
            union.close()


async def _answer_rehearsal(ops: UnionOperations, interrupted: Callable[[], bool]) -> None:
    """In each directory of the union's root: look up and read what is there, create, write,
    link and remove a file (copying the directory up); then make, rename and remove a directory.
    Nothing is copied up through the work directory's spare-file thread: the spare that
    rehearses must stay single-threaded (setns)."""
    ctx = types.SimpleNamespace(uid=os.geteuid(), gid=os.getegid())  # what the handlers read of a request
    root = pyfuse3.ROOT_INODE
    await ops.getattr(root, ctx)
    await ops.statfs(ctx)
    for name in _listed_names(ops, root):
        parent = await ops.lookup(root, name, ctx)
        if interrupted() or not stat.S_ISDIR(parent.st_mode):
            continue
        for child in _listed_names(ops, parent.st_ino):
            entry = await ops.lookup(parent.st_ino, child, ctx)
            if stat.S_ISREG(entry.st_mode):
                info = await ops.open(entry.st_ino, os.O_RDONLY, ctx)
                await ops.read(info.fh, 0, 4096)
                await ops.release(info.fh)
        await ops.lookup(parent.st_ino, b".rehearsal", ctx)
        info, entry = await ops.create(parent.st_ino, b".rehearsal", 0o644, os.O_WRONLY, ctx)
        await ops.write(info.fh, 0, b"rehearsal")
        await ops.release(info.fh)
        await ops.getattr(entry.st_ino, ctx)
        link = await ops.symlink(parent.st_ino, b".rehearsal-link", b".rehearsal", ctx)
        await ops.readlink(link.st_ino, ctx)
        for removed in (b".rehearsal-link", b".rehearsal"):
            await ops.unlink(parent.st_ino, removed, ctx)
    if not interrupted():
        await ops.mkdir(root, b".rehearsal", 0o755, ctx)
        await ops.rename(root, b".rehearsal", root, b".rehearsal-renamed", 0, ctx)
        await ops.rmdir(root, b".rehearsal-renamed", ctx)


def _listed_names(ops: UnionOperations, node_id: int) -> list[bytes]:
    """The names a listing of directory NODE_ID shows, read as a READDIRPLUS reads them."""
    return [name for name, _ in (ops.listings.entries(ops.union.inodes.get(node_id), 0) or [])[DOT_ENTRIES:]]


async def _serve(ops: UnionOperations, lifeline_fd: int) -> bool:
    """Serve until the union is unmounted from outside (False), or a stop signal arrives or
    LIFELINE_FD (if given) is readable, its other end closed (True)."""
    stopped = False
    async with trio.open_nursery() as nursery:

        async def watch_lifeline() -> None:
            nonlocal stopped
            await trio.lowlevel.wait_readable(lifeline_fd)
            log.debug("lifeline closed: unmounting")
            stopped = True
            nursery.cancel_scope.cancel()

        async def watch_signals() -> None:
            nonlocal stopped
            with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGUSR1) as signals:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the mount
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        # As in fuse-overlayfs: the size of the inode table, seen from outside.
                        ops.apply_shim_queues()
                        read_ahead = ops.union.read_ahead.used if ops.union.read_ahead is not None else 0
                        print(f"pyunionfs: nodes={len(ops.union.inodes)} passthrough={ops.passthrough.nodes} "
                              f"shim_opens={shim.lower_opens()} closing_reads={shim.closing_reads()} "
                              f"read_ahead={read_ahead}", file=sys.stderr, flush=True)
                        continue
                    log.debug("signal %d: unmounting", signum)
                    stopped = True
                    nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        if lifeline_fd >= 0:
            nursery.start_soon(watch_lifeline)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return stopped


def serve(config: MountConfig, foreground: bool, debug: bool, ready_fd: int = -1, forked: bool = False,
          lifeline_fd: int = -1, answered_fd: int = -1) -> int:
    """Mount CONFIG and serve it until unmounted or signalled, or until LIFELINE_FD (if given)
    reads end of file. In the foreground, READY_FD (if given) hears "ok" once the mount is live,
    or why it failed; ANSWERED_FD (if given) is closed after that (a fork server's signal).
    Otherwise a daemon serves it, in a session of its own and with its stdio detached once
    mounted: a child, and the calling process returns once the union is mounted; or, if FORKED (a
    fork server's process), the calling process itself, which reports to READY_FD."""
    os.umask(0)  # modes arrive with the caller's umask applied; the daemon's must not apply again
    # Every file open through the union is a file open here: as many as the limit allows, as
    # fuse-overlayfs does.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ready_w = ready_fd
    try:
        union = open_union(config)
    except ConfigError as exc:
        _report_ready(ready_w, str(exc))
        return 1
    options = config.fuse_options() | ({"debug"} if debug else set())
    if not foreground:
        if not forked:
            # Fork before the FUSE session or trio starts a thread.
            ready_r, ready_w = os.pipe()
            if os.fork():
                os.close(ready_w)
                return _wait_until_mounted(ready_r)
            os.close(ready_r)
        os.setsid()
    ops = UnionOperations(union, acl=config.acl)
    if config.passthrough and privileged():  # the kernel lets only such a server register backing files
        shim.want_passthrough(MAX_STACK_DEPTH)
    # A stop signal between the mount and the signal receiver would kill the daemon and leave
    # the mount behind: hold them until _serve listens.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    shim.wait_for_requests_here(pyfuse3, ops.apply_shim_queues)
    try:
        pyfuse3.init(ops, config.mountpoint, options)
    except RuntimeError as exc:
        _report_ready(ready_w, f"mounting {config.mountpoint} failed: {exc}")
        return 1
    shim.answer_init()  # before the caller hears "ok": its first access would wait for it
    try:
        _report_ready(ready_w, "")
    except BrokenPipeError:  # whoever asked is gone without knowing it is mounted: nobody would unmount it
        pyfuse3.close(unmount=True)
        union.close()
        return 1
    if answered_fd >= 0:
        os.close(answered_fd)
    if not foreground:
        _detach_stdio()
    unmount = True
    union.start_read_ahead()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        unmount = trio.run(_serve, ops, lifeline_fd)
    finally:
        pyfuse3.close(unmount=unmount)
        union.close()
    return 0


def _report_ready(ready_w: int, error: str) -> None:
    """Tell the waiting parent (if any) that the mount is live, or why it is not."""
    if ready_w < 0:
        if error:
            raise ConfigError(error)
        return
    os.write(ready_w, error.encode() or b"ok")
    os.close(ready_w)


def _wait_until_mounted(ready_r: int) -> int:
    message = os.read(ready_r, 4096).decode(errors="replace")
    os.close(ready_r)
    if message == "ok":
        return 0
    raise ConfigError(message or "the mount daemon died before the mount was live")


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
