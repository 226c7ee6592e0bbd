"""Unpacking an image layer (an OCI or Docker layer tar, plain, gzip or zstd) into a directory in
the kernel's overlay format: `.wh.NAME` becomes a char 0:0 whiteout, `.wh..wh..opq` an
`overlay.opaque` xattr, so that pyunionfs, kernel overlayfs and fuse-overlayfs can all mount it.

Layer tarballs are untrusted. Every entry is written through fds that follow no symlink: a name
with "..", an entry below a symlink the layer made, or a hard link to a name the layer does not
have is refused, and so is a truncated or corrupt archive; absolute names are taken from the
layer root, as podman takes them. Ownership, set-id bits, xattrs (file capabilities among them),
long names and holes are kept as given; overlay metadata xattrs in the tar are not (they are the
store's format, not the image's); device nodes are skipped when unpacking without privilege."""
from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from unionfs.errors import ConfigError
from unionfs.fs import syscalls
from unionfs.fs.syscalls import SELF
from unionfs.fs.whiteout import OCI_PREFIX, make_whiteout, set_opaque
from unionfs.store import tarsplit

OCI_OPAQUE = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OPEN_DIRS = 64  # directory fds an unpack keeps open  # AUFS's own bookkeeping (.wh..wh..plnk, ...): not content
XATTR_PAX_PREFIX = "SCHILY.xattr."
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
CHUNK = 1 << 20
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class LayerError(ConfigError):
    """An archive or layer that cannot be stored: one line, nothing stored."""


class _Hashing:
    """A read-only stream that hashes what is read from it, and hands it to a tar-split recorder."""

    def __init__(self, raw: BinaryIO, recorder: tarsplit.Recorder):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.recorder = recorder

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.recorder.feed(self.size, data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def decompressed(raw: BinaryIO) -> BinaryIO:
    """RAW (a buffered binary stream) decompressed by its magic: gzip, zstd or none."""
    magic = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


@dataclass
class Unpacked:
    diff_id: str  # sha256:HEX of the uncompressed tar
    size: int  # its bytes


def unpack(raw: BinaryIO, dest_fd: int, split: BinaryIO, xattr_namespace: bytes, privileged: bool) -> Unpacked:
    """Unpack the layer in RAW into the empty directory DEST_FD, and its tar-split into SPLIT.
    XATTR_NAMESPACE is where the opaque marks go (b"trusted." or b"user."); without PRIVILEGED,
    device nodes are skipped."""
    recorder = tarsplit.Recorder(split)
    stream = _Hashing(decompressed(raw), recorder)
    layer = _Layer(dest_fd, xattr_namespace, privileged)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = _parts(member.name)
                if parts and not parts[-1].startswith(OCI_PREFIX.decode()):  # kept as a file at its path
                    recorder.member(member, "/".join(parts))
                layer.add(tar, member, parts)
        stream.drain()  # the end-of-archive padding counts in the diff_id
        recorder.finish()
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError) as exc:
        if isinstance(exc, LayerError):
            raise
        raise LayerError(f"the layer archive is corrupt or truncated: {exc}") from None
    finally:
        layer.close()
    layer.finish()
    return Unpacked("sha256:" + stream.digest.hexdigest(), stream.size)


