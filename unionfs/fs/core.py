"""Python face of the C core (csrc/unionfs_core.h): resolution and listings across layers."""
from __future__ import annotations

import errno
import os
import struct
from typing import Any, Iterator, NamedTuple, Sequence

from unionfs.fs._core import ffi, lib

MAX_LAYERS: int = lib.UFS_MAX_LAYERS
LIST_BATCH = 256  # entries resolved per call while listing (150 KiB of C structs)
LAYER_OCI: int = lib.UFS_LAYER_OCI
LAYER_XWHITEOUT: int = lib.UFS_LAYER_XWHITEOUT
LAYER_UPPER: dict[bytes, int] = {b"trusted.": lib.UFS_LAYER_UPPER_TRUSTED, b"user.": lib.UFS_LAYER_UPPER_USER}
# The layer flag that makes the C core show owners and modes from this override_stat xattr.
LAYER_OVERRIDE: dict[bytes, int] = {
    b"security.fuseoverlayfs.override_stat": lib.UFS_LAYER_OVERRIDE_PRIVILEGED,
    b"user.containers.override_stat": lib.UFS_LAYER_OVERRIDE_CONTAINERS,
    b"user.fuseoverlayfs.override_stat": lib.UFS_LAYER_OVERRIDE_USER,
}



class Attr(NamedTuple):
    """lstat() of an object in one layer (struct ufs_attr)."""

    dev: int
    ino: int
    size: int
    blocks: int
    rdev: int
    mode: int
    nlink: int
    uid: int
    gid: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Found(NamedTuple):
    """A name resolved across layers: where the visible object lives and its lstat()."""

    layer: int
    attr: Attr
    dir_layers: int  # bit i set when layer i takes part in the merged directory
    redirect_layer: int = -1  # the layer whose directory has overlay.redirect (the merge stopped)
    origin: bytes = b""  # an upper object's overlay.origin value (read by the C core)
    metacopy: bool = False  # an upper file has overlay.metacopy: its data is in a lower layer
    no_xattrs: bool = False  # the visible object has no xattrs at all (False: some, or not listed)


def _check(rc: int, what: bytes) -> int:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), os.fsdecode(what))
    return rc


# The C structs are read with struct.Struct, one call per struct: a cffi attribute read costs about
# what a whole unpack does. Each layout is a list of (field path, struct format code).
_ATTR_FIELDS = [((name,), "Q") for name in ("dev", "ino", "size", "blocks", "rdev")] + \
    [((name,), "I") for name in ("mode", "nlink", "uid", "gid", "blksize")] + \
    [((name,), "q") for name in ("atime_ns", "mtime_ns", "ctime_ns")]
_HIGH_WORDS = struct.Struct(f"={lib.UFS_MASK_WORDS - 1}Q")  # a layer mask's words for layers 64 and up
_NO_HIGH_WORDS = bytes(_HIGH_WORDS.size)
_ATTR_END = 1 + len(_ATTR_FIELDS)  # where the attributes end in _FOUND_FIELDS
_FOUND_FIELDS = [(("layer",), "i")] + [(("attr",) + path, code) for path, code in _ATTR_FIELDS] + [
    (("dir_layers", 0), "Q"), (("dir_layers", 1), f"{_HIGH_WORDS.size}s"),
    (("redirect_layer",), "i"), (("origin_len",), "I"), (("metacopy",), "I"),
    (("origin",), f"{lib.UFS_ORIGIN_MAX}s"), (("no_xattrs",), "I")]


def _layout(ctype: str, fields: list[tuple[tuple, str]]) -> struct.Struct:
    """A struct.Struct for C type CTYPE: FIELDS at cffi's offsets, the padding between them skipped."""
    fmt, end = "=", 0
    for path, code in fields:
        offset = ffi.offsetof(ctype, *path)
        if offset < end:
            raise ImportError(f"{ctype}: field {path} overlaps the one before it")
        fmt += f"{offset - end}x{code}" if offset > end else code
        end = offset + struct.calcsize("=" + code)
    return struct.Struct(fmt + f"{ffi.sizeof(ctype) - end}x")


_ATTR = _layout("struct ufs_attr", _ATTR_FIELDS)
_FOUND = _layout("struct ufs_found", _FOUND_FIELDS)
_DIRENT = _layout("struct ufs_dirent", [(("name",), f"{lib.UFS_NAME_MAX + 1}s")] +
                  [(("found",) + path, code) for path, code in _FOUND_FIELDS])


