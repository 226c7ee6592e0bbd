"""The union as a plain Python API over the layers (namei.py) and the inode table: lookups,
listings and reads, and the upper-layer plumbing that writes build on (copy-up, upper
directories). The FUSE Operations class translates requests into these calls."""
from __future__ import annotations

import array
import contextlib
import errno
import os
import stat
from typing import Iterator

import pyfuse3
import trio

from unionfs.fs import core, shim, syscalls, xattrs
from unionfs.fs.copy_up import build_copy, fill_metacopy
from unionfs.fs.file import Handles
from unionfs.fs.inodes import NO_LOWER_PATHS, AttrView, InodeTable, Node, compact, name_only_entry
from unionfs.fs.layers import ROOT_PATH, LayerStack, child_path
from unionfs.fs.namei import METACOPY, NLINK, UPPER, UPPER_BIT, Namei, Resolved, fail
from unionfs.fs.readahead import DIR_SIZE_MAX, ReadAhead
from unionfs.fs.syscalls import SELF
from unionfs.fs.workdir import WorkDir


def node_found(node: Node, attr: core.Attr) -> core.Found:
    """NODE's place in the layers, with new attributes."""
    return core.Found(node.layer, attr, node.dir_layers)


# Files up to this size are copied up on the event loop: a hop to a worker thread costs more than
# their copy. Bigger ones go to a thread, so other requests go on meanwhile.
INLINE_COPY_MAX = 1 << 20
NO_XATTR_NAMES: frozenset[bytes] = frozenset()


