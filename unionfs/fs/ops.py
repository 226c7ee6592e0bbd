"""FUSE operations: a thin translation of pyfuse3 requests into union calls and errno values."""
from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Awaitable, Callable, Sequence, TypeVar

import pyfuse3

from unionfs.fs import dirops, inode_ops, shim
from unionfs.fs.dirops import Caller
from unionfs.fs.file import OpenFile, open_file
from unionfs.fs.inodes import Node, negative_entry
from unionfs.fs.listings import Listings
from unionfs.fs.passthrough import Passthrough
from unionfs.fs.union import Union

log = logging.getLogger("pyunionfs")
T = TypeVar("T")
DOT_ENTRIES = 2  # "." and ".." open every listing


def replies_errno(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn an OSError from the layers into the FUSE reply with its errno. Any other error is a
    bug: it is logged and answered with EIO, because letting it out would end the daemon and
    leave every user of the mount with ENOTCONN. What the shim did since the last request is
    taken in first."""

    @functools.wraps(method)
    async def wrapper(self: UnionOperations, *args: object) -> T:
        if shim.queued():
            self.apply_shim_queues()
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid)


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export, so the kernel never looks up ".."
    enable_writeback_cache = False
    # The kernel checks POSIX ACLs of the layers' objects, as it does under kernel overlayfs, and
    # caches them: without this it ignores them and asks for them on every getxattr (ls -l).
    enable_acl = True

    def __init__(self, union: Union, acl: bool = True):
        super().__init__()
        self.union = union
        self.enable_acl = acl  # -o noacl (fuse-overlayfs) turns it off
        self.listings = Listings(union.listdir)
        self.passthrough = Passthrough(union)

    def _node(self, ino: int) -> Node:
        try:
            return self.union.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _add_handle(self, handle: OpenFile) -> int:
        handle.backing = self.passthrough.attach(handle)
        return self.union.handles.add(handle)

    # ---- names and attributes ----

    @replies_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        node = self.union.lookup(self._node(parent_inode), name)
        if node is None:
            return negative_entry(self.union.view.timeout)
        return self.union.entry(node)

    @replies_errno
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self._apply_forgets(inode_list)  # a FORGET reaches Python when the shim's queue is full

    def _apply_forgets(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.union.forget(ino, count)

    def apply_shim_queues(self) -> None:
        """Take in what the shim did while it answered: forget the files it unlinked, drop the
        lookups the kernel gave back, and mark the nodes whose attributes it changed as stale.
        Done before Python handles a request, so that no request sees the nodes as they were
        (node ids are never reused, so a forget applied late is still right), and before the
        daemon waits for requests (so an idle daemon holds no node the kernel forgot)."""
        inodes = self.union.inodes
        for node_id, parent_id in shim.take_removed():
            self.listings.changed(parent_id)
            dirops.unlinked_by_shim(self.union, inodes.find(node_id), inodes.find(parent_id))
        self._apply_forgets(shim.take_forgets())
        for node_id in shim.take_changed():
            node = inodes.find(node_id)
            if node is not None:
                node.stale = True

    @replies_errno
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self.union.getattr(self._node(inode))

    @replies_errno
    async def setattr(self, inode: int, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        handle = self.union.handles.find(fh) if fh is not None else None
        return await inode_ops.setattr(self.union, self._node(inode), attr, fields, handle)

    @replies_errno
    async def readlink(self, inode: int, ctx=None) -> bytes:
        return self.union.readlink(self._node(inode))

    @replies_errno
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx) -> pyfuse3.EntryAttributes:
        self.listings.changed(parent_inode)
        return dirops.mknod(self.union, self._node(parent_inode), name, mode, rdev, _caller(ctx)).entry

    @replies_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx) -> pyfuse3.EntryAttributes:
        self.listings.changed(parent_inode)
        return dirops.mkdir(self.union, self._node(parent_inode), name, mode, _caller(ctx)).entry

    @replies_errno
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx) -> pyfuse3.EntryAttributes:
        self.listings.changed(parent_inode)
        return dirops.symlink(self.union, self._node(parent_inode), name, target, _caller(ctx)).entry

    @replies_errno
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx) -> pyfuse3.EntryAttributes:
        self.listings.changed(new_parent_inode)
        node = await dirops.link(self.union, self._node(inode), self._node(new_parent_inode), new_name)
        return node.entry

    @replies_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        self.listings.changed(parent_inode)
        await dirops.unlink(self.union, self._node(parent_inode), name)

    @replies_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        self.listings.changed(parent_inode)
        dirops.rmdir(self.union, self._node(parent_inode), name)

    @replies_errno
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx) -> None:
        self.listings.all_changed()
        await dirops.rename(self.union, self._node(parent_inode_old), name_old,
                            self._node(parent_inode_new), name_new, flags)

    # ---- directories ----

    @replies_errno
    async def opendir(self, inode: int, ctx=None) -> int:
        # A directory's handle is its node id: with the shim loaded the kernel sends no OPENDIR
        # (see csrc/fuse_shim.c), and READDIR then carries the node id as its handle.
        self._node(inode)
        return inode

    @replies_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.listings.entries(self._node(fh), start_id)
        if entries is None:
            return
        inodes = self.union.inodes
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if isinstance(node, Node):
                node = inodes.current(node)
                entry = self.union.entry(node)
            else:
                entry = node  # listed, but its lookup fails: no node, no reference
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                return
            # readdirplus hands the kernel a reference to each entry it accepts, except "." and
            # ".." (the first two), which the kernel does not count (fuse_direntplus_link).
            if index >= DOT_ENTRIES and isinstance(node, Node):
                inodes.remember(node)
        self.listings.replied_to_end(fh, len(entries))

    @replies_errno
    async def releasedir(self, fh: int) -> None:
        pass

    @replies_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # directory changes are made by rename and mkdir calls that the upper fs orders

    # ---- files ----

    @replies_errno
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        handle = await open_file(self.union, self._node(inode), flags)
        fh = self._add_handle(handle)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.passthrough.keep_cache(handle))

    @replies_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        self.listings.changed(parent_inode)
        node, fd, access = dirops.create(self.union, self._node(parent_inode), name, mode, flags, _caller(ctx))
        handle = OpenFile(node, fd, access)
        fh = self._add_handle(handle)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.passthrough.keep_cache(handle)), node.entry

    @replies_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.union.handles[fh].fd, size, off)  # without the shim, which reads in C

    @replies_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.union.handles[fh]
        handle.node.stale = True
        return os.pwrite(handle.fd, buf, off)

    @replies_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.union.handles[fh]
        if self.union.sync:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    @replies_errno
    async def release(self, fh: int) -> None:
        handle = self.union.handles.pop(fh)
        if handle.flags != os.O_RDONLY:
            handle.node.stale = True  # the shim or the kernel may have written to it: re-read its attributes
        self.passthrough.detach(handle)
        handle.close()

    # ---- the rest ----

    @replies_errno
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        return self.union.statfs()

    def _require_xattrs(self) -> None:
        # -o noxattrs=1: ENOSYS, after which the kernel answers EOPNOTSUPP without asking again,
        # as fuse-overlayfs does.
        if not self.union.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @replies_errno
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        self._require_xattrs()
        return self.union.getxattr(self._node(inode), name)

    @replies_errno
    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        self._require_xattrs()
        return self.union.listxattr(self._node(inode))

    @replies_errno
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx) -> None:
        self._require_xattrs()
        await inode_ops.setxattr(self.union, self._node(inode), name, value)

    @replies_errno
    async def removexattr(self, inode: int, name: bytes, ctx) -> None:
        self._require_xattrs()
        await inode_ops.removexattr(self.union, self._node(inode), name)

    @replies_errno
    async def access(self, inode: int, mode: int, ctx=None) -> bool:
        # Mounted with default_permissions: the kernel checks permissions itself.
        return True
