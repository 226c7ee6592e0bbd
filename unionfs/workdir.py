"""The work directory: where new upper objects are built before a rename puts them in place, so a
crash leaves either the old object or the whole new one. Laid out as kernel overlayfs lays out its
own (WORKDIR/work), so either can mount the other's upper and workdir."""
from __future__ import annotations

import collections
import itertools
import os
import shutil
import threading

from unionfs.layers import proc_path

WORK_SUBDIR = "work"
INDEX_SUBDIR = "index"  # upper copies of lower hard links, by origin (kernel's index=on format)
# Unnamed files made ahead of need. Allocating an inode can take ext4 half a millisecond of CPU
# (it skips recently freed inodes one by one): a thread makes them while the loop serves.
SPARE_FILES = 4


class SpareFiles:
    """Empty unnamed files (O_TMPFILE) in one directory, made by a thread that keeps SPARE_FILES
    ready. It starts at the first take(); a filesystem without O_TMPFILE just has no spares."""

    def __init__(self, dir_fd: int):
        self._dir_fd = dir_fd
        self._ready: collections.deque[int] = collections.deque()
        self._wanted = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self) -> int | None:
        """A spare file's fd (open read-write, to be linked or closed by the caller), or None."""
        with self._wanted:
            if self._closed:
                return None
            if self._thread is None:
                self._thread = threading.Thread(target=self._make, name="spare-files", daemon=True)
                self._thread.start()
            self._wanted.notify()
            return self._ready.popleft() if self._ready else None

    def _make(self) -> None:
        while True:
            with self._wanted:
                while not self._closed and len(self._ready) >= SPARE_FILES:
                    self._wanted.wait()
                if self._closed:
                    return
            try:
                fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
            except OSError:  # no O_TMPFILE here (or another error, which a named create reports)
                with self._wanted:
                    self._closed = True
                return
            with self._wanted:
                if self._closed:
                    os.close(fd)
                    return
                self._ready.append(fd)

    def close(self) -> None:
        with self._wanted:
            self._closed = True
            self._wanted.notify()
        if self._thread is not None:
            self._thread.join()
        while self._ready:
            os.close(self._ready.popleft())


class WorkDir:
    def __init__(self, workdir: str):
        # Mode 0 as the kernel makes them; an unprivileged owner (no user namespace, so no
        # CAP_DAC_OVERRIDE) needs to reach into them itself, as fuse-overlayfs's 0700.
        mode = 0o000 if os.geteuid() == 0 else 0o700
        path = os.path.join(workdir, WORK_SUBDIR)
        os.makedirs(path, mode=mode, exist_ok=True)
        self._clean(path)
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        index = os.path.join(workdir, INDEX_SUBDIR)
        os.makedirs(index, mode=mode, exist_ok=True)
        self.index_fd = os.open(index, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._names = itertools.count(1)
        self._spares = SpareFiles(self.fd)

    @staticmethod
    def _clean(path: str) -> None:
        """Remove what a crashed mount left behind: half-built copies are never in the upper."""
        for name in os.listdir(path):
            victim = os.path.join(path, name)
            if os.path.isdir(victim) and not os.path.islink(victim):
                shutil.rmtree(victim)
            else:
                os.unlink(victim)

    def temp_name(self) -> bytes:
        """A fresh name in the work directory, in the kernel's style (#hex)."""
        return b"#%x" % next(self._names)

    def new_file(self, name: bytes) -> int:
        """Create the empty regular file NAME (which must not exist) in the work directory, mode
        0600; returns an fd open for reading and writing."""
        fd = self._spares.take()
        if fd is None:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            os.link(proc_path(fd), name, dst_dir_fd=self.fd)  # follows the /proc link: AT_SYMLINK_FOLLOW
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove(self, name: bytes) -> None:
        """Remove a temporary object, whatever its type."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except IsADirectoryError:
            shutil.rmtree(os.fsdecode(name), dir_fd=self.fd)

    def close(self) -> None:
        self._spares.close()
        os.close(self.fd)
        os.close(self.index_fd)
