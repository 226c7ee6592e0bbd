"""The daemon runs with csrc/fuse_shim.c loaded, which gives libfuse a fallocate handler that
pyfuse3 lacks, serves reads, opens of lower files for reading, some GETXATTRs and the closing
reads of listings in C, queues FORGETs for Python, lets the kernel cache directory listings
without OPENDIR round trips, negotiates FUSE passthrough, and lets pyfuse3's request loop wait
for the next request outside trio (see the file for the contract). It is opened with
RTLD_GLOBAL before pyfuse3 is imported: pyfuse3's calls into libfuse then bind to the shim's
wrappers, because the global scope is searched before a library's own dependencies. No restart
with LD_PRELOAD needed."""
from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Awaitable, Callable, Iterator

log = logging.getLogger("pyunionfs")
DISABLE = "PYUNIONFS_NO_SHIM"  # set: run without it (fallocate then answers EOPNOTSUPP)


_loaded: ctypes.CDLL | None = None


class _Forget(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]  # struct fuse_forget_one


class _Adopted(ctypes.Structure):
    """A file the shim opened, taken in by Python (struct shim_adopted)."""
    _fields_ = [("fh", ctypes.c_uint64), ("node_id", ctypes.c_uint64), ("fd", ctypes.c_int32),
                ("unused", ctypes.c_int32)]


# The handle numbers of files the shim opened start here (csrc/fuse_shim.c: SHIM_FH_BASE); the
# daemon's own stay below.
FIRST_SHIM_FH = 1 << 40


class _Removed(ctypes.Structure):
    _fields_ = [("node_id", ctypes.c_uint64), ("parent_id", ctypes.c_uint64)]  # struct removed_file


# Buffers for the shim's queues, each as long as its queue (csrc/fuse_shim.c: FORGETS_MAX,
# CHANGED_MAX, REMOVED_MAX), so that one call takes all it holds.
_QUEUE_LENGTH = 4096
_forgets = (_Forget * _QUEUE_LENGTH)()
_changed = (ctypes.c_uint64 * _QUEUE_LENGTH)()
_removed = (_Removed * _QUEUE_LENGTH)()


class _Queued(ctypes.Structure):
    """How many entries the shim holds for Python in each queue (struct shim_queued)."""
    _fields_ = [("forgets", ctypes.c_size_t), ("changed", ctypes.c_size_t), ("removed", ctypes.c_size_t),
                ("total", ctypes.c_size_t)]


_queued: _Queued | None = None


def load() -> bool:
    """Load the shim, if it can still take effect (pyfuse3 not imported yet) and is wanted."""
    global _loaded
    if "pyfuse3" in sys.modules or os.environ.get(DISABLE):
        return False
    spec = importlib.util.find_spec("unionfs.fs._fuse_shim")
    if spec is None or not spec.origin:
        return False
    _loaded = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    _loaded.ufs_shim_mark_no_xattrs.argtypes = [ctypes.c_uint64, ctypes.c_int]
    _loaded.ufs_shim_mark_many_no_xattrs.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _loaded.ufs_shim_set_file.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    _loaded.ufs_shim_want_passthrough.argtypes = [ctypes.c_int]
    _loaded.ufs_shim_backing_open.argtypes = [ctypes.c_int]
    _loaded.ufs_shim_backing_close.argtypes = [ctypes.c_int]
    _loaded.ufs_shim_take_forgets.argtypes = [ctypes.POINTER(_Forget), ctypes.c_size_t]
    _loaded.ufs_shim_take_forgets.restype = ctypes.c_size_t
    _loaded.ufs_shim_wait_request.argtypes = []
    _loaded.ufs_shim_set_core.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _loaded.ufs_shim_set_core.restype = None
    _loaded.ufs_shim_set_upper.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double]
    _loaded.ufs_shim_set_upper.restype = None
    _loaded.ufs_shim_hand_over_lower.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64,
                                                 ctypes.c_uint64]
    _loaded.ufs_shim_hand_over_many_lower.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    _loaded.ufs_shim_adopt_opens.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Adopted), ctypes.c_size_t]
    _loaded.ufs_shim_adopt_opens.restype = ctypes.c_size_t
    _loaded.ufs_shim_adopt_open.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Adopted)]
    _loaded.ufs_shim_hand_over.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64,
                                           ctypes.c_uint32, ctypes.c_uint64]
    _loaded.ufs_shim_take_back.argtypes = [ctypes.c_uint64]
    _loaded.ufs_shim_take_back.restype = None
    _loaded.ufs_shim_take_changed.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    _loaded.ufs_shim_take_changed.restype = ctypes.c_size_t
    _loaded.ufs_shim_listed_to_end.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    _loaded.ufs_shim_listed_to_end.restype = None
    _loaded.ufs_shim_take_back_listed_end.argtypes = [ctypes.c_uint64]
    _loaded.ufs_shim_take_removed.argtypes = [ctypes.POINTER(_Removed), ctypes.c_size_t]
    _loaded.ufs_shim_take_removed.restype = ctypes.c_size_t
    global _queued
    _queued = _Queued.in_dll(_loaded, "ufs_shim_queued")
    return True


