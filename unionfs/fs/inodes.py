"""The inode table: one node per union object, with ready-made attributes, kept while the kernel
holds a reference (lookup count) and dropped on FORGET.

FUSE node ids and st_ino are kept apart: node ids come from a counter and are never reused within a
mount, while st_ino is the object's stable, composed number. When a layer filesystem reuses an
inode number for a new object, the kernel therefore never mistakes it for an old one it still
caches."""
from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pyfuse3

from unionfs.fs.core import Found
from unionfs.fs.idmap import IdMap
from unionfs.fs.layers import ROOT_PATH
from unionfs.fs.options import DEFAULT_TIMEOUT

ROOT_ID: int = pyfuse3.ROOT_INODE
SHRINK_BELOW = 8  # the node tables are rebuilt when they hold this much less than they did
SHRINK_MIN = 16384  # nodes: under this the tables' room does not matter


def _locate_stat_ino() -> int | None:
    """The offset of attr.st_ino inside a pyfuse3 EntryAttributes object, or None.

    pyfuse3's st_ino setter writes the FUSE node id and attr.st_ino from one value and offers no way
    to set them apart, so the second is written in place. The offset is found by probing a fresh
    object and is used only when the probe finds the struct fuse_entry_param layout it expects:
    node id, then generation, then the struct stat, whose st_ino follows the 8-byte st_dev."""
    probe = 0x5EEDF00DC0FFEE11
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = probe
    raw = ctypes.string_at(id(entry), type(entry).__basicsize__)
    needle = probe.to_bytes(8, "little")
    offsets = [i for i in range(len(raw) - 7) if raw[i:i + 8] == needle]
    if len(offsets) != 2 or offsets[1] - offsets[0] != 24:
        return None
    ctypes.c_uint64.from_address(id(entry) + offsets[1]).value = 1
    return offsets[1] if entry.st_ino == probe else None


_STAT_INO_OFFSET = _locate_stat_ino()
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
SEPARATE_NODE_IDS = _STAT_INO_OFFSET is not None


@dataclass(frozen=True)
class AttrView:
    """How the layers' attributes are shown through the mount: how long the kernel may cache
    them, owners shifted or squashed (fuse-overlayfs's uidmapping, squash_to_*), and directory
    link counts (static_nlink: always 1)."""

    timeout: float = DEFAULT_TIMEOUT
    uids: IdMap = field(default_factory=IdMap)
    gids: IdMap = field(default_factory=IdMap)
    static_nlink: bool = False

    @functools.cached_property
    def ids_as_stored(self) -> bool:
        """Are owners shown as stored (no mapping, no squashing)?"""
        return self.uids.identity and self.gids.identity


NO_OPEN_FILES: frozenset = frozenset()
NO_LOWER_PATHS: Mapping[int, bytes] = {}  # never changed: nodes replace their mapping


class OneLowerPath(Mapping):
    """The lower paths of an object in one lower layer, as most are: a mapping in a fifth of a
    dict's memory."""

    __slots__ = ("layer", "path")

    def __init__(self, layer: int, path: bytes):
        self.layer, self.path = layer, path

    def __getitem__(self, layer: int) -> bytes:
        if layer != self.layer:
            raise KeyError(layer)
        return self.path

    def __iter__(self) -> Iterator[int]:
        yield self.layer

    def __len__(self) -> int:
        return 1


def compact(lower_paths: Mapping[int, bytes]) -> Mapping[int, bytes]:
    """LOWER_PATHS as a node keeps them: the smallest mapping that holds them."""
    if not lower_paths:
        return NO_LOWER_PATHS
    if len(lower_paths) == 1 and not isinstance(lower_paths, OneLowerPath):
        ((layer, path),) = lower_paths.items()
        return OneLowerPath(layer, path)
    return lower_paths


