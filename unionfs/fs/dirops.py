"""Operations that change names: create, link, unlink, rmdir and rename, with whiteouts and opaque
directories in kernel overlayfs's format (after fs/overlayfs/dir.c)."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable, NamedTuple

from unionfs.fs import syscalls
from unionfs.fs.inodes import Node
from unionfs.fs.namei import REDIRECT, UPPER_BIT, fail
from unionfs.fs.union import Union
from unionfs.fs.whiteout import NAME_MAX, adopt_oci_whiteout, is_oci_marker, is_whiteout, make_whiteout, set_opaque
from unionfs.fs.syscalls import SELF
from unionfs.fs.xattrs import set_override

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


class Caller(NamedTuple):
    """Who asks: the request's fsuid and fsgid."""

    uid: int
    gid: int


def _whiteout_at(dir_fd: int, name: bytes) -> bool:
    st = syscalls.lstat_or_none(dir_fd, name)
    return st is not None and is_whiteout(st)


def _discard(dir_fd: int, name: bytes) -> None:
    with contextlib.suppress(OSError):
        syscalls.remove_tree(dir_fd, name)


def _owner_and_mode(union: Union, parent_fd: int, caller: Caller, mode: int) -> tuple[int, int, int]:
    """Owner (as stored, see unionfs/idmap.py) and mode of a new object: a set-group-ID directory
    hands on its group (and, to a new directory, the set-group-ID bit), as the upper filesystem
    would for the caller itself."""
    parent = syscalls.lstat(parent_fd, SELF)
    uid = union.view.uids.stored(caller.uid)
    if parent.st_mode & stat.S_ISGID:
        return uid, parent.st_gid, mode | (stat.S_ISGID if stat.S_ISDIR(mode) else 0)
    return uid, union.view.gids.stored(caller.gid), mode


# Makes NAME in DIR_FD; returns an fd of the new object if it opened one (a created file).
Maker = Callable[[int, bytes], int | None]


def _build(union: Union, dir_fd: int, name: bytes, make: Maker, uid: int, gid: int, mode: int,
           opaque_namespace: bytes | None) -> int | None:
    """Make NAME with MAKE and give it its owner, mode and opacity; MAKE's fd, if any."""
    fd = make(dir_fd, name)
    try:
        if union.override:
            # -o xattr_permissions: the owner and mode go to the override_stat xattr only.
            set_override(dir_fd, name, union.override, uid, gid, stat.S_IMODE(mode))
        else:
            # A new object is the daemon's, or has a set-group-ID parent's group; a caller who is
            # the daemon's own user and group (tar as root) needs no chown.
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, uid, gid) if fd is not None else syscalls.chown(dir_fd, name, uid, gid)
            if not stat.S_ISLNK(mode):  # after chown, which clears set-ID bits
                permissions = stat.S_IMODE(mode)
                os.fchmod(fd, permissions) if fd is not None else syscalls.chmod(dir_fd, name, permissions)
        if opaque_namespace:
            set_opaque(dir_fd, name, opaque_namespace)
    except BaseException:
        _discard(dir_fd, name)
        raise
    return fd


def _check_name(name: bytes) -> None:
    """A name that can be made through the union: ".wh." names are read as whiteout markers in
    every layer, so, as fuse-overlayfs does, they are refused (EINVAL)."""
    if len(name) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG)
    if is_oci_marker(name):
        raise fail(errno.EINVAL)


def _check_new_name(union: Union, parent: Node, name: bytes, made_exclusively: bool = False) -> None:
    """NAME may be made in PARENT. MADE_EXCLUSIVELY: what makes it fails with EEXIST where NAME
    is in the way, so a directory of the upper layer alone, where the union shows what is there,
    needs no look at the layers first."""
    union.require_writable()
    _check_name(name)
    if made_exclusively and parent.dir_layers == UPPER_BIT:
        return
    if union.resolve(parent, name) is not None:
        raise fail(errno.EEXIST)


def _place(union: Union, parent_fd: int, name: bytes, build: Callable[[int, bytes, bool], int | None]
           ) -> int | None:
    """Give NAME in PARENT_FD a new object made by BUILD(dir_fd, name, over_whiteout), and return
    what BUILD returns. Over a whiteout the object is built in the work directory and swapped in
    with RENAME_EXCHANGE, so the lower object never shows through."""
    adopt_oci_whiteout(parent_fd, name)
    if not _whiteout_at(parent_fd, name):
        return build(parent_fd, name, False)
    work = union.work
    tmp = work.temp_name()
    fd = build(work.fd, tmp, True)
    try:
        syscalls.rename(work.fd, tmp, parent_fd, name, RENAME_EXCHANGE)
    finally:
        work.remove(tmp)  # the whiteout after the exchange, or the new object if it failed
    return fd