def _attr(c_attr: Any) -> Attr:
    """An Attr from a struct ufs_attr *."""
    return tuple.__new__(Attr, _ATTR.unpack(ffi.buffer(c_attr)))


def _found(values: tuple) -> Found:
    """A Found from the unpacked fields of a struct ufs_found (_FOUND_FIELDS' order)."""
    layer, attr = values[0], values[1:_ATTR_END]
    low_words, high_words, redirect_layer, origin_len, metacopy, origin, no_xattrs = values[_ATTR_END:]
    dir_layers = low_words
    if high_words != _NO_HIGH_WORDS:  # more than 64 layers
        for i, word in enumerate(_HIGH_WORDS.unpack(high_words), 1):
            dir_layers |= word << (64 * i)
    # tuple.__new__ is what NamedTuple._make calls, without the Python-level call around it: a
    # microsecond of each listed entry.
    return tuple.__new__(Found, (layer, tuple.__new__(Attr, attr), dir_layers, redirect_layer, origin[:origin_len],
                                 metacopy != 0, no_xattrs != 0))


class LayerArray:
    """The layers as the C core sees them: root fds and flags, top first."""

    def __init__(self, roots: Sequence[tuple[int, int]]):
        if not 1 <= len(roots) <= MAX_LAYERS:
            raise ValueError(f"a union takes 1 to {MAX_LAYERS} layers, not {len(roots)}")
        self.count = len(roots)
        self._c_layers = ffi.new("struct ufs_layer[]", [{"root_fd": fd, "flags": fl} for fd, fl in roots])

    def dir_paths(self, paths: Sequence[bytes | None]) -> tuple[Any, Any]:
        """The C argument naming a union directory by its path in each layer (None where the
        layer takes no part); the tuple keeps the strings alive."""
        c_strings = {path: ffi.new("char[]", path) for path in set(paths) if path is not None}
        c_paths = ffi.new("char *[]", [ffi.NULL if p is None else c_strings[p] for p in paths])
        return c_paths, c_strings

    def resolve(self, dir_paths: tuple[Any, Any], name: bytes) -> Found | None:
        """Resolve NAME in a union directory; None when absent or whited out."""
        out = ffi.new("struct ufs_found *")
        rc = lib.ufs_resolve(self._c_layers, self.count, dir_paths[0], name, out)
        if rc == -errno.ENOENT:
            return None
        _check(rc, name)
        return _found(_FOUND.unpack(ffi.buffer(out)))

    def list(self, dir_paths: tuple[Any, Any], path: bytes, batch_size: int = LIST_BATCH
             ) -> Iterator[tuple[bytes, Found]]:
        """The visible entries of a union directory, each resolved, BATCH_SIZE at a time: a huge
        directory's entries are never all held in C and Python at once."""
        for raw in self._batches(dir_paths, path, batch_size):
            yield from entries(raw)

    def _batches(self, dir_paths: tuple[Any, Any], path: bytes, batch_size: int) -> Iterator[Any]:
        """The entries of a union directory as C structs, BATCH_SIZE at a time (each batch valid
        until the next one is asked for)."""
        names = ffi.new("struct ufs_names *")
        _check(lib.ufs_list_names(self._c_layers, self.count, dir_paths[0], names), path)
        try:
            batch = ffi.new("struct ufs_dirent[]", batch_size)
            pos = ffi.new("uint64_t *")
            while filled := _check(lib.ufs_resolve_names(self._c_layers, self.count, dir_paths[0], names, pos,
                                                         batch, batch_size), path):
                yield ffi.buffer(batch, filled * _DIRENT.size)
        finally:
            lib.ufs_names_free(names)


class DirReader:
    """The C core's read-ahead thread (ufs_readahead_*) over LAYERS: directories queued under a
    key are listed and resolved on another CPU, without the GIL, and kept for take()."""

    def __init__(self, layers: LayerArray, max_entries: int, max_kept_entries: int, max_queued: int):
        self._reader = lib.ufs_readahead_new(layers._c_layers, layers.count, max_entries, max_kept_entries,
                                             max_queued)
        if self._reader == ffi.NULL:
            raise MemoryError("no memory for the read-ahead")
        self._entries = ffi.new("struct ufs_dirent **")
        self._count = ffi.new("size_t *")

    def queue(self, key: int, dir_paths: tuple[Any, Any]) -> None:
        """Read the directory DIR_PATHS (a LayerArray.dir_paths() argument) under KEY. If it
        cannot be queued (no memory, no thread), the listing that asks reads it itself."""
        lib.ufs_readahead_queue(self._reader, key, dir_paths[0])

    def take(self, key: int) -> bytes | None:
        """What was read of KEY, as C structs for entries(); None if nothing is kept for it."""
        if not lib.ufs_readahead_take(self._reader, key, self._entries, self._count):
            return None
        try:
            return ffi.buffer(self._entries[0], self._count[0] * _DIRENT.size)[:] if self._count[0] else b""
        finally:
            lib.ufs_readahead_free_entries(self._entries[0])

    def clear(self) -> None:
        lib.ufs_readahead_clear(self._reader)

    def stop(self) -> None:
        lib.ufs_readahead_stop(self._reader)
        self._reader = ffi.NULL