# How many requests a loop takes in a row from the shim's wait (SPIN_NS without sleeping, then up to
# NEXT_REQUEST_WAIT_MS: csrc/fuse_shim.c) before it lets trio run its other tasks (signals, finished
# copies).
_REQUESTS_IN_A_ROW = 64


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Within it, every call here acts as if the shim were not loaded: a union opened and used
    inside (a fork server's rehearsal) leaves nothing in the shim's tables, which are the
    process's and keyed by node ids that the next union numbers from the start again."""
    global _loaded, _queued
    saved = _loaded, _queued
    _loaded = _queued = None
    try:
        yield
    finally:
        _loaded, _queued = saved


def wait_for_requests_here(pyfuse3: ModuleType, take_queues: Callable[[], None]) -> None:
    """Let PYFUSE3's request loop wait for the next request in the shim while requests follow
    each other closely. Waiting in trio (a lock shared by the workers, re-arming the fd in epoll,
    a pass of the scheduler) is most of pyfuse3's ~70 us of daemon CPU per request; a program
    working through a tree sends its next request within microseconds. pyfuse3's loop looks its
    _wait_fuse_readable up by name at each request; without it (another pyfuse3), nothing
    changes. The trio wait still runs once a request is late or after _REQUESTS_IN_A_ROW, so
    other workers, signals and finished threads get their turn; and a worker waits here only
    while another one waits in trio. Before it waits in trio, TAKE_QUEUES takes in what the
    shim queued (an idle daemon then lets go of the nodes the kernel forgot)."""
    in_trio: Callable[[], Awaitable[bool]] | None = getattr(pyfuse3, "_wait_fuse_readable", None)
    if _loaded is None or in_trio is None:
        return
    wait_here = _loaded.ufs_shim_wait_request
    in_a_row = 0
    waiting_in_trio = 0

    async def wait_fuse_readable() -> bool:
        nonlocal in_a_row, waiting_in_trio
        # Only while another worker waits in trio: pyfuse3 starts a new worker after each request
        # that found no worker waiting there.
        if waiting_in_trio and in_a_row < _REQUESTS_IN_A_ROW and wait_here():
            in_a_row += 1
            return True
        in_a_row = 0
        if queued():
            try:
                take_queues()
            except Exception:  # a bug, but the loop must go on: it serves the mount
                log.exception("taking in the shim's queues failed")
        waiting_in_trio += 1
        try:
            return await in_trio()
        finally:
            waiting_in_trio -= 1

    pyfuse3._wait_fuse_readable = wait_fuse_readable


def set_file(fh: int, fd: int, writable: bool, backing_id: int = 0) -> None:
    """Tell the shim which layer fd open file handle FH reads from (-1: none, or closed), and
    its backing id if the kernel is to serve it (see unionfs/fs/passthrough.py)."""
    if _loaded is not None:
        _loaded.ufs_shim_set_file(fh, fd, int(writable), backing_id)


def want_passthrough(max_stack_depth: int) -> bool:
    """Ask for FUSE passthrough at INIT (before the mount); whether the shim can."""
    return _loaded is not None and _loaded.ufs_shim_want_passthrough(max_stack_depth) == 0


def answer_init() -> None:
    """Answer the kernel's INIT now, right after the mount: every request waits for it, and the
    request loop would read it only once trio has started. Called with the GIL held (a
    PYFUNCTYPE): libfuse calls pyfuse3's init handler, which is Python."""
    if _loaded is not None:
        ctypes.PYFUNCTYPE(ctypes.c_int)(("ufs_shim_answer_init", _loaded))()


def passthrough() -> bool:
    """Did the kernel grant passthrough (known once INIT is answered)?"""
    return _loaded is not None and bool(_loaded.ufs_shim_passthrough())


def backing_open(fd: int) -> int:
    """Register layer file FD as a backing file: its id (> 0), or -errno."""
    return _loaded.ufs_shim_backing_open(fd) if _loaded is not None else -errno.EOPNOTSUPP


def backing_close(backing_id: int) -> None:
    if _loaded is not None:
        _loaded.ufs_shim_backing_close(backing_id)


def mark_no_xattrs(node_id: int, none: bool) -> None:
    """Tell the shim whether node NODE_ID has no visible xattrs (it then answers GETXATTR)."""
    if _loaded is not None:
        _loaded.ufs_shim_mark_no_xattrs(node_id, int(none))


def listed_to_end(node_id: int, end: int) -> None:
    """Directory NODE_ID's listing was replied to the end: the shim answers the kernel's closing
    read, at offset END, itself (once)."""
    if _loaded is not None:
        _loaded.ufs_shim_listed_to_end(node_id, end)


def take_back_listed_end(node_id: int) -> bool:
    """Another read of directory NODE_ID: the shim no longer answers its closing read. Whether
    it was still waiting for it (no closing read came); without the shim, True (Python saw them
    all)."""
    return _loaded is None or bool(_loaded.ufs_shim_take_back_listed_end(node_id))


def mark_many_no_xattrs(node_ids: array.array) -> None:
    """mark_no_xattrs(node_id, True) for each of NODE_IDS (an array of "Q"), in one call."""
    if _loaded is not None and node_ids:
        _loaded.ufs_shim_mark_many_no_xattrs(node_ids.buffer_info()[0], len(node_ids))


def set_core(open_at_address: int, stat_fd_address: int) -> bool:
    """The C core's ufs_open_at and ufs_stat_fd, with which the shim opens and reads the objects
    handed to hand_over() and hand_over_lower(); whether there is a shim to hand them to."""
    if _loaded is None:
        return False
    _loaded.ufs_shim_set_core(open_at_address, stat_fd_address)
    return True


def set_upper(root_fd: int, layer_flags: int, changes_here: bool, attr_timeout: float) -> None:
    """The upper layer's root and flags, whether the shim may change attributes (SETATTR), and
    the attribute timeout, for the objects handed to hand_over()."""
    if _loaded is not None:
        _loaded.ufs_shim_set_upper(root_fd, layer_flags, int(changes_here), attr_timeout)


def hand_over(node_id: int, path: bytes, dev: int, ino: int, file_type: int, shown_ino: int) -> None:
    """Let the shim answer GETATTR and SETATTR of node NODE_ID itself while PATH in the upper
    layer is the object DEV:INO of FILE_TYPE (stat.S_IFDIR or S_IFREG), shown with st_ino
    SHOWN_INO and its attributes as stored; and UNLINK of such a file in such a directory."""
    if _loaded is not None:
        _loaded.ufs_shim_hand_over(node_id, path, dev, ino, file_type, shown_ino)


def hand_over_lower(node_id: int, layer_fd: int, path: bytes, dev: int, ino: int) -> None:
    """Let the shim answer OPEN for reading of node NODE_ID itself while PATH beneath layer root
    LAYER_FD is the regular file DEV:INO, which holds the node's data."""
    if _loaded is not None:
        _loaded.ufs_shim_hand_over_lower(node_id, layer_fd, path, dev, ino)


class LowerFiles:
    """hand_over_lower() for many files (a listing's), gathered, then handed over in one call per
    _LOWER_FILES_AT_ONCE (a listing of 300,000 names would otherwise hold all of them twice)."""

    __slots__ = ("files", "paths")

    def __init__(self) -> None:
        self.files = array.array("Q")  # node id, layer fd, dev, ino of each
        self.paths: list[bytes] = []

    def add(self, node_id: int, layer_fd: int, path: bytes, dev: int, ino: int) -> None:
        self.files.extend((node_id, layer_fd, dev, ino))
        self.paths.append(path)
        if len(self.paths) == _LOWER_FILES_AT_ONCE:
            self.hand_over()

    def hand_over(self) -> None:
        if _loaded is not None and self.paths:
            _loaded.ufs_shim_hand_over_many_lower(self.files.buffer_info()[0], b"\0".join(self.paths) + b"\0",
                                                  len(self.paths))
        del self.files[:]
        self.paths.clear()


_LOWER_FILES_AT_ONCE = 1024


def take_back(node_id: int) -> None:
    """Node NODE_ID's object is gone, or its data about to move: the shim must not answer for it
    any more."""
    if _loaded is not None:
        _loaded.ufs_shim_take_back(node_id)


_adopted = (_Adopted * 64)()


def adopt_opens(node_id: int) -> list[tuple[int, int]]:
    """The (handle number, fd) of the files the shim opened for node NODE_ID and holds: Python's
    from now on (the shim still serves their reads, at the fds set_file() gives)."""
    if _loaded is None:
        return []
    taken: list[tuple[int, int]] = []
    count = len(_adopted)
    while count == len(_adopted):  # a full buffer: there may be more
        count = _loaded.ufs_shim_adopt_opens(node_id, _adopted, len(_adopted))
        taken += [(entry.fh, entry.fd) for entry in _adopted[:count]]
    return taken


def adopt_open(fh: int) -> tuple[int, int] | None:
    """(node id, fd) of the file the shim opened as handle FH, if it holds it: Python's from now on."""
    if _loaded is None or fh < FIRST_SHIM_FH:
        return None
    entry = _Adopted()
    if not _loaded.ufs_shim_adopt_open(fh, ctypes.byref(entry)):
        return None
    return entry.node_id, entry.fd


def lower_opens() -> int:
    """How many opens the shim answered itself since the daemon started."""
    return _counter("ufs_shim_lower_opens")


def closing_reads() -> int:
    """How many closing reads of listings the shim answered itself since the daemon started."""
    return _counter("ufs_shim_closing_reads")


def _counter(name: str) -> int:
    return ctypes.c_uint64.in_dll(_loaded, name).value if _loaded is not None else 0


def queued() -> bool:
    """Does the shim hold forgets, changed nodes or removed files for Python?"""
    return _queued is not None and _queued.total != 0


def _take(queue: str, buffer: ctypes.Array) -> list:
    """The entries the shim holds in QUEUE ("forgets", "changed" or "removed"),
    taken into BUFFER (as long as the queue); one call into the shim, if it holds any."""
    if _queued is None or not getattr(_queued, queue):
        return []
    return buffer[:getattr(_loaded, "ufs_shim_take_" + queue)(buffer, len(buffer))]


def take_removed() -> list[tuple[int, int]]:
    """The (node id, parent node id) of the files the shim unlinked since the last call."""
    return [(entry.node_id, entry.parent_id) for entry in _take("removed", _removed)]


def take_changed() -> list[int]:
    """The node ids whose attributes the shim changed since the last call."""
    return _take("changed", _changed)


def take_forgets() -> list[tuple[int, int]]:
    """The (node id, lookup count) forgets the shim queued since the last call."""
    return [(forget.nodeid, forget.nlookup) for forget in _take("forgets", _forgets)]