class Node:
    """A union object the kernel knows, found under its parent by name. There is one per object
    the kernel holds (300,000 after listing such a directory): what most nodes never need (open
    files, more names) is shared and empty until they do."""

    __slots__ = ("id", "ino", "parent", "name", "other_names", "layer", "dir_layers", "lower_paths",
                 "entry", "stale", "lookups", "c_dir", "xattr_names", "open_files", "index_name")

    def __init__(self, node_id: int, ino: int, parent: Node | None, name: bytes, found: Found,
                 lower_paths: dict[int, bytes], view: AttrView):
        self.id = node_id  # the FUSE node id
        self.ino = ino  # st_ino
        self.parent = parent  # None for the root; a directory has one parent
        self.name = name
        self.other_names: tuple[tuple[Node, bytes], ...] = ()  # more hard links the kernel has seen
        self.layer = found.layer  # the layer that holds the visible object
        self.dir_layers = found.dir_layers  # for a directory, the layers it merges
        # Where the object is in each lower layer it is found in. A lower layer's path can differ
        # from the union path: a renamed directory records where its lower copies are
        # (overlay.redirect), and lower layers never move.
        self.lower_paths = compact(lower_paths)
        self.entry = make_entry(node_id, ino, found, view)  # served by lookup, getattr, readdirplus
        self.stale = False  # written since the entry was made: re-read before serving it
        self.lookups = 0
        self.c_dir: tuple | None = None  # (path, per-layer paths, C argument), built on first use
        # The names of the object's xattrs, read on first use: ls -l asks for ACLs and SELinux
        # labels of every file, and most have none, which this answers without a system call.
        self.xattr_names: frozenset[bytes] | None = None
        self.open_files: set | frozenset = NO_OPEN_FILES  # open handles, moved to the upper copy on copy-up
        # A lower hard link whose object another name copied up: its copy in the work index.
        self.index_name: bytes | None = None

    @property
    def path(self) -> bytes:
        """The path relative to every layer root (b"." for the root), from the parent chain, so a
        directory rename moves everything below it at once."""
        if self.parent is None:
            return ROOT_PATH
        if self.name is None:
            raise FileNotFoundError(errno.ENOENT, "the name of this object was removed")
        names = [self.name]
        node = self.parent
        while node.parent is not None:
            names.append(node.name)
            node = node.parent
        return b"/".join(reversed(names))

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.entry.st_mode)

    def add_open_file(self, handle: object) -> None:
        if self.open_files is NO_OPEN_FILES:
            self.open_files = set()
        self.open_files.add(handle)

    def remove_open_file(self, handle: object) -> None:
        self.open_files.discard(handle)
        if not self.open_files:
            self.open_files = NO_OPEN_FILES

    def detach(self) -> None:
        """The object has no name the node knows of; a later lookup may find one."""
        self.name = None
        self.other_names = ()

    def add_name(self, parent: Node, name: bytes) -> None:
        """Another name (a hard link) of this object."""
        if self.name is None:
            self.parent, self.name = parent, name
        elif (parent, name) != (self.parent, self.name) and (parent, name) not in self.other_names:
            self.other_names += ((parent, name),)

    def remove_name(self, parent: Node, name: bytes) -> None:
        if (parent, name) == (self.parent, self.name):
            if self.other_names:
                (self.parent, self.name), self.other_names = self.other_names[-1], self.other_names[:-1]
            else:
                self.detach()
        else:
            self.other_names = tuple(other for other in self.other_names if other != (parent, name))

    def move_name(self, old: tuple[Node, bytes], new: tuple[Node, bytes]) -> None:
        if old == (self.parent, self.name):
            self.parent, self.name = new
        else:
            self.other_names = tuple(new if other == old else other for other in self.other_names)

    def update(self, found: Found, view: AttrView) -> None:
        """Take new attributes after a change; st_ino and the node id stay."""
        self.layer = found.layer
        if found.dir_layers != self.dir_layers:
            self.dir_layers = found.dir_layers
            self.c_dir = None
        # In place: pyfuse3 copies an entry into its reply at once, so none is held elsewhere.
        fill_entry(self.entry, found, view)
        self.stale = False


def make_entry(node_id: int, ino: int, found: Found, view: AttrView) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = node_id
    if _STAT_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(entry) + _STAT_INO_OFFSET).value = ino
    entry.entry_timeout = view.timeout
    entry.attr_timeout = view.timeout
    fill_entry(entry, found, view)
    return entry


def fill_entry(entry: pyfuse3.EntryAttributes, found: Found, view: AttrView) -> None:
    """Set ENTRY's attributes (all but its ids and timeouts) from FOUND."""
    _, _, size, blocks, rdev, mode, nlink, uid, gid, blksize, atime_ns, mtime_ns, ctime_ns = found.attr
    entry.st_mode = mode
    # Like kernel overlayfs: a merged directory's link count is not worth computing, and 1 keeps
    # find and friends from trusting it.
    if stat.S_ISDIR(mode) and (view.static_nlink or found.dir_layers & (found.dir_layers - 1)):
        nlink = 1
    entry.st_nlink = nlink
    if not view.ids_as_stored:
        uid, gid = view.uids.shown(uid), view.gids.shown(gid)
    entry.st_uid = uid
    entry.st_gid = gid
    entry.st_rdev = rdev
    entry.st_size = size
    entry.st_blksize = blksize
    entry.st_blocks = blocks
    entry.st_atime_ns = atime_ns
    entry.st_mtime_ns = mtime_ns
    entry.st_ctime_ns = ctime_ns


