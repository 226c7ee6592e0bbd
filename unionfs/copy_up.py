"""Copy-up: bringing a lower object into the upper layer before its first change.

The copy is built in the work directory (data, owner, mode, xattrs, timestamps) and then renamed
into place, so a crash leaves either no upper copy (the lower object still shows) or a whole one.
These functions use only file descriptors (and the work directory's, which is safe from a thread)
and run in a worker thread for big files; the C core (csrc/copy_up.c) does the byte loops."""
from __future__ import annotations

import os
import stat

from unionfs import core, origin, xattrs
from unionfs.layers import proc_path
from unionfs.workdir import WorkDir


def read_xattrs(dir_fd: int, name: bytes) -> list[tuple[bytes, bytes]]:
    """The xattrs a copy takes along: all but overlay metadata."""
    path = proc_path(dir_fd, name)
    result = []
    for key in os.listxattr(path, follow_symlinks=False):
        key_b = os.fsencode(key)
        if not xattrs.is_private(key_b):
            result.append((key_b, os.getxattr(path, key_b, follow_symlinks=False)))
    return result


def apply_metadata(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Give object NAME in DIR_FD the owner, mode and times of ST, in that order: chown clears
    set-id bits."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def set_xattrs(dir_fd: int, name: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    """Set EXTRA on NAME, after its owner (a chown clears security.capability). Setting an xattr
    moves only ctime, which no copy keeps anyway."""
    path = proc_path(dir_fd, name)
    for key, value in extra:
        os.setxattr(path, key, value, follow_symlinks=False)


def build_copy(meta_dir_fd: int, meta_name: bytes, data_dir_fd: int, data_name: bytes, work: WorkDir,
               tmp: bytes, with_data: bool, origin_xattr: bytes, sync: bool) -> None:
    """Build in WORK, as TMP, a copy with the metadata of META_NAME and the data of
    DATA_NAME (the same object, except when a kernel metacopy file gets its data): a full copy of
    a regular file (only its metadata when WITH_DATA is false, for a copy-up that truncates), a
    bare directory, or a symlink, fifo, socket or device, with an ORIGIN_XATTR naming the data
    source, as the kernel records it. With SYNC, the data is on disk before this returns."""
    st = os.stat(meta_name, dir_fd=meta_dir_fd, follow_symlinks=False)
    kind = stat.S_IFMT(st.st_mode)
    work_fd = work.fd
    if kind == stat.S_IFREG:
        fd = work.new_file(tmp)
        try:
            core.copy_file(data_dir_fd, data_name, fd, st, with_data, sync)
        finally:
            os.close(fd)
    elif kind == stat.S_IFDIR:
        os.mkdir(tmp, 0o700, dir_fd=work_fd)
    elif kind == stat.S_IFLNK:
        os.symlink(os.readlink(meta_name, dir_fd=meta_dir_fd), tmp, dir_fd=work_fd)
    else:
        os.mknod(tmp, kind | 0o600, st.st_rdev, dir_fd=work_fd)
    if kind != stat.S_IFREG:  # the C core gave the file its owner, mode and times
        apply_metadata(work_fd, tmp, st)
    extra = read_xattrs(meta_dir_fd, meta_name)
    try:
        extra.append((origin_xattr, origin.encode(data_dir_fd, data_name)))
    except OSError:
        pass  # a filesystem without file handles: the copy gets no origin, as in the kernel
    set_xattrs(work_fd, tmp, extra)


def fill_metacopy(data: tuple[int, bytes], target: tuple[int, bytes], size: int, metacopy_xattr: bytes,
                  sync: bool) -> None:
    """Give a kernel metacopy file (TARGET: metadata only) its data from DATA, in place: it may
    have other links. The mark goes last, so until then a crash leaves it reading from DATA."""
    src = os.open(proc_path(*data), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    dst = os.open(proc_path(*target), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        core.copy_data(src, dst, size, sync)
    finally:
        os.close(src)
        os.close(dst)
    os.removexattr(proc_path(*target), metacopy_xattr, follow_symlinks=False)
