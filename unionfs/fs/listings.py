"""Listing passes: the snapshot of a directory's entries that one pass of READDIRPLUS requests is
answered from, so that offsets stay valid from one request to the next (kernel overlayfs keeps
its merged listings the same way, and reuses one while the directory is unchanged)."""
from __future__ import annotations

from typing import Callable

import pyfuse3

from unionfs.fs import shim
from unionfs.fs.inodes import Node

Entry = tuple[bytes, Node | pyfuse3.EntryAttributes]  # a name and its node (or attributes only)

# Snapshots are kept until the kernel's closing read of their pass, for this many directories at
# most (a client may stop reading before the end); the oldest goes first. A pass in progress
# whose snapshot went is listed again, in the same order.
KEPT_MAX = 64
# The shim answers the closing read of a pass replied to the end, so Python learns that it came
# only at the directory's next read. Until then a snapshot replied to the end is kept only if it
# is this small: rm reads one reply of each directory and then reads it all again, and a
# directory listed in one reply (32 KiB on Linux 6.18, some 190 entries) is that small. A bigger
# one took several replies, its closing read follows, and its nodes would be held after the
# kernel forgot them.
KEPT_AT_END_MAX = 256
# Directories replied to the end, with the offset after their last entry, remembered for this
# many: their closing read, when it comes to Python, is answered without a listing.
ENDED_MAX = 4096


class Listings:
    def __init__(self, listdir: Callable[[Node], list[Entry]]):
        self._listdir = listdir
        self._snapshots: dict[int, list[Entry]] = {}  # dir node id -> entries of its last pass
        self._unchanged: set[int] = set()  # dirs whose snapshot no change through the mount made old
        self._ended: dict[int, int] = {}  # dir node id -> the offset after the last entry replied

    def entries(self, node: Node, start: int) -> list[Entry] | None:
        """The entries that answer a read of directory NODE from offset START; None for the
        kernel's closing read after a pass that was replied to the end (nothing more to say,
        and no need to list the directory again to find that out)."""
        ended = self._ended.pop(node.id, None)
        if ended is not None:
            closing_read_came = not shim.take_back_listed_end(node.id)
            closing = start == ended  # the closing read itself (no shim, or its slot was taken)
            if (closing or closing_read_came) and node.id in self._snapshots:
                self._drop(node.id)  # the pass is over, read to its end
            if closing:
                return None
        snapshot = self._snapshots.get(node.id)
        if snapshot is not None:
            if start == len(snapshot):
                self._drop(node.id)  # the pass is over (the kernel keeps a complete listing itself)
                return None
            # A pass in progress, or a new one over a snapshot that nothing changed since: rm
            # reads the first chunk of each directory, then opens it again and reads it all.
            if start or node.id in self._unchanged:
                return snapshot
            del self._snapshots[node.id]  # re-inserted below, as the newest
        snapshot = self._snapshots[node.id] = self._listdir(node)
        self._unchanged.add(node.id)
        if len(self._snapshots) > KEPT_MAX:
            self._drop(next(iter(self._snapshots)))
        return snapshot

    def replied_to_end(self, node_id: int, end: int) -> None:
        """Directory NODE_ID's entries were replied up to offset END, its last: the kernel's
        next read there is the closing read, which the shim answers if it comes."""
        snapshot = self._snapshots.get(node_id)
        if snapshot is not None and len(snapshot) > KEPT_AT_END_MAX:
            self._drop(node_id)
        self._ended[node_id] = end
        if len(self._ended) > ENDED_MAX:
            # The shim must not keep an end Python forgot: a new pass that grew past it would be
            # cut short there.
            oldest = next(iter(self._ended))
            del self._ended[oldest]
            shim.take_back_listed_end(oldest)
        shim.listed_to_end(node_id, end)

    def _drop(self, node_id: int) -> None:
        del self._snapshots[node_id]
        self._unchanged.discard(node_id)

    def changed(self, dir_id: int) -> None:
        """Names in directory DIR_ID change: its snapshot serves the passes in progress, but no
        new one."""
        self._unchanged.discard(dir_id)

    def all_changed(self) -> None:
        """A directory may have moved (its ".." is another one): no snapshot serves a new pass."""
        self._unchanged.clear()
