"""The daemon runs with csrc/fuse_shim.c preloaded, which gives libfuse a fallocate handler that
pyfuse3 lacks. Loading it takes a fresh start of the process with LD_PRELOAD."""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Sequence

# File handles at or above this are upper-layer fds plus this (the shim's UFS_FD_HANDLE).
FD_HANDLE = 1 << 32
LOADED = "PYUNIONFS_SHIM"


def restart_with_shim(argv: Sequence[str]) -> None:
    """Start this command again with the shim preloaded, unless it is loaded already or cannot
    be found (then fallocate answers EOPNOTSUPP, and everything else works)."""
    if os.environ.get(LOADED):
        os.environ.pop("LD_PRELOAD", None)  # loaded; programs this process runs do not need it
        return
    spec = importlib.util.find_spec("unionfs._fuse_shim")
    if spec is None or not spec.origin:
        return
    env = dict(os.environ, LD_PRELOAD=spec.origin, **{LOADED: "1"})
    os.execve(sys.executable, [sys.executable, sys.argv[0], *argv], env)
