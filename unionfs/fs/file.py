"""Open files: reads from whichever layer holds the object, writes to its upper copy."""
from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

from unionfs.fs import shim
from unionfs.fs.inodes import InodeTable, Node

if TYPE_CHECKING:
    from unionfs.fs.union import Union

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


class OpenFile:
    """An open regular file, with the layer file that holds its data open as FD. When the object is
    copied up, every handle moves to the copy, so reads see new data. Once it has a handle number
    (FH), its layer fd is published to the shim, which serves the reads."""

    __slots__ = ("node", "_fd", "flags", "fh", "backing")

    def __init__(self, node: Node, fd: int, flags: int):
        self.node = node
        self._fd = fd
        self.flags = flags  # the access mode the layer file is opened with
        self.fh = 0
        self.backing = 0  # the backing id when the kernel serves it (unionfs/fs/passthrough.py)
        node.add_open_file(self)  # until close()

    @property
    def fd(self) -> int:
        return self._fd

    @fd.setter
    def fd(self, fd: int) -> None:
        self._fd = fd
        if self.fh:
            shim.set_file(self.fh, fd, self.flags != os.O_RDONLY, self.backing)

    def publish_as(self, fh: int) -> None:
        self.fh = fh
        self.fd = self._fd

    def reopen(self, union: Union) -> None:
        """Point this handle at the node's upper copy."""
        old, self.fd = self.fd, union.open_file(self.node, self.flags)
        os.close(old)

    def close(self) -> None:
        self.node.remove_open_file(self)
        old, self.fd = self.fd, -1
        if old >= 0:
            os.close(old)


class Handles:
    """The open files by handle number: the daemon's own, numbered from 1 (a closed one's number
    is used again, so they stay small), and the lower files the shim opened itself
    (shim.FIRST_SHIM_FH up, csrc/fuse_shim.c), which Python takes in when it needs them: all of a
    node's before its data moves or its name goes (adopt), one when a request names it."""

    def __init__(self, inodes: InodeTable):
        self._inodes = inodes
        self._open: dict[int, OpenFile] = {}
        self._free: list[int] = []
        self._next = itertools.count(1)

    def add(self, handle: OpenFile) -> int:
        """Give HANDLE a number (published to the shim, which serves its reads)."""
        fh = self._free.pop() if self._free else next(self._next)
        self._open[fh] = handle
        handle.publish_as(fh)
        return fh

    def find(self, fh: int) -> OpenFile | None:
        """Open file FH (taken in from the shim if it opened it), or None."""
        handle = self._open.get(fh)
        if handle is None:
            held = shim.adopt_open(fh)
            node = self._inodes.find(held[0]) if held is not None else None
            if node is not None:
                handle = self._take_in(node, fh, held[1])
            elif held is not None:  # no node to hang it on (cannot happen while the kernel holds it open)
                shim.set_file(fh, -1, False)  # before its fd number can be reused
                os.close(held[1])
        return handle

    def __getitem__(self, fh: int) -> OpenFile:
        handle = self.find(fh)
        if handle is None:
            raise KeyError(fh)
        return handle

    def pop(self, fh: int) -> OpenFile:
        handle = self[fh]
        del self._open[fh]
        if fh < shim.FIRST_SHIM_FH:
            self._free.append(fh)
        return handle

    def adopt(self, node: Node) -> None:
        """Take in the files the shim opened for NODE."""
        for fh, fd in shim.adopt_opens(node.id):
            self._take_in(node, fh, fd)

    def _take_in(self, node: Node, fh: int, fd: int) -> OpenFile:
        handle = OpenFile(node, fd, os.O_RDONLY)
        handle.fh = fh  # the shim has its fd already
        self._open[fh] = handle
        return handle


async def open_file(union: Union, node: Node, flags: int) -> OpenFile:
    if flags & WRITE_FLAGS:
        # O_TRUNC needs no copy of the data it is about to drop.
        await union.copy_up(node, with_data=not flags & os.O_TRUNC)
    access = flags & os.O_ACCMODE
    # Opened now, not at the first read: the shim serves reads of an open layer file in C, so
    # one system call here saves the first read a round trip into Python.
    handle = OpenFile(node, union.open_file(node, access | (flags & os.O_TRUNC)), access)
    if flags & os.O_TRUNC:
        union.refresh(node)
    return handle
