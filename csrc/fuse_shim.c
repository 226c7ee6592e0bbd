/*
 * fuse_shim.c: loaded into the pyunionfs daemon (RTLD_GLOBAL, before pyfuse3, so that pyfuse3's
 * calls to these functions bind here; see unionfs/fs/shim.py) for what pyfuse3 cannot express or
 * what costs a Python round trip for nothing. It wraps fuse_session_new(), through which pyfuse3
 * registers its handlers, to
 *  - add a fallocate handler (pyfuse3 has none),
 *  - serve READ and WRITE of an open layer file itself,
 *  - answer OPENDIR with ENOSYS: the kernel then sends no OPENDIR/RELEASEDIR and caches listings
 *    (it drops a cached listing when the directory changes through the mount),
 *  - answer GETXATTR with ENODATA for objects Python marked as having no xattrs,
 *  - queue FORGETs for Python to apply when it next hands out references (ufs_shim_take_forgets),
 *  - let the kernel send more asynchronous requests (RELEASE among them) at once,
 * and wraps fuse_session_receive_buf(), so that requests it answers itself are served one after
 * the other without going back through pyfuse3's event loop (see fuse_session_receive_buf below).
 *
 * The contract with unionfs/: Python publishes the layer fd behind each open file handle
 * (ufs_shim_set_file) and which node ids have no xattrs (ufs_shim_mark_no_xattrs), from the
 * thread that runs the request handlers, before it replies to the request that changes them; it
 * takes the queued forgets (ufs_shim_take_forgets) from that thread too.
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
#include <linux/fuse.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                size_t, void *);

static struct fuse_lowlevel_ops ops;
/* libfuse's own functions, found in the RTLD_LOCAL copy that pyfuse3 loaded. */
static int (*reply_err)(fuse_req_t req, int err);
static int (*reply_data)(fuse_req_t req, struct fuse_bufvec *bufv, enum fuse_buf_copy_flags flags);
static int (*reply_write)(fuse_req_t req, size_t count);
static size_t (*buf_size)(const struct fuse_bufvec *bufv);
static ssize_t (*buf_copy)(struct fuse_bufvec *dst, struct fuse_bufvec *src, enum fuse_buf_copy_flags flags);

/* Make *TABLE (*COUNT entries of SIZE bytes) hold entry INDEX, the new entries zeroed. */
static int grow_zeroed(void **table, size_t *count, size_t index, size_t size)
{
    if (index < *count)
        return 0;
    size_t wanted = *count ? *count : 1024;
    while (wanted <= index)
        wanted *= 2;
    unsigned char *grown = realloc(*table, wanted * size);
    if (!grown)
        return -ENOMEM;
    memset(grown + *count * size, 0, (wanted - *count) * size);
    *table = grown;
    *count = wanted;
    return 0;
}

/* The layer file behind each open file handle, as unionfs/fs/file.py publishes it (handles are
   small numbers, reused): reads and writes are served here, and fallocate needs it. */
struct open_file {
    int open; /* 0: no layer file (a zeroed entry), or closed */
    int fd;
    int writable;
};
static struct open_file *files;
static size_t files_count;

int ufs_shim_set_file(uint64_t fh, int fd, int writable)
{
    if (fd < 0 && fh >= files_count)
        return 0;
    int rc = grow_zeroed((void **)&files, &files_count, fh, sizeof(*files));
    if (rc < 0)
        return rc;
    files[fh] = (struct open_file){.open = fd >= 0, .fd = fd, .writable = writable};
    return 0;
}

static const struct open_file *file_at(uint64_t fh)
{
    return fh < files_count && files[fh].open ? &files[fh] : NULL;
}

static const struct open_file *file_of(const struct fuse_file_info *fi)
{
    return file_at(fi->fh);
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    (void)ino;
    const struct open_file *file = file_of(fi);
    if (!file || !file->writable) {
        reply_err(req, file ? EBADF : EOPNOTSUPP);
        return;
    }
    reply_err(req, fallocate(file->fd, mode, offset, length) < 0 ? errno : 0);
}

/* pyfuse3's handlers of READ and READDIRPLUS, which take the same arguments. */
typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static read_fn python_read, python_readdirplus;

/* A read of an open layer file, without Python: libfuse reads (or splices) straight from it. A
   handle Python has not published (no shim table entry) goes to Python. */
static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    const struct open_file *file = file_of(fi);
    if (!file) {
        python_read(req, ino, size, off, fi);
        return;
    }
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    buf.buf[0].fd = file->fd;
    buf.buf[0].pos = off;
    reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);
static write_buf_fn python_write_buf;

/* A write to an open upper file, without Python (which re-reads the attributes of a file open
   for writing whenever it replies with them, and after the last writer closes it). */
static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *in, off_t off,
                           struct fuse_file_info *fi)
{
    const struct open_file *file = file_of(fi);
    if (!file || !file->writable) {
        python_write_buf(req, ino, in, off, fi);
        return;
    }
    struct fuse_bufvec out = FUSE_BUFVEC_INIT(buf_size(in));
    out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    out.buf[0].fd = file->fd;
    out.buf[0].pos = off;
    ssize_t written = buf_copy(&out, in, 0);
    if (written < 0)
        reply_err(req, (int)-written);
    else
        reply_write(req, (size_t)written);
}

