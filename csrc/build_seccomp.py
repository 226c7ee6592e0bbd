"""cffi builder for unionfs.runtime._seccomp_ffi: the libseccomp declarations the seccomp filter
calls (from seccomp.h), in cffi's out-of-line ABI mode. The build parses them once into a Python
module, so that neither building needs libseccomp's headers nor every container start pays for
pycparser (some 20 ms); the system's libseccomp.so.2 is opened at run time."""
import cffi

ffibuilder = cffi.FFI()
ffibuilder.cdef("""
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
    int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
""")
ffibuilder.set_source("unionfs.runtime._seccomp_ffi", None)

if __name__ == "__main__":
    ffibuilder.compile()
