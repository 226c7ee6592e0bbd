"""The daemon runs with csrc/fuse_shim.c loaded, which gives libfuse a fallocate handler that
pyfuse3 lacks, serves reads and some GETXATTRs in C, queues FORGETs for Python, and lets the
kernel cache directory listings without OPENDIR round trips (see the file for the contract). It is opened with RTLD_GLOBAL before
pyfuse3 is imported: pyfuse3's calls into libfuse then bind to the shim's wrappers, because the
global scope is searched before a library's own dependencies. No restart with LD_PRELOAD needed."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

DISABLE = "PYUNIONFS_NO_SHIM"  # set: run without it (fallocate then answers EOPNOTSUPP)


_loaded: ctypes.CDLL | None = None


class _Forget(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]  # struct fuse_forget_one


_FORGETS_AT_ONCE = 4096  # the shim's queue holds as many
_forgets = (_Forget * _FORGETS_AT_ONCE)()


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
    _loaded.ufs_shim_set_file.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    _loaded.ufs_shim_take_forgets.argtypes = [ctypes.POINTER(_Forget), ctypes.c_size_t]
    _loaded.ufs_shim_take_forgets.restype = ctypes.c_size_t
    return True


def set_file(fh: int, fd: int, writable: bool) -> None:
    """Tell the shim which layer fd open file handle FH reads from (-1: none, or closed)."""
    if _loaded is not None:
        _loaded.ufs_shim_set_file(fh, fd, int(writable))


def mark_no_xattrs(node_id: int, none: bool) -> None:
    """Tell the shim whether node NODE_ID has no visible xattrs (it then answers GETXATTR)."""
    if _loaded is not None:
        _loaded.ufs_shim_mark_no_xattrs(node_id, int(none))


def take_forgets() -> list[tuple[int, int]]:
    """The (node id, lookup count) forgets the shim queued since the last call."""
    if _loaded is None:
        return []
    taken = _loaded.ufs_shim_take_forgets(_forgets, _FORGETS_AT_ONCE)
    return [(forget.nodeid, forget.nlookup) for forget in _forgets[:taken]]
