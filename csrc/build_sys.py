"""cffi builder for unionfs.runtime._sys: the namespace and mount system calls the launcher needs, which
Python 3.11's os module lacks (unshare, setns, mount, umount2, pivot_root, sethostname, prctl,
openat2, mount_setattr)."""
import cffi

ffibuilder = cffi.FFI()
ffibuilder.cdef("""
    int unshare(int flags);
    int setns(int fd, int nstype);
    int mount(const char *source, const char *target, const char *fstype, unsigned long flags,
              const char *data);
    int umount2(const char *target, int flags);
    int sethostname(const char *name, size_t len);
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5);
    int ufs_pivot_root(const char *new_root, const char *put_old);
    int ufs_openat2(int dirfd, const char *path, int flags, unsigned long long resolve);
    int ufs_mount_setattr(int dirfd, const char *path, unsigned int flags, unsigned long long attr_set);
    int ufs_load_seccomp_filter(const void *program, size_t size);
""")
ffibuilder.set_source(
    "unionfs.runtime._sys",
    """
    #define _GNU_SOURCE
    #include <errno.h>
    #include <sched.h>
    #include <fcntl.h>
    #include <linux/mount.h>
    #include <linux/filter.h>
    #include <linux/openat2.h>
    #include <linux/seccomp.h>
    #include <stdint.h>
    #include <sys/prctl.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* <sys/mount.h> clashes with <linux/mount.h>, which has struct mount_attr. */
    int mount(const char *, const char *, const char *, unsigned long, const void *);
    int umount2(const char *, int);
    /* glibc 2.36 has wrappers for none of these. */
    static int ufs_pivot_root(const char *new_root, const char *put_old)
    {
        return (int)syscall(SYS_pivot_root, new_root, put_old);
    }
    static int ufs_openat2(int dirfd, const char *path, int flags, unsigned long long resolve)
    {
        struct open_how how = {.flags = (uint64_t)(flags | O_CLOEXEC), .resolve = resolve};
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    }
    static int ufs_mount_setattr(int dirfd, const char *path, unsigned int flags, unsigned long long attr_set)
    {
        struct mount_attr attr = {.attr_set = attr_set};
        return (int)syscall(SYS_mount_setattr, dirfd, path, flags, &attr, sizeof(attr));
    }
    /* A classic BPF program of SIZE bytes (as seccomp_export_bpf writes it) as this thread's
       seccomp filter; the caller has set no_new_privs. */
    static int ufs_load_seccomp_filter(const void *program, size_t size)
    {
        struct sock_fprog prog = {.len = (unsigned short)(size / sizeof(struct sock_filter)),
                                  .filter = (struct sock_filter *)program};
        if (size % sizeof(struct sock_filter) || size / sizeof(struct sock_filter) > BPF_MAXINSNS) {
            errno = EINVAL;
            return -1;
        }
        return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
    }
    """,
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
