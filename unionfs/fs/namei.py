"""Finding objects across the layers (after fs/overlayfs/namei.c): where a union directory is in
each layer, names resolved with redirects followed, the data of kernel metacopy files, the lower
object behind a copy (overlay.origin) and the index copy of a lower hard link."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING, Any, Iterator

from unionfs.fs import core, origin, syscalls
from unionfs.fs.inodes import Node
from unionfs.fs.layers import ROOT_PATH, LayerStack, child_path
from unionfs.fs.syscalls import SELF
from unionfs.fs.workdir import WorkDir

if TYPE_CHECKING:
    from unionfs.fs.file import OpenFile

UPPER = 0  # the upper layer, when there is one, is layer 0
UPPER_BIT = 1 << UPPER
REDIRECT = b"overlay.redirect"
METACOPY = b"overlay.metacopy"
NLINK = b"overlay.nlink"

Resolved = tuple[core.Found, dict[int, bytes]]  # an object, and its path in each lower layer


def layer_copies(dir_paths: list[bytes | None], name: bytes, found: core.Found) -> dict[int, bytes]:
    """The path of each layer's copy of a resolved object."""
    mask = found.dir_layers
    if not mask:  # not a directory (most entries): the one layer it is in
        return {found.layer: child_path(dir_paths[found.layer], name)}
    copies = {}
    for i, parent in enumerate(dir_paths):
        if mask >> i & 1:
            copies[i] = child_path(parent, name)
    return copies


def fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def parse_redirect(value: bytes) -> tuple[bytes | None, bytes]:
    """(parent, name) of an overlay.redirect value: PARENT is the path from the layer roots of
    an absolute redirect (ROOT_PATH for the root), None for a bare name in the same directory.
    Validated as the kernel does (ovl_get_redirect_xattr, then its lookups), so that a crafted
    value fails its own entry only and is never resolved outside the layer: an empty component
    or a relative value with a slash is EINVAL, a "." or ".." component EACCES."""
    if b"\0" in value:
        raise fail(errno.EINVAL)
    if value.startswith(b"/"):
        components = value[1:].split(b"/")
        if b"" in components:
            raise fail(errno.EINVAL)
    elif b"/" in value:
        raise fail(errno.EINVAL)
    else:
        components = [value]
    if any(component in (b"", b".", b"..") for component in components):
        raise fail(errno.EACCES)
    if not value.startswith(b"/"):
        return None, value
    return b"/".join(components[:-1]) or ROOT_PATH, components[-1]


