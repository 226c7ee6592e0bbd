"""Copy-up: bringing a lower object into the upper layer before its first change.

The copy is built in the work directory (data, owner, mode, xattrs, timestamps) and then renamed
into place, so a crash leaves either no upper copy (the lower object still shows) or a whole one.
These functions use only file descriptors and run in a worker thread for big files."""
from __future__ import annotations

import errno
import fcntl
import os
import stat

from unionfs import origin, xattrs
from unionfs.layers import proc_path

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the data blocks when the filesystem can
COPY_CHUNK = 1 << 30


def read_xattrs(dir_fd: int, name: bytes) -> list[tuple[bytes, bytes]]:
    """The xattrs a copy takes along: all but overlay metadata."""
    path = proc_path(dir_fd, name)
    result = []
    for key in os.listxattr(path, follow_symlinks=False):
        key_b = os.fsencode(key)
        if not xattrs.is_private(key_b):
            result.append((key_b, os.getxattr(path, key_b, follow_symlinks=False)))
    return result


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    offset = start
    while offset < end:
        try:
            done = os.copy_file_range(src, dst, min(end - offset, COPY_CHUNK), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.pwrite(dst, os.pread(src, min(end - offset, 1 << 20), offset), offset)
        if done == 0:
            break
        offset += done


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy SIZE bytes: a reflink where possible, else extent by extent so holes stay holes."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _copy_range(src, dst, offset, size)  # no SEEK_DATA here: copy it all
            break
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, hole)
        offset = hole
    os.ftruncate(dst, size)


def apply_metadata(dir_fd: int, name: bytes, st: os.stat_result, extra: list[tuple[bytes, bytes]]) -> None:
    """Give object NAME in DIR_FD the owner, mode, xattrs and times of ST. The order matters:
    chown clears set-id bits and capabilities, and setting anything but the times moves ctime."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    path = proc_path(dir_fd, name)
    for key, value in extra:
        os.setxattr(path, key, value, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def build_copy(meta_dir_fd: int, meta_name: bytes, data_dir_fd: int, data_name: bytes, work_fd: int,
               tmp: bytes, with_data: bool, origin_xattr: bytes, sync: bool) -> None:
    """Build in the work directory, as TMP, a copy with the metadata of META_NAME and the data of
    DATA_NAME (the same object, except when a kernel metacopy file gets its data): a full copy of
    a regular file (only its metadata when WITH_DATA is false, for a copy-up that truncates), a
    bare directory, or a symlink, fifo, socket or device, with an ORIGIN_XATTR naming the data
    source, as the kernel records it. With SYNC, the data is on disk before this returns."""
    st = os.stat(meta_name, dir_fd=meta_dir_fd, follow_symlinks=False)
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work_fd)
        try:
            if with_data and st.st_size:
                src = os.open(proc_path(data_dir_fd, data_name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    copy_data(src, dst, st.st_size)
                finally:
                    os.close(src)
            if sync:
                os.fsync(dst)  # the data is on disk before the rename makes it visible
        finally:
            os.close(dst)
    elif kind == stat.S_IFDIR:
        os.mkdir(tmp, 0o700, dir_fd=work_fd)
    elif kind == stat.S_IFLNK:
        os.symlink(os.readlink(meta_name, dir_fd=meta_dir_fd), tmp, dir_fd=work_fd)
    else:
        os.mknod(tmp, kind | 0o600, st.st_rdev, dir_fd=work_fd)
    extra = read_xattrs(meta_dir_fd, meta_name)
    try:
        extra.append((origin_xattr, origin.encode(data_dir_fd, data_name)))
    except OSError:
        pass  # a filesystem without file handles: the copy gets no origin, as in the kernel
    apply_metadata(work_fd, tmp, st, extra)


def fill_metacopy(data: tuple[int, bytes], target: tuple[int, bytes], size: int, metacopy_xattr: bytes) -> None:
    """Give a kernel metacopy file (TARGET: metadata only) its data from DATA, in place: it may
    have other links. The mark goes last, so until then a crash leaves it reading from DATA."""
    src = os.open(proc_path(*data), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    dst = os.open(proc_path(*target), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        copy_data(src, dst, size)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    os.removexattr(proc_path(*target), metacopy_xattr, follow_symlinks=False)
