"""Listing passes: the snapshot of a directory's entries that one pass of READDIRPLUS requests is
answered from, so that offsets stay valid from one request to the next (kernel overlayfs keeps
its merged listings the same way, and reuses one while the directory is unchanged)."""
from __future__ import annotations

from typing import Callable

import pyfuse3

from unionfs.fs.inodes import Node

Entry = tuple[bytes, Node | pyfuse3.EntryAttributes]  # a name and its node (or attributes only)

# Snapshots are kept until the kernel's closing read of their pass, for this many directories at
# most (a client may stop reading before the end); the oldest goes first. A pass in progress
# whose snapshot went is listed again, in the same order.
KEPT_MAX = 64


class Listings:
    def __init__(self, listdir: Callable[[Node], list[Entry]]):
        self._listdir = listdir
        self._snapshots: dict[int, list[Entry]] = {}  # dir node id -> entries of its last pass
        self._unchanged: set[int] = set()  # dirs whose snapshot no change through the mount made old

    def entries(self, node: Node, start: int) -> list[Entry] | None:
        """The entries that answer a read of directory NODE from offset START; None for the
        kernel's closing read after a pass that was replied to the end (nothing more to say,
        and no need to list the directory again to find that out)."""
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
