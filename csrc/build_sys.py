"""cffi builder for unionfs._sys: the namespace and mount system calls the launcher needs, which
Python 3.11's os module lacks (unshare, setns, mount, umount2, pivot_root, sethostname, prctl)."""
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
""")
ffibuilder.set_source(
    "unionfs._sys",
    """
    #define _GNU_SOURCE
    #include <sched.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* glibc has no pivot_root() wrapper. */
    static int ufs_pivot_root(const char *new_root, const char *put_old)
    {
        return (int)syscall(SYS_pivot_root, new_root, put_old);
    }
    """,
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
