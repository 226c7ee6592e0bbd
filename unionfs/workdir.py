"""The work directory: where new upper objects are built before a rename puts them in place, so a
crash leaves either the old object or the whole new one. Laid out as kernel overlayfs lays out its
own (WORKDIR/work), so either can mount the other's upper and workdir."""
from __future__ import annotations

import itertools
import os
import shutil

WORK_SUBDIR = "work"
INDEX_SUBDIR = "index"  # upper copies of lower hard links, by origin (kernel's index=on format)


class WorkDir:
    def __init__(self, workdir: str):
        path = os.path.join(workdir, WORK_SUBDIR)
        os.makedirs(path, mode=0o000, exist_ok=True)
        self._clean(path)
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        index = os.path.join(workdir, INDEX_SUBDIR)
        os.makedirs(index, mode=0o000, exist_ok=True)
        self.index_fd = os.open(index, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._names = itertools.count(1)

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

    def remove(self, name: bytes) -> None:
        """Remove a temporary object, whatever its type."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except IsADirectoryError:
            shutil.rmtree(os.fsdecode(name), dir_fd=self.fd)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.index_fd)
