"""What a container changed, read from its upper layer in the kernel's format, against its
image: the list `diff` prints (A, C, D as podman's), the OCI layer `commit` stores, and the
whole root filesystem `export` writes.

The union is read in-process through the filesystem's own lookup code (fs/union.py, read-only,
not mounted), so a renamed directory (overlay.redirect) or a metacopy file reads exactly as the
container saw it. OCI has no redirect, so a renamed directory goes into the layer in full; the
kernel's whiteouts and opaque directories become `.wh.NAME` and `.wh..wh..opq`; overlay xattrs
stay behind (the union does not show them); hard links stay hard links."""
from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from unionfs.fs import syscalls
from unionfs.fs.inodes import ROOT_ID, Node
from unionfs.fs.layers import ROOT_PATH, LayerStack, child_path
from unionfs.fs.union import Union
from unionfs.fs.whiteout import OCI_PREFIX, is_whiteout
from unionfs.store.unpack import CHUNK, OCI_OPAQUE, XATTR_PAX_PREFIX

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True)
class Change:
    kind: str  # ADDED, CHANGED or DELETED
    path: str  # from the root, as podman prints it: /etc/passwd


def _shown(path: bytes) -> str:
    return "/" + os.fsdecode(path)


class ContainerView:
    """A container's union (its upper over its image's layers, top first), and the image's own,
    for reading; nothing is mounted and nothing written."""

    def __init__(self, lowers: list[str], upper: str, runtime_paths: frozenset[str] = frozenset()):
        self.merged = Union(LayerStack(lowers, upper))
        # Mount targets the runtime made (/proc, /etc/hosts, ...): not the container's changes.
        self.runtime_paths = runtime_paths
        self.image = Union(LayerStack(lowers))
        self.namespace = self.merged.stack.xattr_namespace
        self.upper_fd = self.merged.stack.top().root_fd

    def close(self) -> None:
        self.merged.close()
        self.image.close()

    def __enter__(self) -> ContainerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the two views ----

    def _in_image(self, directory: Node | None, name: bytes) -> Node | None:
        """The image's object NAME in its DIRECTORY (None: the image has no such directory), if it
        has one."""
        if directory is None or not stat.S_ISDIR(directory.entry.st_mode):
            return None
        try:
            return self.image.lookup_existing(directory, name)
        except FileNotFoundError:
            return None

    def _merged(self, parent: Node, name: bytes) -> Node:
        return self.merged.lookup_existing(parent, name)

    @contextlib.contextmanager
    def _upper_dir(self, path: bytes) -> Iterator[int]:
        fd = syscalls.open_beneath(self.upper_fd, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _upper_entries(self, path: bytes, below: Node | None
                       ) -> list[tuple[bytes, os.stat_result | None, bytes | None, bool]]:
        """The entries of upper directory PATH (BELOW: the image's object there): (name, lstat,
        redirect, opaque), sorted. An OCI `.wh.NAME` marker in the upper (as containers/storage
        writes its layers) is taken as a whiteout of NAME (its lstat None). A mount target the
        runtime made is left out."""
        entries = []
        with self._upper_dir(path) as fd:
            for name in sorted(syscalls.listdir(fd)):
                if _shown(child_path(path, name)) in self.runtime_paths and self._in_image(below, name) is None:
                    continue
                st = syscalls.lstat(fd, name)
                redirect = opaque = None
                if stat.S_ISDIR(st.st_mode):
                    redirect = syscalls.getxattr_or_none(fd, name, self.namespace + b"overlay.redirect")
                    opaque = syscalls.getxattr_or_none(fd, name, self.namespace + b"overlay.opaque") == b"y"
                if name.startswith(OCI_PREFIX) and len(name) > len(OCI_PREFIX):
                    name = name[len(OCI_PREFIX):]
                    st = None  # a whiteout
                entries.append((name, st, redirect, bool(opaque)))
        return entries

    # ---- the changes ----

    def _changes(self, directory: Node, path: bytes, below_dir: Node | None, opaque_dir: bool = False
                 ) -> list[_Record]:
        """The changes below DIRECTORY (PATH in the union; BELOW_DIR, the image's object there;
        OPAQUE_DIR, whether it hides that object's entries), parents before their children."""
        entries = self._upper_entries(path, below_dir)
        records: list[_Record] = []
        if opaque_dir and below_dir is not None and stat.S_ISDIR(below_dir.entry.st_mode):
            listed = {entry[0] for entry in entries}
            records += [_Record(DELETED, child_path(path, name), implied=True)
                        for name, _ in self._names(self.image, below_dir) if name not in listed]
        for name, st, redirect, opaque in entries:
            child = child_path(path, name)
            below = self._in_image(below_dir, name)
            if st is None or is_whiteout(st):
                if below is not None:
                    records.append(_Record(DELETED, child))
                continue
            kind = CHANGED if below is not None and redirect is None else ADDED
            node = self._merged(directory, name)
            if not stat.S_ISDIR(st.st_mode):
                records.append(_Record(kind, child, node))
            elif redirect is not None:  # moved here: all of it is new at this path
                records.append(_Record(ADDED, child, node, whole=True))
            else:
                inside = self._changes(node, child, below, opaque)
                if inside or opaque or not self._same_metadata(node, below):
                    records += [_Record(kind, child, node, opaque=opaque), *inside]
                # else: copied up only to hold the runtime's mount targets
        return records

    def _all_changes(self) -> list[_Record]:
        return self._changes(self.merged.inodes.get(ROOT_ID), ROOT_PATH, self.image.inodes.get(ROOT_ID))

    def changes(self) -> list[Change]:
        """What the container added, changed and deleted, sorted by path as podman diff prints."""
        found = []
        for record in self._all_changes():
            found.append(Change(record.kind, _shown(record.path)))
            if record.whole:
                found += [Change(ADDED, _shown(path)) for path, _ in self._tree(record.node, record.path)]
        return sorted(found, key=lambda change: change.path)

    def _same_metadata(self, node: Node, below: Node | None) -> bool:
        """Are NODE's owner, mode and xattrs those of the image's BELOW?"""
        if below is None:
            return False
        a, b = node.entry, below.entry
        return ((a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid)
                and _xattrs(self.merged, node) == _xattrs(self.image, below))

    @staticmethod
    def _names(union: Union, directory: Node) -> list[tuple[bytes, Node]]:
        return sorted((name, node) for name, node in union.listdir(directory)[2:] if isinstance(node, Node))

    def _tree(self, directory: Node, path: bytes) -> Iterator[tuple[bytes, Node]]:
        """Everything below DIRECTORY in the container's view, parents first."""
        for name, node in self._names(self.merged, directory):
            child = child_path(path, name)
            yield child, node
            if stat.S_ISDIR(node.entry.st_mode):
                yield from self._tree(node, child)

    # ---- commit and export ----

    def write_layer(self, out: BinaryIO) -> None:
        """The container's changes as an OCI layer tar."""
        with _Writer(self.merged, out) as writer:
            for record in self._all_changes():
                if record.kind == DELETED:
                    if not record.implied:  # (an opaque directory's marker stands for those)
                        writer.whiteout(record.path)
                    continue
                writer.add(record.path, record.node)
                if record.opaque:
                    writer.opaque(record.path)
                if record.whole:  # OCI has no redirect: the directory in full
                    for path, node in self._tree(record.node, record.path):
                        writer.add(path, node)

    def write_root(self, out: BinaryIO) -> None:
        """The container's whole root filesystem as a tar, as `podman export` writes it."""
        with _Writer(self.merged, out) as writer:
            for path, node in self._tree(self.merged.inodes.get(ROOT_ID), ROOT_PATH):
                writer.add(path, node)


@dataclass(frozen=True)
class _Record:
    kind: str
    path: bytes
    node: Node | None = None  # the object in the container's view (not for DELETED)
    opaque: bool = False  # a directory that hides what the image had in it
    whole: bool = False  # a renamed directory: everything below it is new at this path
    implied: bool = False  # deleted with its opaque directory's contents


def _xattrs(union: Union, node: Node) -> dict[bytes, bytes]:
    return {key: union.getxattr(node, key) for key in union.listxattr(node)}


class _Writer:
    """A PAX tar of union objects: xattrs as SCHILY.xattr records, hard links as links to the
    first name written."""

    def __init__(self, union: Union, out: BinaryIO):
        self.union = union
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        self.first_names: dict[int, str] = {}

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tar.close()

    def whiteout(self, path: bytes) -> None:
        parent, _, name = path.rpartition(b"/")
        self._marker(child_path(parent or ROOT_PATH, OCI_PREFIX + name))

    def opaque(self, directory: bytes) -> None:
        self._marker(child_path(directory, OCI_OPAQUE.encode()))

    def _marker(self, path: bytes) -> None:
        info = tarfile.TarInfo(os.fsdecode(path))
        info.mode = 0o644
        self.tar.addfile(info)

    def add(self, path: bytes, node: Node) -> None:
        attr = node.entry
        mode = attr.st_mode
        name = os.fsdecode(path)
        info = tarfile.TarInfo(name + ("/" if stat.S_ISDIR(mode) else ""))
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = attr.st_uid, attr.st_gid
        info.uname = info.gname = ""
        info.mtime = attr.st_mtime_ns / 1e9
        if not stat.S_ISDIR(mode) and attr.st_nlink > 1:
            first = self.first_names.setdefault(node.ino, name)
            if first != name:
                info.type, info.linkname = tarfile.LNKTYPE, first
                self.tar.addfile(info)
                return
        info.pax_headers = {XATTR_PAX_PREFIX + os.fsdecode(key): value.decode("utf-8", "surrogateescape")
                            for key, value in _xattrs(self.union, node).items()}
        if stat.S_ISREG(mode):
            info.size = attr.st_size
            fd = self.union.open_file(node, os.O_RDONLY)
            with open(fd, "rb", buffering=CHUNK) as data:
                self.tar.addfile(info, data)
            return
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.fsdecode(self.union.readlink(node))
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(attr.st_rdev), os.minor(attr.st_rdev)
        else:
            return  # a socket: tar has no type for it, and no process listens on it any more
        self.tar.addfile(info)