/* Directories are not opened: the kernel then stops sending OPENDIR and RELEASEDIR (two round
   trips per directory listed) and keeps listings cached by default (FUSE_NO_OPENDIR_SUPPORT). */
static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    reply_err(req, ENOSYS);
}

/* Without OPENDIR a listing arrives with handle 0: hand unionfs/fs/ops.py the node id instead, which
   is what its own opendir returns as the handle. */
static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    struct fuse_file_info with_handle = *fi;
    with_handle.fh = ino;
    python_readdirplus(req, ino, size, off, &with_handle);
}

/* A bit per node id whose object has no extended attribute a user can see, as unionfs/fs/union.py
   found it: GETXATTR for those (ls -l asks for ACLs and security labels of every file) is
   answered ENODATA here, without a round trip into Python. Python sets and clears the bits, from
   the thread that also runs the handlers. Node ids are never reused. */
static unsigned char *no_xattrs;
static size_t no_xattrs_size;

int ufs_shim_mark_no_xattrs(uint64_t ino, int none)
{
    size_t byte = ino / 8;
    if (!none && byte >= no_xattrs_size)
        return 0;
    int rc = grow_zeroed((void **)&no_xattrs, &no_xattrs_size, byte, 1);
    if (rc < 0)
        return rc;
    unsigned char bit = (unsigned char)(1u << (ino % 8));
    no_xattrs[byte] = none ? (no_xattrs[byte] | bit) : (no_xattrs[byte] & ~bit);
    return 0;
}

typedef void (*getxattr_fn)(fuse_req_t, fuse_ino_t, const char *, size_t);
static getxattr_fn python_getxattr;

static int has_no_xattrs(uint64_t ino)
{
    return ino / 8 < no_xattrs_size && (no_xattrs[ino / 8] >> (ino % 8)) & 1;
}

static void shim_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (has_no_xattrs(ino)) {
        reply_err(req, ENODATA);
        return;
    }
    python_getxattr(req, ino, name, size);
}

/* The kernel's FORGETs (node id, lookups to drop), kept until Python takes them: a forget has
   no reply, and since node ids are never reused, dropping the lookups a little later only keeps
   a node alive a little longer. That saves a round trip into Python per file a `rm -rf` removes
   (the kernel forgets each one). When the queue is full, FORGET goes to Python as before. */
#define FORGETS_MAX 4096
static struct fuse_forget_one forgets[FORGETS_MAX];
static size_t forgets_queued;
static int queue_forgets_here; /* Python registered a forget handler, so it will take them */

size_t ufs_shim_take_forgets(struct fuse_forget_one *out, size_t max)
{
    size_t taken = forgets_queued < max ? forgets_queued : max;
    memcpy(out, forgets, taken * sizeof(*forgets));
    memmove(forgets, forgets + taken, (forgets_queued - taken) * sizeof(*forgets));
    forgets_queued -= taken;
    return taken;
}

/* Queue the forgets of a FORGET or BATCH_FORGET request, if all of them fit. */
static int queue_forgets(const struct fuse_in_header *in, size_t arg_size)
{
    if (!queue_forgets_here)
        return 0;
    if (in->opcode == FUSE_FORGET) {
        if (arg_size < sizeof(struct fuse_forget_in) || forgets_queued == FORGETS_MAX)
            return 0;
        const struct fuse_forget_in *arg = (const struct fuse_forget_in *)(in + 1);
        forgets[forgets_queued++] = (struct fuse_forget_one){.nodeid = in->nodeid, .nlookup = arg->nlookup};
        return 1;
    }
    if (arg_size < sizeof(struct fuse_batch_forget_in))
        return 0;
    const struct fuse_batch_forget_in *arg = (const struct fuse_batch_forget_in *)(in + 1);
    size_t count = arg->count;
    if ((arg_size - sizeof(*arg)) / sizeof(struct fuse_forget_one) < count ||
        FORGETS_MAX - forgets_queued < count)
        return 0;
    memcpy(forgets + forgets_queued, arg + 1, count * sizeof(struct fuse_forget_one));
    forgets_queued += count;
    return 1;
}

/* How many asynchronous requests the kernel may have outstanding (its default is 12). RELEASE
   is one: with 12, a daemon serving many busy clients heard of their closes long after they
   happened and kept their files open meanwhile (tens of thousands of fds, then EMFILE). */
#define MAX_BACKGROUND 1024

typedef void (*init_fn)(void *userdata, struct fuse_conn_info *conn);
static init_fn python_init;

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    if (python_init)
        python_init(userdata, conn);
    conn->max_background = MAX_BACKGROUND;
    conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
}

static void (*real_process_buf)(struct fuse_session *, const struct fuse_buf *);

/* Answer the request in BUF here if one of the handlers above would (the same tests they make,
   on the raw request: a struct fuse_in_header, then the operation's own header), or queue it if
   it is a forget. Returns 1 if it did, 0 if the request is for Python. */
