"""Whiteouts and opaque directories, written only in kernel overlayfs's format."""
from __future__ import annotations

import os
import stat

from unionfs.layers import proc_path

WHITEOUT_DEV = os.makedev(0, 0)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_DEV


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """A character device 0:0, mode 0, as the kernel makes it."""
    os.mknod(name, stat.S_IFCHR | 0o000, WHITEOUT_DEV, dir_fd=dir_fd)


def set_opaque(dir_fd: int, name: bytes, xattr_namespace: bytes) -> None:
    """Mark directory NAME opaque: the layers below no longer take part in it."""
    os.setxattr(proc_path(dir_fd, name), xattr_namespace + b"overlay.opaque", b"y",
                follow_symlinks=False)
