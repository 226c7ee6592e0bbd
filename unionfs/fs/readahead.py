"""Directory read-ahead: once a listing had to read from the disk, a thread reads the
subdirectories it lists the same way (csrc/unionfs_core.h: ufs_warm_dir), so that their blocks,
dentries and inodes are in the kernel's caches when a walk comes to them. A walk of a tree that
is not cached otherwise waits for the disk at each directory, one read at a time, while the
daemon's own work on the listings waits too; the thread's reads overlap both. It keeps nothing,
and reads through the same symlink-safe C calls as the listings."""
from __future__ import annotations

import itertools
import resource
import threading
import time
from typing import Iterable, Sequence

from unionfs.fs import core

# Directories asked for and not yet read, at most; more are not asked for until the thread caught
# up. They are read oldest first: a walk goes depth first, so the next subtree it comes to is its
# oldest unread sibling, and the directories it lists meanwhile are the newest.
PENDING_MAX = 1024
# Entries read ahead per directory, at most: a huge directory is left to its own listing.
NAMES_MAX = 4096
# Reading ahead uses a CPU the walk does not: where the thread waited for one longer than it ran,
# the CPUs are busy (two walks at once on two of them were 6% slower with it), and it stops for
# this long, dropping what was asked for.
BUSY_PAUSE = 0.5

DirPaths = Sequence[bytes | None]  # a directory's path in each layer, None where it takes no part


def cpu_times() -> tuple[int, int]:
    """Nanoseconds the calling thread has run, and waited to run, so far."""
    with open("/proc/thread-self/schedstat", "rb") as schedstat:
        ran, waited, _ = schedstat.read().split()
    return int(ran), int(waited)


def disk_reads() -> int:
    """Blocks the calling thread has read from storage so far (page-cache hits do not count):
    whether its last system calls found what they needed cached."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_inblock


class DirReadahead:
    """Reads directories ahead for LAYERS (the union's C layer array, whose root fds must outlive
    it: close() it before the layers). The thread starts at the first ask()."""

    def __init__(self, layers: core.LayerArray):
        self._layers = layers
        self._pending: dict[int, DirPaths] = {}  # by node id, oldest first
        # Directories (by node id) whose read ahead went to the disk: their own subdirectories
        # will be wanted ahead too, though their listing then finds everything cached.
        self._uncached: dict[int, None] = {}
        self._wanted = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._paused_until = 0.0
        self.dirs_read = 0  # for the daemon's status line

    def ask(self, dirs: Iterable[tuple[int, DirPaths]]) -> None:
        """Read DIRS ahead (the node id and paths of each), in that order, after those asked for
        before."""
        with self._wanted:
            if self._closed or time.monotonic() < self._paused_until:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._read, name="readahead", daemon=True)
                self._thread.start()
            for node_id, dir_paths in itertools.islice(dirs, PENDING_MAX - len(self._pending)):
                self._pending.setdefault(node_id, dir_paths)
            self._wanted.notify()

    def listing(self, node_id: int) -> bool:
        """Directory NODE_ID is being listed: not to be read ahead any more (the walk got there
        first). Did reading it ahead go to the disk?"""
        with self._wanted:
            self._pending.pop(node_id, None)
            return self._uncached.pop(node_id, 0) is None

    def _read(self) -> None:
        while True:
            with self._wanted:
                while not self._closed and not self._pending:
                    self._wanted.wait()
                if self._closed:
                    return
                node_id = next(iter(self._pending))
                dir_paths = self._pending.pop(node_id)
            reads_before, (ran_before, waited_before) = disk_reads(), cpu_times()
            # Errors are the listing's to report, when it comes; the GIL is let go meanwhile.
            self._layers.warm(self._layers.dir_paths(dir_paths), NAMES_MAX)
            self.dirs_read += 1
            ran, waited = cpu_times()
            with self._wanted:
                if disk_reads() > reads_before:
                    self._uncached[node_id] = None
                    if len(self._uncached) > PENDING_MAX:
                        del self._uncached[next(iter(self._uncached))]
                if waited - waited_before > ran - ran_before:
                    self._pending.clear()
                    self._paused_until = time.monotonic() + BUSY_PAUSE

    def close(self) -> None:
        with self._wanted:
            self._closed = True
            self._pending.clear()
            self._wanted.notify()
        if self._thread is not None:
            self._thread.join()
