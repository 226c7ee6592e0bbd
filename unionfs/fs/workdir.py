"""The work directory: where new upper objects are built before a rename puts them in place, so a
crash leaves either the old object or the whole new one. Laid out as kernel overlayfs lays out its
own (WORKDIR/work), so either can mount the other's upper and workdir."""
from __future__ import annotations

import collections
import fcntl
import itertools
import os
import stat
import threading

from unionfs.fs import syscalls
from unionfs.errors import ConfigError

WORK_SUBDIR = b"work"
INDEX_SUBDIR = b"index"  # upper copies of lower hard links, by origin (kernel's index=on format)
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
                fd = syscalls.open_unnamed(self._dir_fd)
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


def _lock(fd: int, role: str, path: str) -> int:
    """An fd of directory FD with an exclusive flock on it, held for the mount's life (the fd is
    inherited by the daemon): a second mount of the same upper or work directory is refused, as
    kernel overlayfs refuses one with index=on (and warns "upperdir is in use" without)."""
    locked = syscalls.reopen(fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(locked, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(locked)
        raise ConfigError(f"{role} is in use by another mount: {path}") from None
    return locked


class WorkDir:
    """WORKDIR/work, where new upper objects are built, and WORKDIR/index; made, or cleaned of
    what a crashed mount left, through fds that follow no symlink."""

    def __init__(self, workdir: str, upper_fd: int, upper: str):
        root = syscalls.open_root(workdir)
        self._locks: list[int] = []
        try:
            self._locks = [_lock(upper_fd, "upper directory", upper), _lock(root, "workdir", workdir)]
            # Mode 0 as the kernel makes them; an unprivileged owner (no user namespace, so no
            # CAP_DAC_OVERRIDE) needs to reach into them itself, as fuse-overlayfs's 0700.
            mode = 0o000 if os.geteuid() == 0 else 0o700
            # Whatever is at WORKDIR/work (a symlink too) is replaced, as the kernel does; a
            # symlink at WORKDIR/index is refused, as the kernel refuses it (ENOTDIR).
            existing = syscalls.lstat_or_none(root, WORK_SUBDIR)
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                syscalls.remove_tree(root, WORK_SUBDIR)
            self.fd = syscalls.ensure_dir(root, WORK_SUBDIR, mode)
            for name in syscalls.listdir(self.fd):  # half-built copies: never in the upper
                syscalls.remove_tree(self.fd, name)
            self.index_fd = syscalls.ensure_dir(root, INDEX_SUBDIR, mode)
        except OSError as exc:
            self._release()
            raise ConfigError(f"cannot use {os.path.join(workdir, os.fsdecode(exc.filename or ''))}: "
                              f"{exc.strerror}") from None
        except BaseException:
            self._release()
            raise
        finally:
            os.close(root)
        self._names = itertools.count(1)
        self._spares = SpareFiles(self.fd)

    def _release(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def temp_name(self) -> bytes:
        """A fresh name in the work directory, in the kernel's style (#hex)."""
        return b"#%x" % next(self._names)

    def new_file(self, name: bytes) -> int:
        """Create the empty regular file NAME (which must not exist) in the work directory, mode
        0600; returns an fd open for reading and writing."""
        fd = self._spares.take()
        if fd is None:
            return syscalls.create(self.fd, name, os.O_RDWR, 0o600)
        try:
            syscalls.link_open_file(fd, self.fd, name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove(self, name: bytes) -> None:
        """Remove a temporary object, whatever its type."""
        syscalls.remove_tree(self.fd, name)

    def close(self) -> None:
        self._spares.close()
        os.close(self.fd)
        os.close(self.index_fd)
        self._release()
