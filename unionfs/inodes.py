"""The inode table: one node per union object, with ready-made attributes, kept while the kernel
holds a reference (lookup count) and dropped on FORGET."""
from __future__ import annotations

import stat

import pyfuse3

from unionfs.core import Attr, Found

ROOT_INODE: int = pyfuse3.ROOT_INODE


class Node:
    """A union object the kernel knows. pyfuse3 uses one field for the FUSE node id and st_ino,
    so the node id is the object's composed, stable st_ino (the root is node 1)."""

    __slots__ = ("ino", "parent_ino", "path", "layer", "dir_layers", "entry", "lookups", "c_dir")

    def __init__(self, ino: int, parent_ino: int, path: bytes, found: Found,
                 entry: pyfuse3.EntryAttributes):
        self.ino = ino
        self.parent_ino = parent_ino  # for "..": a directory has one parent
        self.path = path  # relative to every layer root; b"." for the root
        self.layer = found.layer  # the layer that holds the visible object
        self.dir_layers = found.dir_layers  # for a directory, the layers it merges
        self.entry = entry  # attributes served by lookup, getattr and readdirplus
        self.lookups = 0
        self.c_dir = None  # the directory's C path argument, built on first use

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.entry.st_mode)


def make_entry(ino: int, found: Found, timeout: float) -> pyfuse3.EntryAttributes:
    a: Attr = found.attr
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = a.mode
    # Like kernel overlayfs: a merged directory's link count is not worth computing, and 1 keeps
    # find and friends from trusting it.
    merged = stat.S_ISDIR(a.mode) and found.dir_layers & (found.dir_layers - 1)
    entry.st_nlink = 1 if merged else a.nlink
    entry.st_uid = a.uid
    entry.st_gid = a.gid
    entry.st_rdev = a.rdev
    entry.st_size = a.size
    entry.st_blksize = a.blksize
    entry.st_blocks = a.blocks
    entry.st_atime_ns = a.atime_ns
    entry.st_mtime_ns = a.mtime_ns
    entry.st_ctime_ns = a.ctime_ns
    return entry


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A reply to a lookup of an absent name that lets the kernel cache the absence."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = timeout
    return entry


class InodeTable:
    def __init__(self, root: Node):
        root.lookups = 1  # the kernel never forgets the root
        self._nodes: dict[int, Node] = {ROOT_INODE: root}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        """The node for INO; KeyError when the kernel asks for one it was never given."""
        return self._nodes[ino]

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def remember(self, node: Node) -> Node:
        """Count one kernel reference to NODE's object; an existing node for it wins."""
        known = self._nodes.setdefault(node.ino, node)
        known.lookups += 1
        return known

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[ino]
