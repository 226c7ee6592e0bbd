"""Open files: reads from whichever layer holds the object, writes to its upper copy."""
from __future__ import annotations

import os

from unionfs.fs import shim
from unionfs.fs.inodes import Node
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
