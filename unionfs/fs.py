"""FUSE operations: a thin translation of pyfuse3 requests into Union calls and errno values."""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from typing import Awaitable, Callable, Iterator, Sequence, TypeVar

import pyfuse3

from unionfs.inodes import Node, negative_entry
from unionfs.union import Union

log = logging.getLogger("pyunionfs")
T = TypeVar("T")
DOT_ENTRIES = 2  # "." and ".." open every listing


def replies_errno(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn an OSError from the layers into the FUSE reply with its errno. Any other error is a
    bug: it is logged and answered with EIO, because letting it out would end the daemon and
    leave every user of the mount with ENOTCONN."""

    @functools.wraps(method)
    async def wrapper(*args: object) -> T:
        try:
            return await method(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class OpenFile:
    """An open regular file. The layer file is opened on the first read: with keep_cache a
    cached file is often never read, and open() then costs no system call."""

    __slots__ = ("node", "fd")

    def __init__(self, node: Node):
        self.node = node
        self.fd = -1


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export, so the kernel never looks up ".."
    enable_writeback_cache = False

    def __init__(self, union: Union):
        super().__init__()
        self.union = union
        self._handles: dict[int, object] = {}
        self._next_fh: Iterator[int] = itertools.count(1)

    def _node(self, ino: int) -> Node:
        try:
            return self.union.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _add_handle(self, handle: object) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return fh

    @replies_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        node = self.union.lookup(parent, name)
        if node is None:
            return negative_entry(self.union.timeout)
        return node.entry

    @replies_errno
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.union.inodes.forget(ino, count)

    @replies_errno
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self._node(inode).entry

    @replies_errno
    async def readlink(self, inode: int, ctx=None) -> bytes:
        return self.union.readlink(self._node(inode))

    @replies_errno
    async def opendir(self, inode: int, ctx=None) -> int:
        node = self._node(inode)
        # One snapshot per open directory, so offsets stay valid between readdir calls.
        return self._add_handle(self.union.listdir(node))

    @replies_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._handles[fh]
        inodes = self.union.inodes
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            node = inodes.current(node)
            if not pyfuse3.readdir_reply(token, name, node.entry, index + 1):
                return
            # readdirplus hands the kernel a reference to each entry it accepts, except "." and
            # ".." (the first two), which the kernel does not count (fuse_direntplus_link).
            if index >= DOT_ENTRIES:
                inodes.remember(node)

    @replies_errno
    async def releasedir(self, fh: int) -> None:
        del self._handles[fh]

    @replies_errno
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self._add_handle(OpenFile(self._node(inode))), keep_cache=True)

    @replies_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if handle.fd < 0:
            handle.fd = self.union.open_file(handle.node, os.O_RDONLY)
        return os.pread(handle.fd, size, off)

    @replies_errno
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        if handle.fd >= 0:
            os.close(handle.fd)

    @replies_errno
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        return self.union.statfs()

    @replies_errno
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        return self.union.getxattr(self._node(inode), name)

    @replies_errno
    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        return self.union.listxattr(self._node(inode))

    @replies_errno
    async def access(self, inode: int, mode: int, ctx=None) -> bool:
        # Mounted with default_permissions: the kernel checks permissions itself.
        return True