static int answer_here(struct fuse_session *se, const struct fuse_buf *buf)
{
    if ((buf->flags & FUSE_BUF_IS_FD) || buf->size < sizeof(struct fuse_in_header))
        return 0;
    const struct fuse_in_header *in = buf->mem;
    size_t arg_size = buf->size - sizeof(*in);
    const struct open_file *file;
    int here;
    switch (in->opcode) {
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        return queue_forgets(in, arg_size); /* nothing for libfuse to do: no reply */
    case FUSE_GETXATTR:
        here = ops.getxattr == shim_getxattr && has_no_xattrs(in->nodeid);
        break;
    case FUSE_OPENDIR:
        here = ops.opendir == shim_opendir;
        break;
    case FUSE_READ:
        here = ops.read == shim_read && arg_size >= sizeof(struct fuse_read_in) &&
               file_at(((const struct fuse_read_in *)(in + 1))->fh);
        break;
    case FUSE_WRITE:
        file = arg_size >= sizeof(struct fuse_write_in)
                   ? file_at(((const struct fuse_write_in *)(in + 1))->fh) : NULL;
        here = ops.write_buf == shim_write_buf && file && file->writable;
        break;
    default:
        here = 0;
    }
    if (here)
        real_process_buf(se, buf);
    return here;
}

/* At most this many requests are answered in C in a row, so Python's own tasks (signals,
   finished copies) are not kept waiting by a steady stream of reads; and how long the next one
   is waited for (a program working through a file or a listing sends it within microseconds). */
#define MAX_ANSWERED_IN_A_ROW 64
#define NEXT_REQUEST_WAIT_MS 1

static int (*real_receive_buf)(struct fuse_session *, struct fuse_buf *);
static int (*session_fd)(struct fuse_session *);

/* pyfuse3 waits in its event loop for the FUSE fd, receives one request and processes it: some
   30 us of Python per request, even for one answered here. Instead, a request answered here is
   processed at once, and the next one is awaited here. The first one for Python goes back to
   pyfuse3 as usual; when none comes in time, EINTR sends pyfuse3 back to its own waiting. */
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    for (int answered = 0;; answered++) {
        int res = real_receive_buf(se, buf);
        if (res <= 0 || !answer_here(se, buf))
            return res;
        struct pollfd waiting = {.fd = session_fd(se), .events = POLLIN};
        if (answered + 1 >= MAX_ANSWERED_IN_A_ROW || poll(&waiting, 1, NEXT_REQUEST_WAIT_MS) <= 0)
            return -EINTR;
    }
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOLOAD | RTLD_LAZY);
    session_new_fn real = libfuse ? (session_new_fn)dlsym(libfuse, "fuse_session_new") : NULL;
    if (!real)
        return NULL;
    reply_err = (int (*)(fuse_req_t, int))dlsym(libfuse, "fuse_reply_err");
    reply_data = (int (*)(fuse_req_t, struct fuse_bufvec *, enum fuse_buf_copy_flags))dlsym(
        libfuse, "fuse_reply_data");
    reply_write = (int (*)(fuse_req_t, size_t))dlsym(libfuse, "fuse_reply_write");
    buf_size = (size_t (*)(const struct fuse_bufvec *))dlsym(libfuse, "fuse_buf_size");
    buf_copy = (ssize_t (*)(struct fuse_bufvec *, struct fuse_bufvec *, enum fuse_buf_copy_flags))dlsym(
        libfuse, "fuse_buf_copy");
    real_receive_buf = (int (*)(struct fuse_session *, struct fuse_buf *))dlsym(
        libfuse, "fuse_session_receive_buf");
    real_process_buf = (void (*)(struct fuse_session *, const struct fuse_buf *))dlsym(
        libfuse, "fuse_session_process_buf");
    session_fd = (int (*)(struct fuse_session *))dlsym(libfuse, "fuse_session_fd");
    if (!real_receive_buf || !real_process_buf || !session_fd)
        return NULL;
    memset(&ops, 0, sizeof(ops));
    memcpy(&ops, op, op_size < sizeof(ops) ? op_size : sizeof(ops));
    if (!ops.fallocate && reply_err)
        ops.fallocate = shim_fallocate;
    if (ops.read && reply_data) {
        python_read = ops.read;
        ops.read = shim_read;
    }
    if (ops.write_buf && reply_write && buf_size && buf_copy) {
        python_write_buf = ops.write_buf;
        ops.write_buf = shim_write_buf;
    }
    if (ops.getxattr && reply_err) {
        python_getxattr = ops.getxattr;
        ops.getxattr = shim_getxattr;
    }
    python_init = ops.init;
    ops.init = shim_init;
    queue_forgets_here = ops.forget && ops.forget_multi;
    /* pyfuse3 answers listings with readdirplus only. */
    if (ops.readdirplus && reply_err) {
        python_readdirplus = ops.readdirplus;
        ops.readdirplus = shim_readdirplus;
        ops.opendir = shim_opendir;
        ops.releasedir = NULL;
    }
    return real(args, &ops, sizeof(ops), userdata);
}