def install(union: Union, parent: Node, name: bytes, caller: Caller, mode: int, make: Maker) -> Node:
    """Create NAME in PARENT with MAKE(dir_fd, name), owned by the caller, and return its node
    (counted as a kernel reference). A directory made over a whiteout is opaque, so the lower
    directory's entries stay hidden."""
    _check_new_name(union, parent, name, made_exclusively=True)
    union.ensure_upper_dir(parent)
    # With redirects on, the kernel makes every new directory in a merged one opaque: a
    # directory renamed later may bring lower entries of the same name into view.
    opaque_here = union.redirect_dirs and bool(parent.dir_layers & ~UPPER_BIT)
    with union.upper_dir(parent) as parent_fd:
        uid, gid, mode = _owner_and_mode(union, parent_fd, caller, mode)

        def build(dir_fd: int, build_name: bytes, over_whiteout: bool) -> int | None:
            opaque = stat.S_ISDIR(mode) and (over_whiteout or opaque_here)
            return _build(union, dir_fd, build_name, make, uid, gid, mode,
                          union.xattr_namespace if opaque else None)

        fd = _place(union, parent_fd, name, build)
        if not stat.S_ISDIR(mode):
            node = union.remember_new(parent, name, parent_fd, fd)
            # Before the kernel asks (security.capability, at the first write).
            union.xattr_names(node, (parent_fd, name) if fd is None else fd)
            return node
    node = union.lookup(parent, name)  # a directory: resolved across the layers, as any lookup
    assert node is not None
    union.xattr_names(node)
    return node


def mkdir(union: Union, parent: Node, name: bytes, mode: int, caller: Caller) -> Node:
    return install(union, parent, name, caller, stat.S_IFDIR | mode,
                   lambda dir_fd, n: syscalls.mkdir(dir_fd, n, 0o700))


def mknod(union: Union, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller) -> Node:
    if stat.S_ISCHR(mode) and rdev == 0:
        raise fail(errno.EPERM)  # a whiteout is not something users make, as in the kernel
    return install(union, parent, name, caller, mode,
                   lambda dir_fd, n: syscalls.mknod(dir_fd, n, stat.S_IFMT(mode) | 0o600, rdev))


