"""Changes to an object's attributes and xattrs; each copies the object up first (after
fs/overlayfs/inode.c and xattrs.c)."""
from __future__ import annotations

import errno
import os

import pyfuse3

from unionfs import xattrs
from unionfs.file import OpenFile
from unionfs.inodes import Node
from unionfs.layers import proc_path
from unionfs.namei import fail
from unionfs.union import Union


async def setattr(union: Union, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                  handle: OpenFile | None) -> pyfuse3.EntryAttributes:
    union.require_writable()
    truncating_to_zero = fields.update_size and attr.st_size == 0
    await union.copy_up(node, with_data=not truncating_to_zero)
    with union.upper_location(node) as (dir_fd, name):
        if fields.update_size:
            if handle is not None:
                os.ftruncate(handle.fd, attr.st_size)
            else:
                os.truncate(proc_path(dir_fd, name), attr.st_size)
        if fields.update_uid or fields.update_gid:
            os.chown(name, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, dir_fd=dir_fd, follow_symlinks=False)
        if fields.update_mode:
            os.chmod(name, attr.st_mode & 0o7777, dir_fd=dir_fd)
        if fields.update_atime or fields.update_mtime:
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            times = (attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns)
            os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)
    # A chown or a truncate drops security.capability; a chmod or new times change no xattr name.
    union.refresh(node, xattrs_changed=fields.update_uid or fields.update_gid or fields.update_size)
    return node.entry


async def setxattr(union: Union, node: Node, name: bytes, value: bytes) -> None:
    union.require_writable()
    await union.copy_up(node)
    with union.upper_location(node) as (dir_fd, rel):
        os.setxattr(proc_path(dir_fd, rel), xattrs.to_stored(name), value,
                    follow_symlinks=False)
    union.forget_xattr_names(node)


async def removexattr(union: Union, node: Node, name: bytes) -> None:
    union.require_writable()
    if xattrs.to_stored(name) not in union.xattr_names(node):
        raise fail(errno.ENODATA)  # nothing to remove: no reason to copy up
    await union.copy_up(node)
    with union.upper_location(node) as (dir_fd, rel):
        os.removexattr(proc_path(dir_fd, rel), xattrs.to_stored(name),
                       follow_symlinks=False)
    union.forget_xattr_names(node)
