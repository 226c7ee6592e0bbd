"""Listings read ahead on another CPU. A walk (find, ls -R, tar) lists a directory, then each of
its subdirectories, and most of a listing's daemon time is the C core reading and resolving the
entries in each layer. When a listing shows subdirectories of the lower layers alone, the C
core's read-ahead thread (csrc/readahead.c) reads them ahead, the first one first (a walk goes
depth first), without the GIL, and keeps them for the listing that asks: the daemon's own thread
is left with its Python part. Only directories of the lower layers alone: the lower layers never
change, and a change through the mount copies a directory up first, after which the paths it
spans differ from those it was read at (and the copy-up drops all that was read ahead)."""
from __future__ import annotations

from typing import Any, Sequence

from unionfs.fs import core

# A directory with more entries is not kept: its listing streams through the C core in batches.
# Nor is one whose own size says it has that many (a directory of ext4 holds some hundred names
# per 4 KiB), so that a huge directory's names are not all read for nothing.
ENTRIES_MAX = 1024
DIR_SIZE_MAX = 64 << 10
# Entries kept at most (584 bytes of C struct each: 2.3 MiB), and directories queued at most;
# the oldest go first (a depth-first walk needs them last). A walk needs little kept: the thread
# reads the next directory while the daemon answers for the last one.
KEPT_ENTRIES_MAX = 4096
QUEUED_MAX = 512

DirPaths = tuple[bytes | None, ...]


class ReadAhead:
    def __init__(self, layers: core.LayerArray):
        self._reader = core.DirReader(layers, ENTRIES_MAX, KEPT_ENTRIES_MAX, QUEUED_MAX)
        # What each queued directory was read as, to check it still holds when taken (newest last).
        self._queued: dict[int, DirPaths] = {}
        self.used = 0  # listings answered from what was read ahead

    def queue(self, dirs: Sequence[tuple[int, Sequence[bytes | None], Any]]) -> None:
        """Read DIRS, (node id, path in each layer, their C argument) of each, ahead; the first
        one is read first."""
        for node_id, dir_paths, c_dir in reversed(dirs):
            self._queued.pop(node_id, None)
            self._queued[node_id] = tuple(dir_paths)
            self._reader.queue(node_id, c_dir)
        while len(self._queued) > QUEUED_MAX + KEPT_ENTRIES_MAX:  # more than the reader holds
            del self._queued[next(iter(self._queued))]

    def take(self, node_id: int, dir_paths: Sequence[bytes | None]) -> bytes | None:
        """What was read ahead of directory NODE_ID, if it still holds: its entries as the C
        core's structs (core.entries()), else None."""
        read_as = self._queued.pop(node_id, None)
        if read_as is None:
            return None
        raw = self._reader.take(node_id)
        if raw is None or read_as != tuple(dir_paths):
            return None
        self.used += 1
        return raw

    def changed(self) -> None:
        """A directory was copied up: what was read ahead may show it as it was."""
        self._queued.clear()
        self._reader.clear()

    def stop(self) -> None:
        """Stop the thread (before the layers close: it reads through their fds)."""
        self._reader.stop()
