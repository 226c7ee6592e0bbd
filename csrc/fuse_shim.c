/*
 * fuse_shim.c: loaded into the pyunionfs daemon (RTLD_GLOBAL, before pyfuse3, so that pyfuse3's
 * calls to these functions bind here; see unionfs/shim.py) for two things pyfuse3 cannot
 * express. It wraps fuse_session_new(), through which pyfuse3 registers its handlers, to add a
 * fallocate handler; and fuse_reply_open(), to let the kernel cache directory listings
 * (cache_readdir, as fuse-overlayfs asks in ovl_opendir): a warm find then sends no READDIR. The
 * kernel drops a cached listing when the directory changes through the mount.
 *
 * The contract with unionfs/fs.py: a file handle at or above UFS_FD_HANDLE is an open file of the
 * upper layer, and its descriptor is the handle minus UFS_FD_HANDLE. Other handles answer
 * EOPNOTSUPP. Without the shim, the kernel gets ENOSYS and fallocate(2) fails with EOPNOTSUPP.
 *
 * The real fuse_session_new is found with dlopen(RTLD_NOLOAD): RTLD_NEXT does not reach it,
 * because Python loads extensions, and with them libfuse, with RTLD_LOCAL.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <string.h>

#define UFS_FD_HANDLE (UINT64_C(1) << 32)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                size_t, void *);

static struct fuse_lowlevel_ops ops;
/* libfuse's own functions, found in the RTLD_LOCAL copy that pyfuse3 loaded. */
static int (*reply_err)(fuse_req_t req, int err);
static int (*reply_open)(fuse_req_t req, const struct fuse_file_info *fi);

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    (void)ino;
    if (fi->fh < UFS_FD_HANDLE) {
        reply_err(req, EOPNOTSUPP);
        return;
    }
    int fd = (int)(fi->fh - UFS_FD_HANDLE);
    reply_err(req, fallocate(fd, mode, offset, length) < 0 ? errno : 0);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOLOAD | RTLD_LAZY);
    session_new_fn real = libfuse ? (session_new_fn)dlsym(libfuse, "fuse_session_new") : NULL;
    if (!real)
        return NULL;
    reply_err = (int (*)(fuse_req_t, int))dlsym(libfuse, "fuse_reply_err");
    reply_open = (int (*)(fuse_req_t, const struct fuse_file_info *))dlsym(libfuse, "fuse_reply_open");
    memset(&ops, 0, sizeof(ops));
    memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
    if (!ops.fallocate && reply_err)
        ops.fallocate = shim_fallocate;
    return real(args, &ops, sizeof(ops), userdata);
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    if (!reply_open) /* fuse_session_new() was not called through this shim */
        return -ENOSYS;
    struct fuse_file_info reply = *fi;
    /* Opens of files already keep the page cache; for a directory the two flags keep its
       listing in the kernel from one opendir to the next. */
    reply.cache_readdir = 1;
    reply.keep_cache = 1;
    return reply_open(req, &reply);
}
