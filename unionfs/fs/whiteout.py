"""Whiteouts and opaque directories, written only in kernel overlayfs's format (the OCI/AUFS
".wh." forms are read, in every layer, by the C core)."""
from __future__ import annotations

import os
import stat

from unionfs.fs import syscalls

WHITEOUT_DEV = os.makedev(0, 0)
OCI_PREFIX = b".wh."  # an OCI/AUFS whiteout marker: ".wh.NAME" hides NAME
NAME_MAX = 255


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_DEV


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """A character device 0:0, mode 0, as the kernel makes it."""
    syscalls.mknod(dir_fd, name, stat.S_IFCHR | 0o000, WHITEOUT_DEV)


def set_opaque(dir_fd: int, name: bytes, xattr_namespace: bytes) -> None:
    """Mark directory NAME opaque: the layers below no longer take part in it."""
    syscalls.setxattr(dir_fd, name, xattr_namespace + b"overlay.opaque", b"y")


def is_oci_marker(name: bytes) -> bool:
    """Is NAME one of the OCI/AUFS whiteout forms (".wh.NAME", ".wh..wh..opq"), which are read as
    markers in every layer and so cannot be made as names of their own through the union?"""
    return name.startswith(OCI_PREFIX)


def adopt_oci_whiteout(dir_fd: int, name: bytes) -> None:
    """Before NAME is made again in upper directory DIR_FD: an OCI ".wh.NAME" marker there (as
    containers/storage writes its layers) becomes the kernel's whiteout at NAME, so that the upper
    stays in the kernel's format and no marker is left to hide the new NAME after a remount. The
    whiteout is made first: NAME stays hidden throughout."""
    marker = OCI_PREFIX + name
    if len(marker) > NAME_MAX:
        return
    if syscalls.lstat_or_none(dir_fd, marker) is None:
        return
    try:
        make_whiteout(dir_fd, name)
    except FileExistsError:
        pass  # a whiteout (or an object) is there already
    syscalls.remove_tree(dir_fd, marker)
