"""The system's libseccomp.so.2, opened at run time through the declarations csrc/build_seccomp.py
compiled (cffi's out-of-line ABI mode), so that building pyunionfs needs no libseccomp headers."""
from __future__ import annotations

import functools
from typing import Any

from unionfs.runtime._seccomp_ffi import ffi

NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name() returns for an unknown name


@functools.cache
def open_library() -> tuple[Any, Any]:
    """(ffi, lib) of the system's libseccomp."""
    try:
        return ffi, ffi.dlopen("libseccomp.so.2")
    except OSError as exc:
        raise OSError(f"libseccomp is not installed (Debian package libseccomp2): {exc}") from None
