"""The layer stack: open layer roots, per-layer flags and inode number composition."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from unionfs.fs import core, syscalls, xattrs
from unionfs.fs.syscalls import SELF

# st_ino = fsid << INO_SHIFT | inode number in that filesystem, as kernel overlayfs's xino does:
# layers on the same filesystem share an fsid, so one object has one number; layers on different
# filesystems get different numbers even where their inode numbers are equal.
INO_SHIFT = 56
INO_MASK = (1 << INO_SHIFT) - 1

ROOT_PATH = b"."


def child_path(parent: bytes, name: bytes) -> bytes:
    """The path of NAME in directory PARENT, both relative to a layer root."""
    return name if parent == ROOT_PATH else parent + b"/" + name


def _root_override(root_fd: int) -> bytes | None:
    """The override_stat xattr a layer root carries, if any."""
    names = syscalls.listxattr(root_fd, SELF)
    return next((name for name in xattrs.OVERRIDE_NAMES if name in names), None)


@dataclass(frozen=True)
class Layer:
    path: str
    root_fd: int
    is_upper: bool
    flags: int  # for the C core (core.LAYER_*)


def privileged() -> bool:
    """Is this process root of the initial user namespace (not rootless: not root of a user
    namespace of its own, where devices cannot be made and trusted.* xattrs not written)?"""
    with open("/proc/self/uid_map") as uid_map:
        initial_namespace = uid_map.read().split() == ["0", "0", "4294967295"]
    return os.geteuid() == 0 and initial_namespace


def overlay_xattr_namespace() -> bytes:
    """The namespace of the overlay xattrs this process writes: trusted.* needs CAP_SYS_ADMIN in
    the initial user namespace; elsewhere (rootless), the kernel's userxattr format, user.*."""
    return b"trusted." if privileged() else b"user."


class LayerStack:
    """Upper (if any) then lowers, top first; each opened once, by path, before the mount."""

    def __init__(self, lowers: Sequence[str], upper: str | None = None, user_xattr: bool = False,
                 xattr_permissions: int = 0):
        paths = ([upper] if upper else []) + list(lowers)
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(syscalls.open_root(path))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        # -o userxattr asks for the unprivileged format even where trusted.* could be written.
        self.xattr_namespace = b"user." if user_xattr else overlay_xattr_namespace()
        # -o xattr_permissions=1|2 (fuse-overlayfs): owners and modes kept in override_stat
        # xattrs, in the upper under this name (None: off); see xattrs.OVERRIDE_NAMES.
        self.upper_override = xattrs.OVERRIDE_BY_OPTION.get(xattr_permissions) if upper else None
        # With the option, override_stat xattrs are the union's metadata: users do not see them.
        self.hidden_xattrs = frozenset(xattrs.OVERRIDE_NAMES) if xattr_permissions else frozenset()
        self.layers = []
        for i, (path, fd) in enumerate(zip(paths, fds)):
            is_upper = bool(upper) and i == 0
            self.layers.append(Layer(path, fd, is_upper, self._flags(fd, is_upper, xattr_permissions)))
        self.c = core.LayerArray([(layer.root_fd, layer.flags) for layer in self.layers])
        self.all_layers_mask = (1 << len(self.layers)) - 1
        self._readable_roots: dict[int, int] = {}
        self._fsids: dict[int, int] = {}
        for layer in self.layers:
            self._fsid(os.fstat(layer.root_fd).st_dev)

    def _flags(self, root_fd: int, is_upper: bool, xattr_permissions: int) -> int:
        # Layers may carry OCI ".wh." whiteouts, the upper too (containers/storage stores its
        # layers so, and mounts one as the upper for `podman image diff`), as fuse-overlayfs
        # reads them; lower layers also xwhiteouts, as the kernel. The C core reads the upper's
        # origin and metacopy xattrs with each lookup.
        flags = core.LAYER_OCI
        flags |= core.LAYER_UPPER[self.xattr_namespace] if is_upper else core.LAYER_XWHITEOUT
        if xattr_permissions:
            # As fuse-overlayfs: a layer whose root carries an override_stat xattr has them all.
            override = self.upper_override if is_upper else _root_override(root_fd)
            if override is not None:
                flags |= core.LAYER_OVERRIDE[override]
        return flags

    def mark_upper_override(self) -> None:
        """Give the upper root its override_stat xattr, which marks the layer (for this union,
        fuse-overlayfs and containers/storage) as keeping owners and modes there: a lower root's,
        else the root's own owner and mode."""
        root = self.top().root_fd
        if syscalls.getxattr_or_none(root, SELF, self.upper_override) is not None:
            return
        for layer in self.layers[1:]:
            value = syscalls.getxattr_or_none(layer.root_fd, SELF, self.upper_override)
            if value is not None:
                syscalls.setxattr(root, SELF, self.upper_override, value)
                return
        st = syscalls.lstat(root, SELF)
        syscalls.setxattr(root, SELF, self.upper_override, xattrs.override_value(st.st_uid, st.st_gid, st.st_mode))

    def _fsid(self, dev: int) -> int:
        # Numbered in layer order, so the same stack gives the same numbers at every mount.
        return self._fsids.setdefault(dev, len(self._fsids))

    def compose_ino(self, dev: int, ino: int) -> int:
        """The union's st_ino for inode INO of filesystem DEV: stable and unique across layers."""
        if ino > INO_MASK:  # fold rare huge inode numbers into the low bits
            ino = (ino ^ (ino >> INO_SHIFT)) & INO_MASK
        return self._fsid(dev) << INO_SHIFT | ino

    def top(self) -> Layer:
        return self.layers[0]

    def readable_root(self, layer: int) -> int:
        """A readable fd of LAYER's root, opened on first use: open_by_handle_at() wants one."""
        if layer not in self._readable_roots:
            self._readable_roots[layer] = syscalls.reopen(self.layers[layer].root_fd, os.O_RDONLY | os.O_DIRECTORY)
        return self._readable_roots[layer]

    def close(self) -> None:
        for fd in [layer.root_fd for layer in self.layers] + list(self._readable_roots.values()):
            os.close(fd)

    @contextlib.contextmanager
    def at(self, layer: int, path: bytes) -> Iterator[tuple[int, bytes]]:
        """(dir_fd, name) naming PATH in LAYER for the *at() calls. The parent directory is opened
        by the C core, which follows no symlink on the way, so the name cannot lead out of LAYER."""
        root_fd = self.layers[layer].root_fd
        parent, _, name = path.rpartition(b"/")
        if not parent:
            yield root_fd, path
            return
        dir_fd = syscalls.open_beneath(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)
