"""Copy-up: bringing a lower object into the upper layer before its first change.

The copy is built in the work directory (data, owner, mode, xattrs, timestamps) and then renamed
into place, so a crash leaves either no upper copy (the lower object still shows) or a whole one.
These functions use only file descriptors (and the work directory's, which is safe from a thread)
and run in a worker thread for big files; the C core (csrc/copy_up.c) does the byte loops."""
from __future__ import annotations

import os
import stat

from unionfs.fs import core, origin, syscalls, xattrs
from unionfs.fs.workdir import WorkDir


def read_xattrs(dir_fd: int, name: bytes) -> list[tuple[bytes, bytes]]:
    """The xattrs a copy takes along: all but overlay metadata."""
    return [(key, syscalls.getxattr(dir_fd, name, key)) for key in syscalls.listxattr(dir_fd, name)
            if not xattrs.is_private(key)]


def apply_metadata(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Give object NAME in DIR_FD the owner, mode and times of ST, in that order: chown clears
    set-id bits."""
    syscalls.chown(dir_fd, name, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        syscalls.chmod(dir_fd, name, stat.S_IMODE(st.st_mode))
    syscalls.utime(dir_fd, name, (st.st_atime_ns, st.st_mtime_ns))


def set_xattrs(dir_fd: int, name: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    """Set EXTRA on NAME, after its owner (a chown clears security.capability). Setting an xattr
    moves only ctime, which no copy keeps anyway."""
    for key, value in extra:
        syscalls.setxattr(dir_fd, name, key, value)


def build_copy(meta_dir_fd: int, meta_name: bytes, data_dir_fd: int, data_name: bytes, work: WorkDir,
               tmp: bytes, with_data: bool, origin_xattr: bytes, sync: bool) -> None:
    """Build in WORK, as TMP, a copy with the metadata of META_NAME and the data of
    DATA_NAME (the same object, except when a kernel metacopy file gets its data): a full copy of
    a regular file (only its metadata when WITH_DATA is false, for a copy-up that truncates), a
    bare directory, or a symlink, fifo, socket or device, with an ORIGIN_XATTR naming the data
    source, as the kernel records it. With SYNC, the data is on disk before this returns."""
    st = syscalls.lstat(meta_dir_fd, meta_name)
    kind = stat.S_IFMT(st.st_mode)
    work_fd = work.fd
    if kind == stat.S_IFREG:
        fd = work.new_file(tmp)
        try:
            core.copy_file(data_dir_fd, data_name, fd, st, with_data, sync)
        finally:
            os.close(fd)
    elif kind == stat.S_IFDIR:
        syscalls.mkdir(work_fd, tmp, 0o700)
    elif kind == stat.S_IFLNK:
        syscalls.symlink(syscalls.readlink(meta_dir_fd, meta_name), work_fd, tmp)
    else:
        syscalls.mknod(work_fd, tmp, kind | 0o600, st.st_rdev)
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
    src = syscalls.open_beneath(*data, os.O_RDONLY)
    try:
        dst = syscalls.open_beneath(*target, os.O_WRONLY)
        try:
            core.copy_data(src, dst, size, sync)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    syscalls.removexattr(*target, metacopy_xattr)