def name_only_entry(ino: int, mode: int) -> pyfuse3.EntryAttributes:
    """A readdirplus entry for a name the kernel lists but cannot look up: node id 0 (no
    reference handed out), with st_ino and the type for the listing."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    if _STAT_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(entry) + _STAT_INO_OFFSET).value = ino
    entry.st_mode = mode
    return entry


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A reply to a lookup of an absent name that lets the kernel cache the absence."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = timeout
    return entry


class InodeTable:
    def __init__(self, root_ino: int, root_found: Found, root_lower_paths: dict[int, bytes], view: AttrView):
        self.view = view
        self._ids = itertools.count(ROOT_ID + 1)
        root = Node(ROOT_ID, root_ino, None, b"", root_found, root_lower_paths, view)
        root.lookups = 1  # the kernel never forgets the root
        self._by_id: dict[int, Node] = {ROOT_ID: root}
        self._by_ino: dict[int, Node] = {root_ino: root}
        self._peak = 1  # the most nodes held since the tables were last rebuilt

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, node_id: int) -> Node:
        """The node for a FUSE node id; KeyError when the kernel asks for one it does not hold."""
        return self._by_id[node_id]

    def find(self, node_id: int) -> Node | None:
        return self._by_id.get(node_id)

    def node_for(self, ino: int, parent: Node, name: bytes, found: Found, lower_paths: dict[int, bytes]) -> Node:
        """The known node of object INO, or a new one, not yet counted, with a fresh node id.
        When st_ino is also the node id (see SEPARATE_NODE_IDS), st_ino is the node id too."""
        known = self._by_ino.get(ino)
        if known is not None:
            if known.name is None:  # the object's known names were removed: this is another
                known.update(found, self.view)
                known.lower_paths = compact(lower_paths)
            if not stat.S_ISDIR(found.attr.mode):
                known.add_name(parent, name)
            return known
        node_id = next(self._ids) if SEPARATE_NODE_IDS else ino
        return Node(node_id, ino, parent, name, found, lower_paths, self.view)

    def current(self, node: Node) -> Node:
        """The counted node for NODE's object: a listing may hold a node made before another was."""
        return self._by_ino.get(node.ino, node)

    def remember(self, node: Node) -> Node:
        """Count one kernel reference to NODE, which must be current()."""
        known = self._by_ino.setdefault(node.ino, node)
        assert known is node, "remember() takes the current node of an object"
        self._by_id[node.id] = node
        node.lookups += 1
        if len(self._by_id) > self._peak:
            self._peak = len(self._by_id)
        return node

    def drop_object(self, node: Node) -> None:
        """NODE's object is gone from the union. The kernel may still hold the node (an open
        file), but a new object that reuses the inode number must get a node of its own."""
        node.detach()
        if self._by_ino.get(node.ino) is node:
            del self._by_ino[node.ino]

    def forget(self, node_id: int, count: int) -> bool:
        """Drop COUNT of the kernel's references to node NODE_ID; whether the node went."""
        node = self._by_id.get(node_id)
        if node is None or node_id == ROOT_ID:
            return False
        node.lookups -= count
        if node.lookups <= 0:
            del self._by_id[node_id]
            if self._by_ino.get(node.ino) is node:
                del self._by_ino[node.ino]
            if len(self._by_id) < self._peak // SHRINK_BELOW and self._peak > SHRINK_MIN:
                self._shrink()
            return True
        return False

    def _shrink(self) -> None:
        """Copy the tables: a dict never gives back the room of the entries removed from it, so
        after the kernel forgot a huge listing, two tables sized for it would stay."""
        self._by_id, self._by_ino = dict(self._by_id), dict(self._by_ino)
        self._peak = len(self._by_id)
        # Hand back the C heap's free room too (the big listing's names): glibc keeps it.
        if _malloc_trim is not None:
            _malloc_trim(0)
