"""The union as a plain Python API: lookups, listings and reads over a LayerStack, with the inode
table. The FUSE Operations class translates requests into these calls."""
from __future__ import annotations

import errno
import os

import pyfuse3

from unionfs import core, xattrs
from unionfs.inodes import InodeTable, Node
from unionfs.layers import ROOT_PATH, LayerStack

# Layers do not change behind the union's back (kernel overlayfs assumes the same), so the kernel
# may keep entries and attributes for as long as it likes.
DEFAULT_TIMEOUT = 1e6


class Union:
    def __init__(self, stack: LayerStack, timeout: float = DEFAULT_TIMEOUT):
        self.stack = stack
        self.timeout = timeout
        found = core.Found(0, core.stat_at(stack.top().root_fd, ROOT_PATH), stack.all_layers_mask)
        root_ino = stack.compose_ino(found.attr.dev, found.attr.ino)
        self.inodes = InodeTable(root_ino, found, timeout)

    def _c_dir(self, node: Node):
        path = node.path
        if node.c_dir is None or node.c_dir[1] != path:
            node.c_dir = (self.stack.c.dir_paths(path, node.dir_layers), path)
        return node.c_dir[0]

    def _node_for(self, parent: Node, name: bytes, found: core.Found) -> Node:
        """The node for a resolved name: the known one for its object, or a new, uncounted one."""
        ino = self.stack.compose_ino(found.attr.dev, found.attr.ino)
        return self.inodes.node_for(ino, parent, name, found)

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """Resolve NAME in PARENT and count the kernel's new reference; None when absent."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        found = self.stack.c.resolve(self._c_dir(parent), name)
        if found is None:
            return None
        return self.inodes.remember(self._node_for(parent, name, found))

    def listdir(self, node: Node) -> list[tuple[bytes, Node]]:
        """The entries of directory NODE: "." and "..", then the merged names. Their nodes are not
        counted: the caller calls inodes.remember() for each merged name it hands to the kernel."""
        entries = self.stack.c.list(self._c_dir(node), node.path)
        dots = [(b".", node), (b"..", node.parent or node)]
        return dots + [(name, self._node_for(node, name, found)) for name, found in entries]

    def readlink(self, node: Node) -> bytes:
        with self.stack.at(node.layer, node.path) as (dir_fd, name):
            return os.readlink(name, dir_fd=dir_fd)

    def open_file(self, node: Node, flags: int) -> int:
        return core.open_at(self.stack.layers[node.layer].root_fd, node.path, flags)

    def _xattr_names(self, node: Node) -> frozenset[bytes]:
        if node.xattr_names is None:
            with self.stack.at(node.layer, node.path) as (dir_fd, rel):
                names = os.listxattr(b"/proc/self/fd/%d/%s" % (dir_fd, rel), follow_symlinks=False)
            node.xattr_names = frozenset(os.fsencode(name) for name in names)
        return node.xattr_names

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if xattrs.is_private(name) or name not in self._xattr_names(node):
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        with self.stack.at(node.layer, node.path) as (dir_fd, rel):
            return os.getxattr(b"/proc/self/fd/%d/%s" % (dir_fd, rel), name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[bytes]:
        return xattrs.visible(sorted(self._xattr_names(node)))

    def statfs(self) -> pyfuse3.StatvfsData:
        """The filesystem of the top layer: the upper when there is one, as in kernel overlayfs."""
        st = os.statvfs(f"/proc/self/fd/{self.stack.top().root_fd}")
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data
