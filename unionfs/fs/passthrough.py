"""FUSE passthrough (Linux 6.9): the kernel reads, writes and maps an open file from its layer
file itself, without a round trip to the daemon.

The kernel wants every open of an inode at one time to be passthrough with the same backing
file, or none of them; and a passthrough file keeps its backing file until it is closed. So a
node's open files share one backing file, registered by the first of them and dropped with the
last, and only where no copy-up can move the node's data while it is open: its upper copy
(registered opened for reading and writing, whatever the first open asked for, so that a later
open for writing can share it), or any file of a read-only union. A lower file of a writable
union stays with the shim's reads: a copy-up moves its open files to the copy, so readers see
the writer's data, as on kernel overlayfs. Registering needs CAP_SYS_ADMIN in the initial user
namespace: a rootless daemon does not ask for passthrough at all."""
from __future__ import annotations

import errno
import os

from unionfs.fs import shim
from unionfs.fs.file import OpenFile
from unionfs.fs.union import Union

# The FUSE mount's stack depth, which its backing files' filesystems must be below: 1, so that
# layers on a plain filesystem qualify and a kernel overlay can still be mounted on the union
# (a layer file on an overlay is refused, ELOOP, and served by the shim instead).
MAX_STACK_DEPTH = 1
# Answers that mean passthrough cannot work on this mount at all.
UNAVAILABLE = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL)


class Passthrough:
    def __init__(self, union: Union):
        self.union = union
        self.available = True  # until the kernel says otherwise
        self._backings: dict[int, list[int]] = {}  # node id -> [backing id, open files using it]
        self._served: set[int] = set()  # node ids the kernel has served (see keep_cache)

    @property
    def nodes(self) -> int:
        """How many nodes have open files the kernel serves."""
        return len(self._backings)

    def attach(self, handle: OpenFile) -> int:
        """The backing id HANDLE's open reply is to name, 0 for none; it counts until detach()."""
        node = handle.node
        held = self._backings.get(node.id)
        if held is not None:
            held[1] += 1
            return held[0]
        if not self.available or len(node.open_files) > 1 or not self.union.data_is_final(node):
            return 0
        if not shim.passthrough():
            self.available = False  # not asked for, or not granted at INIT
            return 0
        access = os.O_RDWR if self.union.writable else os.O_RDONLY
        if handle.flags == access:
            # The handle's own file will do (the kernel holds the backing file by itself).
            backing = shim.backing_open(handle.fd)
        else:
            try:
                fd = self.union.open_file(node, access)
            except OSError:
                return 0  # an immutable file, say: the shim serves it
            try:
                backing = shim.backing_open(fd)
            finally:
                os.close(fd)
        if backing <= 0:
            self.available = -backing not in UNAVAILABLE
            return 0
        self._backings[node.id] = [backing, 1]
        self._served.add(node.id)
        return backing

    def keep_cache(self, handle: OpenFile) -> bool:
        """May HANDLE's open keep the kernel's page cache of its file? Not when the kernel served
        the file through passthrough before and this open is not (no backing file could be
        registered for it): what was written then did not go through that cache."""
        return bool(handle.backing) or handle.node.id not in self._served

    def detach(self, handle: OpenFile) -> None:
        if not handle.backing:
            return
        held = self._backings[handle.node.id]
        held[1] -= 1
        if not held[1]:
            shim.backing_close(held[0])
            del self._backings[handle.node.id]