def symlink(union: Union, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
    return install(union, parent, name, caller, stat.S_IFLNK | 0o777,
                   lambda dir_fd, n: syscalls.symlink(target, dir_fd, n))


def create(union: Union, parent: Node, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Node, int, int]:
    """Create and open a regular file; returns its node, an fd and the fd's access mode: FLAGS'
    own, but read-write for a writer, so that a passthrough open can register that fd as its
    backing file instead of opening the file again."""
    access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
    opened: list[int] = []

    def make(dir_fd: int, n: bytes) -> int:
        opened.append(syscalls.create(dir_fd, n, access, 0o600))
        return opened[-1]

    try:
        node = install(union, parent, name, caller, stat.S_IFREG | mode, make)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return node, opened[0], access


async def link(union: Union, node: Node, new_parent: Node, new_name: bytes) -> Node:
    """A new name for NODE's object, which is copied up first."""
    _check_new_name(union, new_parent, new_name)
    await union.copy_up(node)
    union.ensure_upper_dir(new_parent)
    with union.upper_dir(node.parent) as src_fd, union.upper_dir(new_parent) as dst_fd:
        _place(union, dst_fd, new_name, lambda dir_fd, link_name, _over_whiteout: syscalls.link(
            src_fd, node.name, dir_fd, link_name))
    node.add_name(new_parent, new_name)
    union.refresh(node, xattrs_changed=False)  # a new link count
    return union.inodes.remember(node)


def _link_name_in_upper(union: Union, node: Node, parent: Node, name: bytes) -> None:
    """Give the upper layer the name NAME for NODE's copied-up object, if it lacks it: the name
    of a lower hard link whose object was copied up through another name."""
    if node.is_dir:
        return
    with union.upper_dir(parent) as parent_fd:
        if syscalls.lstat_or_none(parent_fd, name) is not None:
            return
        with union.upper_location(node) as (dir_fd, existing):
            syscalls.link(dir_fd, existing, parent_fd, name)


def _remove_from_upper(union: Union, parent: Node, name: bytes, parent_fd: int, needs_whiteout: bool) -> None:
    """Take NAME out of the upper directory, leaving a whiteout there when a lower layer has the
    name. An upper object is moved to the work directory in the same step (RENAME_WHITEOUT), so
    there is no moment in which the lower object shows through; a directory, which may still hold
    whiteouts, is then deleted there."""
    st = syscalls.lstat_or_none(parent_fd, name)
    if st is None or is_whiteout(st):
        if needs_whiteout and st is None:
            make_whiteout(parent_fd, name)
        return
    if not stat.S_ISDIR(st.st_mode) and not needs_whiteout:
        syscalls.unlink(parent_fd, name)
        return
    tmp = union.work.temp_name()
    syscalls.rename(parent_fd, name, union.work.fd, tmp, RENAME_WHITEOUT if needs_whiteout else 0)
    union.work.remove(tmp)


def _gone(union: Union, node: Node, parent: Node, name: bytes) -> None:
    """NODE's object lost the name NAME in PARENT: forget the object, unless other hard links
    keep it; then the node only needs another name if this was the one it knew."""
    if node.is_dir or node.entry.st_nlink <= 1:
        union.drop_object(node)
    else:
        node.remove_name(parent, name)
        union.reresolve(node)


def unlinked_by_shim(union: Union, node: Node | None, parent: Node | None) -> None:
    """The shim unlinked the only name of NODE's file, in PARENT (csrc/fuse_shim.c): what
    unlink() does after the removal."""
    if node is not None:
        union.drop_object(node)
    if parent is not None:
        parent.stale = True


async def unlink(union: Union, parent: Node, name: bytes) -> None:
    union.require_writable()
    node = union.lookup_existing(parent, name)
    if node.is_dir:
        raise fail(errno.EISDIR)
    count = await _link_count(union, node)
    _remove(union, parent, name, node)
    _record_link_count(union, node, count, -1)


def rmdir(union: Union, parent: Node, name: bytes) -> None:
    union.require_writable()
    node = union.lookup_existing(parent, name)
    if not node.is_dir:
        raise fail(errno.ENOTDIR)
    if not union.is_empty(node):
        raise fail(errno.ENOTEMPTY)
    _remove(union, parent, name, node)


async def _link_count(union: Union, node: Node | None) -> int | None:
    """Before a name of NODE's object changes: its union link count, if it is a hard-linked
    file, whose object is then copied to the index so that an upper inode can record the new
    count (as the kernel does with index=on)."""
    if node is None or node.is_dir or node.entry.st_nlink < 2:
        return None
    await union.copy_to_index(node)
    return node.entry.st_nlink


def _record_link_count(union: Union, node: Node | None, count: int | None, change: int) -> None:
    if count is not None:
        union.set_union_nlink(node, count + change)


def _remove(union: Union, parent: Node, name: bytes, node: Node) -> None:
    union.ensure_upper_dir(parent)
    with union.upper_dir(parent) as parent_fd:
        _remove_from_upper(union, parent, name, parent_fd, union.has_lower(parent, name))
    _gone(union, node, parent, name)
    # Read again when next served: the kernel asks for them at once (GETATTR) anyway.
    parent.stale = True


def _is_merged_or_lower(node: Node) -> bool:
    return node.is_dir and bool(node.dir_layers & ~UPPER_BIT)


async def rename(union: Union, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                 flags: int) -> None:
    union.require_writable()
    _check_name(new_name)
    src = union.lookup_existing(old_parent, old_name)
    try:
        dst: Node | None = union.lookup_existing(new_parent, new_name)
    except FileNotFoundError:
        dst = None
    if flags & RENAME_NOREPLACE and dst is not None:
        raise fail(errno.EEXIST)
    if flags & RENAME_EXCHANGE and dst is None:
        raise fail(errno.ENOENT)
    if dst is src:
        return  # two names of one object: nothing to do (rename(2))
    if dst is not None and not flags & RENAME_EXCHANGE:
        if src.is_dir and not dst.is_dir:
            raise fail(errno.ENOTDIR)
        if dst.is_dir and not src.is_dir:
            raise fail(errno.EISDIR)
    # Without redirects a directory that merges lower layers cannot move: kernel overlayfs with
    # redirect_dir=off answers the same, and tools such as mv then copy.
    if not union.redirect_dirs and (_is_merged_or_lower(src) or
                                    (flags & RENAME_EXCHANGE and _is_merged_or_lower(dst))):
        raise fail(errno.EXDEV)
    if dst is not None and not flags & RENAME_EXCHANGE and dst.is_dir and not union.is_empty(dst):
        raise fail(errno.ENOTEMPTY)
    await union.copy_up(src)
    if flags & RENAME_EXCHANGE:
        await union.copy_up(dst)
    union.ensure_upper_dir(old_parent)
    union.ensure_upper_dir(new_parent)
    _link_name_in_upper(union, src, old_parent, old_name)
    if flags & RENAME_EXCHANGE:
        _link_name_in_upper(union, dst, new_parent, new_name)
    src_count = await _link_count(union, src)
    dst_count = await _link_count(union, dst)
    src_has_lower = union.has_lower(old_parent, old_name)
    samedir = old_parent is new_parent
    with union.upper_dir(old_parent) as old_fd, \
            contextlib.nullcontext(old_fd) if samedir else union.upper_dir(new_parent) as new_fd:
        if dst is None:
            adopt_oci_whiteout(new_fd, new_name)
        _prepare_moving_dir(union, src, old_fd, old_name, new_parent, samedir)
        if flags & RENAME_EXCHANGE:
            _prepare_moving_dir(union, dst, new_fd, new_name, old_parent, samedir)
            syscalls.rename(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
        else:
            _rename_into(union, old_fd, old_name, new_fd, new_name, src, src_has_lower)
    if dst is not None and not flags & RENAME_EXCHANGE:
        _gone(union, dst, new_parent, new_name)
    src.move_name((old_parent, old_name), (new_parent, new_name))
    if flags & RENAME_EXCHANGE:
        dst.move_name((new_parent, new_name), (old_parent, old_name))
    _record_link_count(union, src, src_count, 0)
    _record_link_count(union, dst, dst_count, 0 if flags & RENAME_EXCHANGE else -1)
    # A rename moves names and private xattrs (overlay.redirect, overlay.impure), none a user sees.
    changed = (dst, src, old_parent, new_parent) if flags & RENAME_EXCHANGE else (src, old_parent, new_parent)
    for moved in dict.fromkeys(changed):  # the parent once when both are one
        union.refresh(moved, xattrs_changed=False)


def _prepare_moving_dir(union: Union, node: Node, dir_fd: int, name: bytes, new_parent: Node,
                        samedir: bool) -> None:
    """Before directory NODE (upper copy NAME in DIR_FD) moves into NEW_PARENT, record what keeps
    its view intact, as kernel overlayfs does: a directory that merges lower layers gets an
    overlay.redirect naming where its lower copies are; one that does not, moving into a merged
    directory, becomes opaque so that nothing of the lower layers joins it there."""
    if not node.is_dir:
        return
    redirect = union.xattr_namespace + REDIRECT
    if node.lower_paths:
        existing = syscalls.getxattr_or_none(dir_fd, name, redirect)
        if existing is not None and (samedir or existing.startswith(b"/")):
            return  # still names the lower copies from the new place
        top_lower = node.lower_paths[min(node.lower_paths)]
        value = name if samedir and existing is None else b"/" + top_lower
        syscalls.setxattr(dir_fd, name, redirect, value)
    elif new_parent.dir_layers & ~UPPER_BIT:
        set_opaque(dir_fd, name, union.xattr_namespace)


def _rename_into(union: Union, old_fd: int, old_name: bytes, new_fd: int, new_name: bytes, src: Node,
                 src_has_lower: bool) -> None:
    target = syscalls.lstat_or_none(new_fd, new_name)
    if src.is_dir:
        if target is not None and stat.S_ISDIR(target.st_mode):
            # The target is empty in the union, but its upper copy may hold whiteouts.
            _empty_upper_dir(union, new_fd, new_name)
        elif target is not None and is_whiteout(target):
            # A directory cannot replace a whiteout by rename: swap them, then drop the whiteout
            # unless the old name needs one.
            syscalls.rename(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
            if not src_has_lower:
                syscalls.unlink(old_fd, old_name)
            return
    syscalls.rename(old_fd, old_name, new_fd, new_name, RENAME_WHITEOUT if src_has_lower else 0)


def _empty_upper_dir(union: Union, parent_fd: int, name: bytes) -> None:
    """Remove what upper directory NAME holds: it is empty in the union, so only whiteouts and
    their OCI forms."""
    fd = syscalls.open_beneath(parent_fd, name, os.O_PATH | os.O_DIRECTORY)
    try:
        for entry in syscalls.listdir(fd):
            syscalls.remove_tree(fd, entry)
    finally:
        os.close(fd)
