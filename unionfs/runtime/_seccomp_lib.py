"""libseccomp through cffi's ABI mode: the declarations this package calls (from seccomp.h), and
the system's libseccomp.so.2 opened at run time, so that building pyunionfs needs no libseccomp
headers."""
from __future__ import annotations

import functools
from typing import Any

import cffi

DECLARATIONS = """
    typedef void *scmp_filter_ctx;
    typedef uint64_t scmp_datum_t;
    struct scmp_arg_cmp { unsigned int arg; int op; scmp_datum_t datum_a; scmp_datum_t datum_b; };
    scmp_filter_ctx seccomp_init(uint32_t def_action);
    void seccomp_release(scmp_filter_ctx ctx);
    uint32_t seccomp_arch_native(void);
    uint32_t seccomp_arch_resolve_name(const char *arch_name);
    int seccomp_arch_exist(const scmp_filter_ctx ctx, uint32_t arch_token);
    int seccomp_arch_add(scmp_filter_ctx ctx, uint32_t arch_token);
    int seccomp_syscall_resolve_name(const char *name);
    int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const struct scmp_arg_cmp *arg_array);
    int seccomp_load(const scmp_filter_ctx ctx);
"""
NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name() returns for an unknown name


@functools.cache
def open_library() -> tuple[Any, Any]:
    """(ffi, lib) of the system's libseccomp."""
    ffi = cffi.FFI()
    ffi.cdef(DECLARATIONS)
    try:
        return ffi, ffi.dlopen("libseccomp.so.2")
    except OSError as exc:
        raise OSError(f"libseccomp is not installed (Debian package libseccomp2): {exc}") from None