def _parts(name: str) -> list[str]:
    """NAME's components below the layer root; ".." anywhere is refused."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"the layer has an entry outside it: {name}")
    return parts


class _Layer:
    def __init__(self, root_fd: int, xattr_namespace: bytes, privileged: bool):
        self.root = root_fd
        self.xattr_namespace = xattr_namespace
        self.privileged = privileged
        self.directories: list[tuple[list[str], tarfile.TarInfo]] = []  # their times are set last
        # O_PATH fds of the directories entries went into lately, by path: an archive lists a
        # directory's entries together, and walking from the root for each costs a few system
        # calls per component. An entry that replaces a directory drops it and what is below.
        self._open_dirs: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        for fd in self._open_dirs.values():
            os.close(fd)
        self._open_dirs.clear()

    def _directory(self, parts: tuple[str, ...], name: str) -> int:
        """An fd (the cache's: not to be closed) of the directory PARTS, made (0755, as podman)
        where missing; a symlink or a file on the way is refused."""
        if not parts:
            return self.root
        fd = self._open_dirs.get(parts)
        if fd is not None:
            return fd
        parent = self._directory(parts[:-1], name)
        try:
            fd = syscalls.ensure_dir(parent, parts[-1].encode(), 0o755)
        except (NotADirectoryError, FileExistsError):
            raise LayerError(f"the layer has an entry below a symlink or a file: {name}") from None
        if len(self._open_dirs) >= OPEN_DIRS:
            os.close(self._open_dirs.pop(next(iter(self._open_dirs))))  # the oldest
        self._open_dirs[parts] = fd
        return fd

    def _forget(self, parts: tuple[str, ...]) -> None:
        """PARTS is about to be removed or replaced: its fd, and those below it, are stale."""
        for key in [key for key in self._open_dirs if key[:len(parts)] == parts]:
            os.close(self._open_dirs.pop(key))

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str]) -> None:
        if not parts:  # the layer root itself
            if member.isdir():
                self.directories.append((parts, member))
            return
        base = parts[-1]
        dir_fd = self._directory(tuple(parts[:-1]), member.name)
        if base == OCI_OPAQUE:
            set_opaque(dir_fd, SELF, self.xattr_namespace)
        elif base.startswith(AUFS_META_PREFIX):
            pass
        elif base.startswith(OCI_PREFIX.decode()):
            name = base[len(OCI_PREFIX):]
            if not name:
                raise LayerError(f"the layer has a whiteout of nothing: {member.name}")
            self._clear(dir_fd, [*parts[:-1], name])
            make_whiteout(dir_fd, name.encode())
        else:
            self._make(tar, member, dir_fd, base.encode(), parts)

    def _clear(self, dir_fd: int, parts: list[str]) -> None:
        """Make room for PARTS (whose directory is DIR_FD): a later entry of a layer replaces an
        earlier one (a directory stays when a directory replaces it)."""
        name = parts[-1].encode()
        if syscalls.lstat_or_none(dir_fd, name) is not None:
            self._remove(dir_fd, parts)

    def _remove(self, dir_fd: int, parts: list[str]) -> None:
        self._forget(tuple(parts))
        syscalls.remove_tree(dir_fd, parts[-1].encode())

    def _make(self, tar: tarfile.TarFile, member: tarfile.TarInfo, dir_fd: int, name: bytes, parts: list[str]) -> None:
        existing = syscalls.lstat_or_none(dir_fd, name)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(dir_fd, parts)
                syscalls.mkdir(dir_fd, name, 0o700)
            self.directories.append((parts, member))
            return
        if existing is not None:
            self._remove(dir_fd, parts)
        if member.isreg():
            fd = syscalls.create(dir_fd, name, os.O_WRONLY, 0o600)
            try:
                _copy_data(tar.extractfile(member), fd, member.size)
            finally:
                os.close(fd)
        elif member.issym():
            syscalls.symlink(os.fsencode(member.linkname), dir_fd, name)
        elif member.islnk():
            self._link(member, dir_fd, name)
            return  # a hard link shares its target's metadata
        elif member.isfifo():
            syscalls.mknod(dir_fd, name, stat.S_IFIFO | 0o600)
        elif member.ischr() or member.isblk():
            if not self.privileged:
                return  # an unprivileged user cannot make devices, as with rootless podman
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            syscalls.mknod(dir_fd, name, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        else:
            raise LayerError(f"the layer has an entry of an unknown type: {member.name}")
        self._metadata(dir_fd, name, member)

    def _link(self, member: tarfile.TarInfo, dir_fd: int, name: bytes) -> None:
        target = _parts(member.linkname)
        if not target:
            raise LayerError(f"the layer links to its root: {member.name}")
        try:
            source_dir = syscalls.open_beneath(self.root, "/".join(target[:-1]).encode() or b".",
                                               os.O_PATH | os.O_DIRECTORY)
        except OSError:
            raise LayerError(f"the layer links to a name it does not have: {member.name} -> {member.linkname}") from None
        try:
            syscalls.link(source_dir, target[-1].encode(), dir_fd, name)
        except FileNotFoundError:
            raise LayerError(f"the layer links to a name it does not have: {member.name} -> {member.linkname}") from None
        finally:
            os.close(source_dir)

    def _metadata(self, dir_fd: int, name: bytes, member: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs and times as given; in that order, since a chown clears set-id bits
        and file capabilities."""
        syscalls.chown(dir_fd, name, member.uid, member.gid)
        if not member.issym():
            syscalls.chmod(dir_fd, name, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PAX_PREFIX):
                xattr = key[len(XATTR_PAX_PREFIX):]
                if not xattr.startswith(OVERLAY_XATTRS):
                    syscalls.setxattr(dir_fd, name, xattr.encode(), value.encode("utf-8", "surrogateescape"))
        mtime = int(member.mtime * 1_000_000_000)
        syscalls.utime(dir_fd, name, (mtime, mtime))

    def finish(self) -> None:
        """Directories' metadata last (their entries changed their times), deepest first."""
        for parts, member in sorted(self.directories, key=lambda item: -len(item[0])):
            if not parts:
                self._metadata(self.root, SELF, member)
                continue
            parent = syscalls.open_beneath(self.root, "/".join(parts[:-1]).encode() or b".", os.O_PATH | os.O_DIRECTORY)
            try:
                self._metadata(parent, parts[-1].encode(), member)
            finally:
                os.close(parent)


def _copy_data(source: BinaryIO, fd: int, size: int) -> None:
    """SIZE bytes from SOURCE into the new file FD; runs of zeros become holes."""
    written, hole_at_end = 0, False
    while written < size:
        chunk = source.read(min(CHUNK, size - written))
        if not chunk:
            raise LayerError("the layer archive is truncated")
        hole_at_end = chunk.count(0) == len(chunk)
        if hole_at_end:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        written += len(chunk)
    if hole_at_end:  # a file that ends in a hole gets its size from a truncate
        os.ftruncate(fd, size)