def entries(raw: Any) -> Iterator[tuple[bytes, Found]]:
    """The (name, Found) of each struct ufs_dirent in RAW."""
    for values in _DIRENT.iter_unpack(raw):
        raw_name = values[0]
        yield raw_name[:raw_name.index(b"\0")], _found(values[1:])


def stat_at(root_fd: int, path: bytes, layer_flags: int = 0) -> Attr:
    """lstat() of PATH below ROOT_FD as a struct ufs_attr, with the owner and mode of its
    override_stat xattr when LAYER_FLAGS names one."""
    out = ffi.new("struct ufs_attr *")
    _check(lib.ufs_stat_at(root_fd, path, layer_flags, out), path)
    return _attr(out)


def function_address(name: str) -> int:
    """The address of C core function NAME (ufs_open_at, ufs_stat_fd), for the shim
    (csrc/fuse_shim.c), which reads and changes upper objects with them."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


def stat_fd(fd: int, layer_flags: int = 0) -> Attr:
    """stat_at() of the object open as FD."""
    out = ffi.new("struct ufs_attr *")
    _check(lib.ufs_stat_fd(fd, layer_flags, out), b"fd %d" % fd)
    return _attr(out)


def open_at(root_fd: int, path: bytes, flags: int) -> int:
    """Open PATH below ROOT_FD without following a final symlink; long paths are walked."""
    return _check(lib.ufs_open_at(root_fd, path, flags), path)


def rename(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int = 0) -> None:
    """renameat2(2) with its flags."""
    _check(lib.ufs_rename(old_dir_fd, old_name, new_dir_fd, new_name, flags), new_name)


def copy_data(src_fd: int, dst_fd: int, size: int, sync: bool) -> None:
    """Copy SIZE bytes (a reflink where possible, holes kept); with SYNC, on disk on return."""
    _check(lib.ufs_copy_data(src_fd, dst_fd, size, lib.UFS_COPY_SYNC if sync else 0), b"copy")


def copy_file(src_dir_fd: int, src_name: bytes, dst_fd: int, st: os.stat_result, with_data: bool,
              sync: bool) -> None:
    """Make DST_FD, an empty file open for writing, a copy of regular file SRC_NAME with the owner,
    mode and times of ST (and its data, WITH_DATA); with SYNC, its data is on disk on return."""
    meta = ffi.new("struct ufs_copy_meta *", {"uid": st.st_uid, "gid": st.st_gid, "mode": st.st_mode,
                                               "size": st.st_size, "atime_ns": st.st_atime_ns,
                                               "mtime_ns": st.st_mtime_ns})
    flags = (lib.UFS_COPY_DATA if with_data else 0) | (lib.UFS_COPY_SYNC if sync else 0)
    _check(lib.ufs_copy_file(src_dir_fd, src_name, dst_fd, meta, flags), src_name)


def name_to_handle(dir_fd: int, name: bytes) -> tuple[int, bytes]:
    """(handle type, handle bytes) of NAME in DIR_FD."""
    handle = ffi.new("unsigned char[]", lib.UFS_HANDLE_MAX)
    length, kind = ffi.new("unsigned int *"), ffi.new("int *")
    _check(lib.ufs_name_to_handle(dir_fd, name, handle, length, kind), name)
    return kind[0], bytes(ffi.buffer(handle, length[0]))


def stat_handle(mount_fd: int, kind: int, handle: bytes) -> Attr | None:
    """lstat() of the object HANDLE names on MOUNT_FD's filesystem; None when it is not there."""
    out = ffi.new("struct ufs_attr *")
    rc = lib.ufs_stat_handle(mount_fd, handle, len(handle), kind, out)
    return None if rc < 0 else _attr(out)
