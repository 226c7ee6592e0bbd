"""Every system call on an object in a layer or in the work directory, symlink-safe by
construction (after fuse-overlayfs 2.0's `sys/`).

An object is named by (DIR_FD, NAME): NAME is one path component inside the directory DIR_FD,
which the C core opened without following a symlink on the way (openat2 with RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS), and NAME itself is never followed either: each call is an *at call with
AT_SYMLINK_NOFOLLOW, or goes through an O_PATH|O_NOFOLLOW fd of NAME. NAME b"" names the object
DIR_FD itself refers to (an O_PATH fd of it, or an open file that may have lost its name): such
calls go through /proc/self/fd/N, a magic link that leads to exactly that object, a symlink too.
Layer content, which may be hostile, can therefore never send a call outside its layer."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Iterator

from unionfs.fs import core

SELF = b""  # the NAME that stands for DIR_FD's own object


def fd_path(fd: int, name: bytes = SELF) -> bytes:
    """A path naming NAME in directory FD (or FD's object) for calls that take no fd: the /proc
    link works for O_PATH fds too. With a NAME, only the call's final component is NAME, which
    the caller must not follow."""
    return b"/proc/self/fd/%d/%s" % (fd, name) if name else b"/proc/self/fd/%d" % fd


def _follow(name: bytes) -> bool:
    """Whether a call on (DIR_FD, NAME) follows its final component: only the /proc magic link of
    DIR_FD's own object, never NAME."""
    return not name


@contextlib.contextmanager
def object_fd(dir_fd: int, name: bytes) -> Iterator[int]:
    """An O_PATH fd of NAME itself (a symlink too), or DIR_FD for SELF."""
    if not name:
        yield dir_fd
        return
    fd = core.open_at(dir_fd, name, os.O_PATH)
    try:
        yield fd
    finally:
        os.close(fd)


# ---- attributes ----

def lstat(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if name else os.fstat(dir_fd)


def lstat_or_none(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return lstat(dir_fd, name)
    except FileNotFoundError:
        return None


def chown(dir_fd: int, name: bytes, uid: int, gid: int) -> None:
    """The owner (-1 keeps one part), not following NAME."""
    if name:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    else:
        os.chown(fd_path(dir_fd), uid, gid)


def chmod(dir_fd: int, name: bytes, mode: int) -> None:
    """The permission bits; fchmodat has no working AT_SYMLINK_NOFOLLOW, so through an O_PATH fd."""
    with object_fd(dir_fd, name) as fd:
        os.chmod(fd_path(fd), mode)


def utime(dir_fd: int, name: bytes, ns: tuple[int, int]) -> None:
    if name:
        os.utime(name, ns=ns, dir_fd=dir_fd, follow_symlinks=False)
    else:
        os.utime(fd_path(dir_fd), ns=ns)


def truncate(dir_fd: int, name: bytes, size: int) -> None:
    with object_fd(dir_fd, name) as fd:
        os.truncate(fd_path(fd), size)


# ---- extended attributes ----

def getxattr(dir_fd: int, name: bytes, key: bytes) -> bytes:
    return os.getxattr(fd_path(dir_fd, name), key, follow_symlinks=_follow(name))


def getxattr_or_none(dir_fd: int, name: bytes, key: bytes) -> bytes | None:
    try:
        return getxattr(dir_fd, name, key)
    except OSError:
        return None


def setxattr(dir_fd: int, name: bytes, key: bytes, value: bytes) -> None:
    os.setxattr(fd_path(dir_fd, name), key, value, follow_symlinks=_follow(name))


def removexattr(dir_fd: int, name: bytes, key: bytes) -> None:
    os.removexattr(fd_path(dir_fd, name), key, follow_symlinks=_follow(name))


def listxattr(dir_fd: int, name: bytes) -> list[bytes]:
    return [os.fsencode(key) for key in os.listxattr(fd_path(dir_fd, name), follow_symlinks=_follow(name))]


def flistxattr(fd: int) -> list[bytes]:
    """The xattr names of open file FD (not an O_PATH fd, which flistxattr refuses)."""
    return [os.fsencode(key) for key in os.listxattr(fd)]


# ---- names ----

def open_root(path: str) -> int:
    """An O_PATH fd of the layer or work directory the user named (that path is the user's own
    to resolve; everything below it is reached through this fd)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_beneath(dir_fd: int, path: bytes, flags: int) -> int:
    """Open PATH (any number of components) below DIR_FD, following no symlink anywhere."""
    return core.open_at(dir_fd, path, flags)


def reopen(fd: int, flags: int) -> int:
    """A new open file of FD's object, which may have no name any more."""
    return os.open(fd_path(fd), flags | os.O_CLOEXEC)


def create(dir_fd: int, name: bytes, flags: int, mode: int) -> int:
    """Make the regular file NAME, which must not exist, and open it with FLAGS."""
    return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def open_unnamed(dir_fd: int) -> int:
    """An unnamed regular file (O_TMPFILE) in directory DIR_FD, mode 0600, open read-write."""
    return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)


def mkdir(dir_fd: int, name: bytes, mode: int) -> None:
    os.mkdir(name, mode, dir_fd=dir_fd)


def mknod(dir_fd: int, name: bytes, mode: int, device: int = 0) -> None:
    os.mknod(name, mode, device, dir_fd=dir_fd)


def symlink(target: bytes, dir_fd: int, name: bytes) -> None:
    os.symlink(target, name, dir_fd=dir_fd)


def readlink(dir_fd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dir_fd)


def link(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    """A new name for SRC_NAME itself (a symlink is linked, not its target)."""
    os.link(src_name, dst_name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)


def link_open_file(fd: int, dst_dir_fd: int, dst_name: bytes) -> None:
    """A name for the unnamed file open as FD (O_TMPFILE): linkat through its /proc link, which
    works unprivileged, where AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH."""
    os.link(fd_path(fd), dst_name, dst_dir_fd=dst_dir_fd, follow_symlinks=True)


def rename(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int = 0) -> None:
    """renameat2(2) with its flags (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT)."""
    core.rename(old_dir_fd, old_name, new_dir_fd, new_name, flags)


def unlink(dir_fd: int, name: bytes) -> None:
    os.unlink(name, dir_fd=dir_fd)


def remove_tree(dir_fd: int, name: bytes) -> None:
    """Remove NAME, whatever its type, and for a directory everything below it (fd-relative all
    the way down: a symlink inside is removed, never followed)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except IsADirectoryError:
        shutil.rmtree(os.fsdecode(name), dir_fd=dir_fd)


def statvfs(dir_fd: int) -> os.statvfs_result:
    return os.statvfs(fd_path(dir_fd))


def listdir(dir_fd: int) -> list[bytes]:
    """The names in directory DIR_FD (any fd of it, O_PATH too)."""
    fd = os.open(fd_path(dir_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return [os.fsencode(name) for name in os.listdir(fd)]
    finally:
        os.close(fd)


def ensure_dir(dir_fd: int, name: bytes, mode: int) -> int:
    """An O_PATH fd of directory NAME in DIR_FD, made (with MODE) if absent. A symlink or another
    object in its place is an error (ENOTDIR), never followed."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=dir_fd)
    try:
        return core.open_at(dir_fd, name, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(name)) from None
        raise
