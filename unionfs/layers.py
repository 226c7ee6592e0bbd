"""The layer stack: open layer roots, per-layer flags and inode number composition."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from unionfs import core

# st_ino = fsid << INO_SHIFT | inode number in that filesystem, as kernel overlayfs's xino does:
# layers on the same filesystem share an fsid, so one object has one number; layers on different
# filesystems get different numbers even where their inode numbers are equal.
INO_SHIFT = 56
INO_MASK = (1 << INO_SHIFT) - 1

ROOT_PATH = b"."


def proc_path(dir_fd: int, name: bytes = b"") -> bytes:
    """A path naming NAME in DIR_FD (or DIR_FD itself) for calls that take no fd, such as the
    xattr ones: the /proc link works for O_PATH fds too."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name) if name else b"/proc/self/fd/%d" % dir_fd


@dataclass(frozen=True)
class Layer:
    path: str
    root_fd: int
    is_upper: bool


def overlay_xattr_namespace() -> bytes:
    """The namespace of the overlay xattrs this process writes: trusted.* needs CAP_SYS_ADMIN in
    the initial user namespace; elsewhere (rootless), the kernel's userxattr format, user.*."""
    with open("/proc/self/uid_map") as uid_map:
        initial_namespace = uid_map.read().split() == ["0", "0", "4294967295"]
    return b"trusted." if os.geteuid() == 0 and initial_namespace else b"user."


class LayerStack:
    """Upper (if any) then lowers, top first; each opened once, by path, before the mount."""

    def __init__(self, lowers: Sequence[str], upper: str | None = None):
        paths = ([upper] if upper else []) + list(lowers)
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self.layers = [Layer(p, fd, bool(upper) and i == 0) for i, (p, fd) in enumerate(zip(paths, fds))]
        self.xattr_namespace = overlay_xattr_namespace()
        self.c = core.LayerArray([(layer.root_fd, self._flags(layer)) for layer in self.layers])
        self.all_layers_mask = (1 << len(self.layers)) - 1
        self._readable_roots: dict[int, int] = {}
        self._fsids: dict[int, int] = {}
        for layer in self.layers:
            self._fsid(os.fstat(layer.root_fd).st_dev)

    def _flags(self, layer: Layer) -> int:
        # Image layers may carry OCI ".wh." whiteouts and xwhiteouts; the upper holds only the
        # kernel's formats, so a user's own ".wh.name" file there stays an ordinary file. The C
        # core reads the upper's origin and metacopy xattrs with each lookup.
        if layer.is_upper:
            return core.LAYER_UPPER[self.xattr_namespace]
        return core.LAYER_OCI | core.LAYER_XWHITEOUT

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
            self._readable_roots[layer] = os.open(proc_path(self.layers[layer].root_fd),
                                                  os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
        dir_fd = core.open_at(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)