class Union(Namei):
    def __init__(self, stack: LayerStack, workdir: str | None = None, view: AttrView = AttrView(),
                 redirect_dirs: bool = True, sync: bool = True, xattrs: bool = True):
        # Writable with an upper layer and a work directory; without them, read-only.
        self.writable = stack.top().is_upper and workdir is not None
        upper = stack.top()
        super().__init__(stack, WorkDir(workdir, upper.root_fd, upper.path) if self.writable else None)
        self.view = view
        # -o noxattrs=1 (fuse-overlayfs): no extended attributes through the mount.
        self.xattrs = xattrs
        # Copies are synced before they are renamed into place, so a crash cannot leave half of
        # one (as the kernel does); -o fsync=0 trades that for speed, as in fuse-overlayfs.
        self.sync = sync
        # Directories that merge lower layers are renamed with overlay.redirect (kernel option
        # redirect_dir=on); without it such a rename answers EXDEV (redirect_dir=off).
        self.redirect_dirs = redirect_dirs
        # -o xattr_permissions: the override_stat xattr where new owners and modes are kept.
        self.override = stack.upper_override if self.writable else None
        if self.override:
            stack.mark_upper_override()
        top = stack.top()
        found = core.Found(0, core.stat_at(top.root_fd, ROOT_PATH, top.flags), stack.all_layers_mask)
        root_ino = stack.compose_ino(found.attr.dev, found.attr.ino)
        root_lower_paths = {i: ROOT_PATH for i in range(len(stack.layers)) if not stack.layers[i].is_upper}
        self.inodes = InodeTable(root_ino, found, root_lower_paths, view)
        self._copy_locks: dict[int, trio.Lock] = {}
        # The shim answers GETATTR and SETATTR of upper objects itself where the union shows their
        # attributes as stored (_hand_to_shim below); it changes owners and modes only where they
        # are stored as such, not in an override_stat xattr.
        self._shim_serves_upper = self.writable and view.ids_as_stored and not view.static_nlink
        has_shim = shim.set_core(core.function_address("ufs_open_at"), core.function_address("ufs_stat_fd"))
        if self._shim_serves_upper:
            shim.set_upper(upper.root_fd, upper.flags, not self.override, view.timeout)
        # The shim opens lower files for reading itself (_hand_found_to_shim), unless passthrough
        # may serve them: only a read-only union's files get it (unionfs/fs/passthrough.py), and
        # whether it does is known at the first lookup (after INIT).
        self._shim_opens_lower: bool | None = None if has_shim else False
        self.handles = Handles(self.inodes)
        self.read_ahead: ReadAhead | None = None  # see start_read_ahead()

    def close(self) -> None:
        """Close the layers and the work directory (stopping its spare-file thread, and the
        read-ahead thread first: both read through their fds)."""
        if self.read_ahead is not None:
            self.read_ahead.stop()
            self.read_ahead = None
        self.stack.close()
        if self.work is not None:
            self.work.close()

    # ---- reading ----

    def _node_for(self, parent: Node, name: bytes, resolved: Resolved, parent_path: bytes | None = None,
                  no_xattrs: array.array | None = None) -> Node:
        """The node for a resolved name: the known one for its object (with fresh attributes when
        it lives in the upper layer), or a new, uncounted one. If the object has no xattrs, the
        shim is told so (it answers GETXATTR), or the node id added to NO_XATTRS for the caller
        to tell it."""
        found, lower_paths = resolved
        parent_path = parent.path if parent_path is None else parent_path
        path = child_path(parent_path, name)
        ino = self._ino_of(found, path)
        found, index_name = self._with_copy_state(found, lower_paths, path)
        node = self.inodes.node_for(ino, parent, name, found, lower_paths)
        if found.no_xattrs and node.xattr_names is None:  # listed with it by the C core
            node.xattr_names = NO_XATTR_NAMES
            if self.xattrs:  # else GETXATTR gets ENOSYS from Python (-o noxattrs)
                if no_xattrs is None:
                    shim.mark_no_xattrs(node.id, True)
                else:
                    no_xattrs.append(node.id)
        if node.layer == UPPER:
            # Attributes as they are now; a new node (not yet counted) has just been made from them.
            if found.layer == UPPER and self.writable and node.lookups:
                node.update(found, self.view)
        elif index_name is not None:  # a lower name of an object copied up through another
            node.update(found, self.view)
            node.index_name = index_name
        return node

    def reresolve(self, node: Node) -> None:
        """Look NODE's object up again under the name it is known by, after another of its names
        went away (that name may have held its upper copy)."""
        resolved = self.resolve(node.parent, node.name) if node.name is not None else None
        if resolved is None:
            node.detach()
            return
        found, lower_paths = resolved
        found, node.index_name = self._with_copy_state(found, lower_paths, node.path)
        node.lower_paths = compact(lower_paths)
        node.update(found, self.view)

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """Resolve NAME in PARENT and count the kernel's new reference; None when absent."""
        resolved = self.resolve(parent, name)
        if resolved is None:
            return None
        return self._remember(parent, name, resolved)

    def remember_new(self, parent: Node, name: bytes, parent_fd: int, fd: int | None = None) -> Node:
        """The counted node for NAME, a non-directory just made in PARENT's upper directory
        PARENT_FD (open as FD, if given): nothing below merges with it or is found through it, so
        its lstat is all there is to look up."""
        flags = self.stack.layers[UPPER].flags
        attr = core.stat_at(parent_fd, name, flags) if fd is None else core.stat_fd(fd, flags)
        return self._remember(parent, name, (core.Found(UPPER, attr, 0), {}))

    def _remember(self, parent: Node, name: bytes, resolved: Resolved) -> Node:
        node = self.inodes.remember(self._node_for(parent, name, resolved))
        self._hand_found_to_shim(node, resolved[0])
        return node

    def lookup_existing(self, parent: Node, name: bytes) -> Node:
        """The node for NAME, not counted as a kernel reference; ENOENT when absent."""
        resolved = self.resolve(parent, name)
        if resolved is None:
            raise fail(errno.ENOENT)
        return self.inodes.current(self._node_for(parent, name, resolved))

    def listdir(self, node: Node) -> list[tuple[bytes, Node | pyfuse3.EntryAttributes]]:
        """The entries of directory NODE: "." and "..", then the merged names. Their nodes are not
        counted: the caller calls inodes.remember() for each merged name it hands to the kernel.
        A name whose lookup fails (a crafted redirect, a metacopy file without its data) is still
        listed, as the kernel lists it, with attributes but no node: looking it up gives the
        error."""
        path = node.path
        dir_paths, c_dir = self._dir_view(node)
        listing: list[tuple[bytes, Node | pyfuse3.EntryAttributes]] = [(b".", node), (b"..", node.parent or node)]
        no_xattrs = array.array("Q")
        lower_files = shim.LowerFiles()
        read_ahead = self.read_ahead.take(node.id, dir_paths) if self.read_ahead is not None else None
        subdirs: list[Node] = []
        for name, found in self.stack.c.list(c_dir, path) if read_ahead is None else core.entries(read_ahead):
            try:
                resolved = self._resolve_in(dir_paths, name, found)
                entry_node = self._node_for(node, name, resolved, path, no_xattrs)
                listing.append((name, entry_node))
                # rm -rf unlinks what it lists, tar opens it
                self._hand_found_to_shim(entry_node, resolved[0], lower_files)
                if self._may_read_ahead(entry_node):
                    subdirs.append(entry_node)
            except OSError:
                ino = self.stack.compose_ino(found.attr.dev, found.attr.ino)
                listing.append((name, name_only_entry(ino, found.attr.mode)))
        shim.mark_many_no_xattrs(no_xattrs)
        lower_files.hand_over()
        if subdirs:
            self.read_ahead.queue([(subdir.id, *self._dir_view(subdir)) for subdir in subdirs])
        return listing

    def start_read_ahead(self) -> None:
        """Read the lower layers' directories ahead of a walk (unionfs/fs/readahead.py), where
        another CPU can: a daemon that serves a mount does, nothing else (a rehearsal must stay
        single-threaded)."""
        if self.read_ahead is None and len(os.sched_getaffinity(0)) > 1:
            self.read_ahead = ReadAhead(self.stack.c)

    def _may_read_ahead(self, node: Node) -> bool:
        """Is NODE a directory of the lower layers alone, not too big, to be read ahead?"""
        return (self.read_ahead is not None and node.is_dir and not (self.has_upper and node.dir_layers & UPPER_BIT)
                and node.entry.st_size <= DIR_SIZE_MAX)

    def is_empty(self, node: Node) -> bool:
        """Does directory NODE show no entries? Answered from the first one listed, resolved
        alone, without a node for it."""
        _, c_dir = self._dir_view(node)
        return next(self.stack.c.list(c_dir, node.path, batch_size=1), None) is None

    def getattr(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.layer == UPPER and self.writable:
            with contextlib.suppress(FileNotFoundError):
                self.refresh(node, xattrs_changed=False)  # xattrs change only through requests
        return node.entry

    def _hand_found_to_shim(self, node: Node, found: core.Found, lower_files: shim.LowerFiles | None = None) -> None:
        """_hand_to_shim() for NODE, just resolved as FOUND; or, for a lower file with one link
        whose data is its own, let the shim open it for reading (at once, or with LOWER_FILES)."""
        if node.layer == UPPER and self.has_upper:
            if found.layer == UPPER and self._shim_serves_upper:
                self._hand_to_shim(node, node.path, found.attr)
            return
        attr = found.attr
        if (stat.S_ISREG(attr.mode) and attr.nlink == 1 and node.index_name is None
                and found.layer == node.layer and self._shim_may_open_lower()):
            where = (node.id, self.stack.layers[node.layer].root_fd, node.lower_paths[node.layer], attr.dev, attr.ino)
            if lower_files is None:
                shim.hand_over_lower(*where)
            else:
                lower_files.add(*where)

    def _shim_may_open_lower(self) -> bool:
        if self._shim_opens_lower is None:
            self._shim_opens_lower = self.writable or not shim.passthrough()
        return self._shim_opens_lower

    def _take_from_shim(self, node: Node) -> None:
        """The shim stops answering for NODE, and the files it opened for it become the
        daemon's (before NODE's data moves or its name goes)."""
        shim.take_back(node.id)
        self.handles.adopt(node)

    def _hand_to_shim(self, node: Node, path: bytes, attr: core.Attr) -> None:
        """Let the shim read and change the attributes of NODE's upper object (PATH, ATTR) itself, if
        the union shows them as stored: a directory of the upper layer alone (the kernel asks
        for its attributes after each change in it), or a regular file with its own data and
        one link (tar sets the owner, mode and times of each file it unpacks)."""
        if not self._shim_serves_upper:
            return
        if stat.S_ISDIR(attr.mode):
            served = node.dir_layers == UPPER_BIT
        else:  # a file with more links may carry overlay.nlink; one still below is a metacopy
            served = (stat.S_ISREG(attr.mode) and attr.nlink == 1 and node.index_name is None
                      and not node.lower_paths)
        if served:
            shim.hand_over(node.id, path, attr.dev, attr.ino, stat.S_IFMT(attr.mode), node.ino)

    def drop_object(self, node: Node) -> None:
        """NODE's object is gone from the union (see InodeTable.drop_object); the shim no longer
        answers for it, as a new object may take its inode number and path."""
        self._take_from_shim(node)  # its open files reach it while it has no name
        self.inodes.drop_object(node)

    def forget(self, node_id: int, count: int) -> None:
        """The kernel gave back COUNT references to node NODE_ID; once it holds none, the shim
        no longer answers for it."""
        if self.inodes.forget(node_id, count):
            shim.take_back(node_id)

    def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """NODE's attributes for a reply. After writes they are read again: a reply with an old
        size would make the kernel cut the file short."""
        if node.stale or (node.open_files and any(handle.flags != os.O_RDONLY for handle in node.open_files)):
            return self.getattr(node)  # an open writer may change it at any time (fallocate)
        return node.entry

    def readlink(self, node: Node) -> bytes:
        with self._at(node) as (dir_fd, name):
            return syscalls.readlink(dir_fd, name)

    def open_file(self, node: Node, flags: int) -> int:
        if node.name is None and node.parent is not None and node.open_files:
            # Removed but still open (and opened again through /proc/PID/fd): as the kernel
            # does, the object its open files reach.
            with self.object_at(node) as (fd, _):
                return syscalls.reopen(fd, flags)
        with self._data_at(node) as (dir_fd, name):
            return syscalls.open_beneath(dir_fd, name, flags)

    def xattr_names(self, node: Node, at: tuple[int, bytes] | int | None = None) -> frozenset[bytes]:
        """The names of NODE's xattrs, read once (from AT if the caller has NODE at hand: its
        (dir_fd, name), or a file descriptor of it open for reading or writing)."""
        if node.xattr_names is None:
            if isinstance(at, int):
                node.xattr_names = frozenset(syscalls.flistxattr(at))
            else:
                with self.object_at(node) if at is None else contextlib.nullcontext(at) as where:
                    node.xattr_names = frozenset(syscalls.listxattr(*where))
            if self.xattrs and not xattrs.visible(list(node.xattr_names), self.stack.hidden_xattrs):
                shim.mark_no_xattrs(node.id, True)
        return node.xattr_names

    def forget_xattr_names(self, node: Node) -> None:
        """NODE's xattrs may have changed: read them again when next asked."""
        if node.xattr_names is not None:
            node.xattr_names = None
            shim.mark_no_xattrs(node.id, False)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        name = xattrs.to_stored(name)
        if name not in self.xattr_names(node) or name in self.stack.hidden_xattrs:
            raise fail(errno.ENODATA)
        with self.object_at(node) as at:
            return syscalls.getxattr(*at, name)

    def listxattr(self, node: Node) -> list[bytes]:
        return xattrs.visible(sorted(self.xattr_names(node)), self.stack.hidden_xattrs)

    def statfs(self) -> pyfuse3.StatvfsData:
        """The filesystem of the top layer: the upper when there is one, as in kernel overlayfs."""
        st = syscalls.statvfs(self.stack.top().root_fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    # ---- the upper layer ----

    def require_writable(self) -> None:
        if not self.writable:
            raise fail(errno.EROFS)

    @contextlib.contextmanager
    def upper_dir(self, node: Node) -> Iterator[int]:
        """An fd of directory NODE in the upper layer (which must hold it)."""
        root_fd = self.stack.layers[UPPER].root_fd
        path = node.path
        if path == ROOT_PATH:
            yield root_fd
            return
        fd = syscalls.open_beneath(root_fd, path, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def upper_location(self, node: Node) -> Iterator[tuple[int, bytes]]:
        """(dir_fd, name) of NODE's object in the upper layer, for the *at() calls."""
        if node.parent is None:
            yield self.stack.layers[UPPER].root_fd, ROOT_PATH
            return
        with self.upper_dir(node.parent) as dir_fd:
            yield dir_fd, node.name

    def _mark_impure(self, dir_fd: int) -> None:
        """Mark an upper directory as holding copied-up entries (overlay.impure), as the kernel
        does: its readdir then reports those entries' origin inode numbers."""
        name = self.xattr_namespace + b"overlay.impure"
        if syscalls.getxattr_or_none(dir_fd, SELF, name) is None:
            syscalls.setxattr(dir_fd, SELF, name, b"y")

    def refresh(self, node: Node, xattrs_changed: bool = True) -> core.Attr:
        """Re-read NODE's attributes from its upper object, and its xattr names when they may
        have changed too (at once: the kernel asks for security.capability before every write
        and chown, and the shim answers that only for names Python has read). A removed file that
        is still open shows what its open files reach (st_nlink 0, as in the kernel)."""
        upper = self.stack.layers[UPPER]
        path = None
        if node.name is None and node.parent is not None:
            if not node.open_files:
                raise FileNotFoundError(errno.ENOENT, "the name of this object was removed")
            attr = core.stat_fd(next(iter(node.open_files)).fd, upper.flags)
        else:
            path = node.path
            attr = self._union_nlink(core.stat_at(upper.root_fd, path, upper.flags), upper.root_fd, path)
        dir_layers = node.dir_layers | UPPER_BIT if stat.S_ISDIR(attr.mode) else 0
        node.update(core.Found(UPPER, attr, dir_layers), self.view)
        if xattrs_changed:
            self.forget_xattr_names(node)
            self.xattr_names(node)
        if path is not None:
            self._hand_to_shim(node, path, attr)
        return attr

    def set_union_nlink(self, node: Node, nlink: int) -> None:
        """Record NLINK as the union link count of NODE's object: in the attributes served for it
        (the kernel asks for them after an unlink, also through another name, and the node may
        have no name left to read them by), and in overlay.nlink of its upper copy if it keeps one
        (a copied-up lower hard link): names can live in the upper layer, in the index or only
        below, so the upper count alone does not tell."""
        node.entry.st_nlink = nlink
        if node.index_name is not None:
            where = contextlib.nullcontext((self.work.index_fd, node.index_name))
        elif node.layer == UPPER and node.name is not None:
            where = self.upper_location(node)
        else:
            return  # all its names are below: the lower count is right
        with where as (dir_fd, name):
            if syscalls.getxattr_or_none(dir_fd, name, self.xattr_namespace + NLINK) is None:
                return
            upper_nlink = syscalls.lstat(dir_fd, name).st_nlink
            syscalls.setxattr(dir_fd, name, self.xattr_namespace + NLINK, b"U%+d" % (nlink - upper_nlink))

    def ensure_upper_dir(self, node: Node) -> None:
        """Copy directory NODE, and the directories above it, up to the upper layer (metadata
        only: a directory's entries stay where they are and keep merging)."""
        self.require_writable()
        if node.layer == UPPER:
            return
        self.ensure_upper_dir(node.parent)
        self._copy_dir_up(node)

    async def copy_up(self, node: Node, with_data: bool = True) -> None:
        """Copy NODE's object to the upper layer before its first change (or, for a kernel
        metacopy file, its data). A big file is copied in a worker thread (INLINE_COPY_MAX); one
        copy-up per object at a time."""
        self.require_writable()
        if node.layer == UPPER and not self.needs_data(node):
            return
        if node.name is None and node.parent is not None:
            # A removed lower file, still open: it has no upper copy and gets none. The kernel's
            # copy-up then finds the whiteout in its way, and says so.
            raise fail(errno.EEXIST)
        if node.is_dir:
            self.ensure_upper_dir(node)
            return
        self._take_from_shim(node)  # before the first await: its open files move to the copy
        lock = self._copy_locks.setdefault(node.ino, trio.Lock())
        try:
            async with lock:
                if node.layer != UPPER or self.needs_data(node):  # not done meanwhile
                    self.ensure_upper_dir(node.parent)
                    if node.index_name is not None:
                        self._link_from_index(node)
                    else:
                        await self._install_copy(node, with_data)
        finally:
            if not lock.statistics().tasks_waiting:
                self._copy_locks.pop(node.ino, None)

    def _copy_dir_up(self, node: Node) -> None:
        tmp = self.work.temp_name()
        with self._at(node) as (src_dir, src_name):
            build_copy(src_dir, src_name, src_dir, src_name, self.work, tmp, False, self.origin_xattr,
                       self.sync)
        self._put_copy_in_place(node, tmp)

    async def copy_to_index(self, node: Node) -> None:
        """Copy a lower hard link's object into the index only, before one of its names goes
        away: its union link count then has an upper inode to be recorded on (as the kernel
        does with index=on)."""
        self.require_writable()
        if node.layer == UPPER or node.index_name is not None or node.is_dir or node.entry.st_nlink < 2:
            return
        await self._install_copy(node, True, into_upper=False)

    async def _install_copy(self, node: Node, with_data: bool, into_upper: bool = True) -> None:
        tmp = self.work.temp_name()
        # A lower hard link is copied once, into the index, where its other names find it.
        indexed = node.layer != UPPER and node.entry.st_nlink > 1
        index_name = self._index_name(node.layer, self.layer_path(node, node.layer)) if indexed else None
        with self._at(node) as meta, self._data_at(node, meta) as data:
            try:
                args = (*meta, *data, self.work, tmp, with_data, self.origin_xattr, self.sync)
                if node.entry.st_size <= INLINE_COPY_MAX:
                    build_copy(*args)
                else:
                    await trio.to_thread.run_sync(build_copy, *args)
                if index_name is not None:
                    # The copy's links (the index, and the name if it goes to the upper layer)
                    # stand for all the lower ones (kernel overlay.nlink).
                    nlink = b"U%+d" % (node.entry.st_nlink - (2 if into_upper else 1))
                    syscalls.setxattr(self.work.fd, tmp, self.xattr_namespace + NLINK, nlink)
                    syscalls.link(self.work.fd, tmp, self.work.index_fd, index_name)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.work.remove(tmp)
                raise
        if into_upper:
            self._put_copy_in_place(node, tmp)
        else:
            self.work.remove(tmp)
            node.index_name = index_name
            attr = core.stat_at(self.work.index_fd, index_name, self.stack.layers[UPPER].flags)
            node.update(node_found(node, self._union_nlink(attr, self.work.index_fd, index_name)), self.view)

    def _link_from_index(self, node: Node) -> None:
        """Copy-up of a lower hard link whose object is in the index already: a new upper link."""
        count = node.entry.st_nlink
        if self._index_is_metacopy(node):
            with self._data_at(node) as data:
                fill_metacopy(data, (self.work.index_fd, node.index_name), node.entry.st_size,
                              self.xattr_namespace + METACOPY, self.sync)
        with self.upper_dir(node.parent) as parent_fd:
            self._mark_impure(parent_fd)
            syscalls.link(self.work.index_fd, node.index_name, parent_fd, node.name)
        node.index_name = None
        self._now_in_upper(node)
        self.set_union_nlink(node, count)  # one more upper link, but the same names
        self.refresh(node)

    def _put_copy_in_place(self, node: Node, tmp: bytes) -> None:
        with self.upper_dir(node.parent) as parent_fd:
            self._mark_impure(parent_fd)
            syscalls.rename(self.work.fd, tmp, parent_fd, node.name)
        self._now_in_upper(node)

    def _now_in_upper(self, node: Node) -> None:
        if self.read_ahead is not None:
            self.read_ahead.changed()
        if not node.is_dir:
            node.lower_paths = NO_LOWER_PATHS  # all of the file is in the upper copy now
        self.refresh(node)
        for handle in list(node.open_files):
            handle.reopen(self)