class Namei:
    """The layers seen from a union: the read-side questions every operation asks."""

    def __init__(self, stack: LayerStack, work: WorkDir | None):
        self.stack = stack
        self.work = work
        self.has_upper = stack.top().is_upper
        self.xattr_namespace = stack.xattr_namespace
        self.origin_xattr = self.xattr_namespace + origin.ORIGIN
        # st_ino of lower objects by their origin value: lower layers do not change.
        self._origin_inos: dict[bytes, int | None] = {}

    def layer_path(self, node: Node, layer: int) -> bytes:
        """Where NODE's object is in LAYER: its union path in the upper layer."""
        if layer == UPPER and self.has_upper:
            return node.path
        return node.lower_paths[layer]

    def _at(self, node: Node):
        """(dir_fd, name) of NODE's object, for the *at() calls: a lower hard link that has an
        upper copy in the index is that copy."""
        if node.index_name is not None:
            return contextlib.nullcontext((self.work.index_fd, node.index_name))
        return self.stack.at(node.layer, self.layer_path(node, node.layer))

    @contextlib.contextmanager
    def object_at(self, node: Node, handle: OpenFile | None = None) -> Iterator[tuple[int, bytes]]:
        """(dir_fd, name) of NODE's object for the calls in unionfs/fs/syscalls.py; for a removed
        file that is still open, (fd, SELF) of one of its open files (HANDLE first, then those
        open for writing)."""
        if node.name is None and node.parent is not None:
            handles = ([handle] if handle else []) + sorted(node.open_files, key=lambda h: h.flags == os.O_RDONLY)
            if not handles:
                raise fail(errno.ENOENT)
            yield handles[0].fd, SELF
            return
        with self._at(node) as at:
            yield at

    def _data_at(self, node: Node, object_at: tuple[int, bytes] | None = None):
        """(dir_fd, name) of NODE's data: a kernel metacopy file's data is in a lower layer, and
        so is that of a lower hard link whose index copy the kernel made with metacopy. Else it is
        NODE's object: OBJECT_AT, when the caller has it open already (a copy-up), saves opening
        its directory again."""
        if self.needs_data(node):
            layer = min(node.lower_paths)
            return self.stack.at(layer, node.lower_paths[layer])
        if node.index_name is not None and self._index_is_metacopy(node):
            return self.stack.at(node.layer, node.lower_paths[node.layer])
        return self._at(node) if object_at is None else contextlib.nullcontext(object_at)

    def _index_is_metacopy(self, node: Node) -> bool:
        return syscalls.getxattr_or_none(self.work.index_fd, node.index_name, self.xattr_namespace + METACOPY) \
            is not None

    def _dir_paths(self, node: Node, with_upper: bool = True) -> list[bytes | None]:
        """Directory NODE's path in each layer, None where the layer takes no part."""
        return [self.layer_path(node, i) if node.dir_layers >> i & 1 and (with_upper or i != UPPER or not self.has_upper)
                else None for i in range(self.stack.c.count)]

    def _dir_view(self, node: Node) -> tuple[list[bytes | None], Any]:
        """Directory NODE's path in each layer and the C argument naming it, kept on the node
        until its path changes (a rename) or the layers it merges do (a copy-up)."""
        path = node.path
        if node.c_dir is None or node.c_dir[0] != path:
            dir_paths = self._dir_paths(node)
            node.c_dir = (path, dir_paths, self.stack.c.dir_paths(dir_paths))
        return node.c_dir[1], node.c_dir[2]

    def _follow_redirects(self, found: core.Found, name: bytes, dir_paths: list[bytes | None],
                          where: dict[int, bytes]) -> core.Found:
        """Go on merging a directory below a layer whose copy carries overlay.redirect, at the path
        the redirect names (kernel overlayfs's redirect_dir), adding the layers found to WHERE."""
        while found.redirect_layer >= 0:
            layer = found.redirect_layer
            value = self._read_redirect(layer, where[layer])
            if value is None:
                break
            parent, name = parse_redirect(value)
            below = range(layer + 1, self.stack.c.count)
            if parent is not None:  # from the layer roots
                paths = [parent if i in below else None for i in range(self.stack.c.count)]
            else:  # another name in the same parent directory
                paths = [dir_paths[i] if i in below else None for i in range(self.stack.c.count)]
            more = self.stack.c.resolve(self.stack.c.dir_paths(paths), name)
            if more is None or not stat.S_ISDIR(more.attr.mode):
                found = found._replace(redirect_layer=-1)
                break
            where.update(layer_copies(paths, name, more))
            found = found._replace(dir_layers=found.dir_layers | more.dir_layers,
                                   redirect_layer=more.redirect_layer)
        return found

    def _read_redirect(self, layer: int, path: bytes) -> bytes | None:
        with self.stack.at(layer, path) as (dir_fd, rel):
            for namespace in (b"trusted.", b"user."):
                value = syscalls.getxattr_or_none(dir_fd, rel, namespace + REDIRECT)
                if value is not None:
                    return value
        return None

    def _resolve_in(self, dir_paths: list[bytes | None], name: bytes, found: core.Found | None = None,
                    c_dir: Any = None) -> Resolved | None:
        """NAME resolved in the directory given by DIR_PATHS (FOUND when already resolved; C_DIR,
        when given, is DIR_PATHS as a C argument), redirects followed: the object and where it is
        in each lower layer it is found in."""
        if found is None:
            found = self.stack.c.resolve(c_dir or self.stack.c.dir_paths(dir_paths), name)
            if found is None:
                return None
        where = layer_copies(dir_paths, name, found)
        found = self._follow_redirects(found, name, dir_paths, where)
        if self.has_upper:
            upper_path = where.pop(UPPER, None)
            if upper_path is not None and found.metacopy:
                where.update(self._metacopy_data(upper_path, name, dir_paths))
        return found, where

    def _metacopy_data(self, upper_path: bytes, name: bytes, dir_paths: list[bytes | None]) -> dict[int, bytes]:
        """For an upper file that kernel overlayfs copied up with metacopy=on (overlay.metacopy:
        metadata only), where its data is: at its overlay.redirect, else at the same name below.
        Without it the file cannot be read: EIO, as in the kernel (not the upper's sparse zeros)."""
        with self.stack.at(UPPER, upper_path) as (dir_fd, rel):
            value = syscalls.getxattr_or_none(dir_fd, rel, self.xattr_namespace + REDIRECT)
        parent, target = parse_redirect(value) if value is not None else (None, name)
        lower = [None] + (dir_paths[1:] if parent is None else [parent] * (len(dir_paths) - 1))
        data = self.stack.c.resolve(self.stack.c.dir_paths(lower), target)
        if data is None or not stat.S_ISREG(data.attr.mode):
            raise fail(errno.EIO)
        return layer_copies(lower, target, data)

    def _origin_ino(self, value: bytes, path: bytes) -> int | None:
        """st_ino of the lower object that upper object PATH, with overlay.origin VALUE, was
        copied from, if this union can find it."""
        if value not in self._origin_inos:
            self._origin_inos[value] = self._find_origin(value, path)
        return self._origin_inos[value]

    def _find_origin(self, value: bytes, path: bytes) -> int | None:
        handle = origin.decode(value)
        if handle is None:
            return None
        lowers = range(1, len(self.stack.layers)) if self.has_upper else range(0)
        for layer in lowers:
            attr = core.stat_handle(self.stack.readable_root(layer), *handle)
            if attr is not None:
                return self.stack.compose_ino(attr.dev, attr.ino)
        # Opening a handle needs CAP_DAC_READ_SEARCH in the initial user namespace, which a
        # rootless union lacks; a lower object at the same path whose handle is the origin is it.
        for layer in lowers:
            try:
                with self.stack.at(layer, path) as (dir_fd, name):
                    if origin.encode(dir_fd, name) == value:
                        attr = core.stat_at(dir_fd, name)
                        return self.stack.compose_ino(attr.dev, attr.ino)
            except OSError:
                continue
        return None

    def _ino_of(self, found: core.Found, path: bytes) -> int:
        """The union's st_ino of a resolved object: a copy-up keeps its lower object's number."""
        if found.layer == UPPER and found.origin:
            copied = self._origin_ino(found.origin, path)
            if copied is not None:
                return copied
        return self.stack.compose_ino(found.attr.dev, found.attr.ino)

    def _with_copy_state(self, found: core.Found, lower_paths: dict[int, bytes],
                         path: bytes) -> tuple[core.Found, bytes | None]:
        """FOUND with the attributes the union shows, and the index name of a lower hard link
        whose object was copied up through another name (whose attributes are the index copy's)."""
        index_name = self._index_entry(found, lower_paths)
        if index_name is not None:
            attr = core.stat_at(self.work.index_fd, index_name, self.stack.layers[UPPER].flags)
            return found._replace(attr=self._union_nlink(attr, self.work.index_fd, index_name),
                                  no_xattrs=False), index_name
        if found.layer == UPPER and self.has_upper:
            return found._replace(attr=self._union_nlink(found.attr, self.stack.top().root_fd, path)), None
        return found, None

    def _index_entry(self, found: core.Found, lower_paths: dict[int, bytes]) -> bytes | None:
        """For a lower hard link whose object was copied up through another of its names, the
        name of that copy in the index (work/index/<origin as hex>, kernel index=on format)."""
        if not self.writable or found.layer not in lower_paths or found.attr.nlink < 2 \
                or stat.S_ISDIR(found.attr.mode):
            return None
        name = self._index_name(found.layer, lower_paths[found.layer])
        if syscalls.lstat_or_none(self.work.index_fd, name) is None:
            return None
        return name

    def _index_name(self, layer: int, path: bytes) -> bytes:
        with self.stack.at(layer, path) as (dir_fd, name):
            return origin.encode(dir_fd, name).hex().encode()

    def resolve(self, parent: Node, name: bytes) -> Resolved | None:
        if not parent.is_dir:
            raise fail(errno.ENOTDIR)
        dir_paths, c_dir = self._dir_view(parent)
        return self._resolve_in(dir_paths, name, c_dir=c_dir)

    def has_lower(self, parent: Node, name: bytes) -> bool:
        """Does a layer below the upper hold NAME in PARENT (so that removing the upper object, or
        its absence from the upper, needs a whiteout)?"""
        paths = self._dir_paths(parent, with_upper=False)
        if not any(paths):
            return False
        return self.stack.c.resolve(self.stack.c.dir_paths(paths), name) is not None

    def data_is_final(self, node: Node) -> bool:
        """Can no copy-up move NODE's data while it is open: the union is read-only (no work
        directory), or the data is NODE's own upper copy?"""
        return self.work is None or (node.layer == UPPER and node.index_name is None and not self.needs_data(node))

    def needs_data(self, node: Node) -> bool:
        """Is NODE an upper file whose data is still below (a kernel metacopy copy-up)?"""
        return node.layer == UPPER and self.has_upper and not node.is_dir and bool(node.lower_paths)

    def _union_nlink(self, attr: core.Attr, dir_fd: int, name: bytes) -> core.Attr:
        """ATTR with the link count the union shows: the upper copy of a lower hard link carries
        it in overlay.nlink ("U+n": the upper count plus n), as the kernel writes it. Such a copy
        has two links or more, unless it is only in the index."""
        in_index = dir_fd == self.work.index_fd if self.work else False
        if stat.S_ISDIR(attr.mode) or (attr.nlink < 2 and not in_index):
            return attr
        value = syscalls.getxattr_or_none(dir_fd, name, self.xattr_namespace + NLINK)
        if value is None or value[:1] != b"U":
            return attr
        return attr._replace(nlink=attr.nlink + int(value[1:]))
