"""Changes to an object's attributes and xattrs; each copies the object up first (after
fs/overlayfs/inode.c and xattrs.c)."""
from __future__ import annotations

import errno
import os

import pyfuse3

from unionfs.fs import syscalls, xattrs
from unionfs.fs.file import OpenFile
from unionfs.fs.inodes import Node
from unionfs.fs.namei import fail
from unionfs.fs.union import Union


async def setattr(union: Union, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                  handle: OpenFile | None) -> pyfuse3.EntryAttributes:
    truncating_to_zero = fields.update_size and attr.st_size == 0
    await union.copy_up(node, with_data=not truncating_to_zero)
    with union.object_at(node, handle) as at:
        if fields.update_size:
            if handle is not None and handle.flags != os.O_RDONLY:
                os.ftruncate(handle.fd, attr.st_size)
            else:
                syscalls.truncate(*at, attr.st_size)
        uid = union.view.uids.stored(attr.st_uid) if fields.update_uid else -1
        gid = union.view.gids.stored(attr.st_gid) if fields.update_gid else -1
        mode = attr.st_mode & 0o7777 if fields.update_mode else None
        if union.override and (uid != -1 or gid != -1 or mode is not None):
            # -o xattr_permissions: owners and modes are kept in the override_stat xattr.
            xattrs.set_override(*at, union.override, uid, gid, mode)
        else:
            if uid != -1 or gid != -1:
                _chown(union, at, uid, gid)
            if mode is not None:
                syscalls.chmod(*at, mode)
        if fields.update_atime and fields.update_mtime:  # touch, tar: no need to read the old ones
            syscalls.utime(*at, (attr.st_atime_ns, attr.st_mtime_ns))
        elif fields.update_atime or fields.update_mtime:
            current = syscalls.lstat(*at)
            times = (attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns)
            syscalls.utime(*at, times)
    # A chown or a truncate drops security.capability; a chmod or new times change no xattr name.
    union.refresh(node, xattrs_changed=fields.update_uid or fields.update_gid or fields.update_size)
    return node.entry


def _chown(union: Union, at: tuple[int, bytes], uid: int, gid: int) -> None:
    """Give object AT the stored owner UID, GID (-1: unchanged)."""
    try:
        syscalls.chown(*at, uid, gid)
    except OSError:
        # Squashed owners are shown whatever is stored: fuse-overlayfs lets such a chown succeed.
        if union.view.uids.squash is None and union.view.gids.squash is None:
            raise


def _check_settable(union: Union, name: bytes) -> None:
    if xattrs.to_stored(name) in union.stack.hidden_xattrs:
        raise fail(errno.EPERM)  # the union's own metadata (override_stat), as in fuse-overlayfs


async def setxattr(union: Union, node: Node, name: bytes, value: bytes) -> None:
    _check_settable(union, name)
    await union.copy_up(node)
    with union.object_at(node) as at:
        syscalls.setxattr(*at, xattrs.to_stored(name), value)
    union.forget_xattr_names(node)


async def removexattr(union: Union, node: Node, name: bytes) -> None:
    _check_settable(union, name)
    union.require_writable()
    if xattrs.to_stored(name) not in union.xattr_names(node):
        raise fail(errno.ENODATA)  # nothing to remove: no reason to copy up
    await union.copy_up(node)
    with union.object_at(node) as at:
        syscalls.removexattr(*at, xattrs.to_stored(name))
    union.forget_xattr_names(node)
