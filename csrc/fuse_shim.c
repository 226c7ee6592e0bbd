/*
 * fuse_shim.c: loaded into the pyunionfs daemon (RTLD_GLOBAL, before pyfuse3, so that pyfuse3's
 * calls to these functions bind here; see unionfs/fs/shim.py) for what pyfuse3 cannot express or
 * what costs a Python round trip for nothing. It wraps fuse_session_new(), through which pyfuse3
 * registers its handlers, to
 *  - add a fallocate handler (pyfuse3 has none),
 *  - serve READ and WRITE of an open layer file itself, and OPEN (for reading) and RELEASE of
 *    lower files that Python handed over,
 *  - answer OPENDIR with ENOSYS: the kernel then sends no OPENDIR/RELEASEDIR and caches listings
 *    (it drops a cached listing when the directory changes through the mount), and the closing
 *    read after a listing Python replied to the end,
 *  - answer GETXATTR with ENODATA for objects Python marked as having no xattrs,
 *  - answer GETATTR, and SETATTR of modes, owners and times, of upper-layer objects that Python
 *    handed over, reading and changing them itself (and queueing the changed ones for Python),
 *    UNLINK of such files in such directories (queued for Python too), and LOOKUP of names absent
 *    from such directories,
 *  - queue FORGETs for Python to apply when it next hands out references (ufs_shim_take_forgets),
 *  - let the kernel send more asynchronous requests (RELEASE among them) at once,
 *  - negotiate FUSE passthrough (Linux 6.9) at INIT, which libfuse 3.14 does not know, and mark
 *    the open and create replies of files Python gave a backing id (see "passthrough" below),
 *  - answer INIT as soon as the mount is made (ufs_shim_answer_init), not when the request loop
 *    first reads,
 * and wraps fuse_session_receive_buf(), so that requests it answers itself are served one after
 * the other without going back through pyfuse3's event loop (see fuse_session_receive_buf below).
 *
 * The contract with unionfs/: Python publishes the layer fd behind each open file handle, and
 * its backing id when the kernel is to serve it (ufs_shim_set_file), and which node ids have no
 * xattrs (ufs_shim_mark_no_xattrs), where a listing it replied to the end ends
 * (ufs_shim_listed_to_end, ufs_shim_take_back_listed_end), and which upper objects the shim
 * may read and change for a node id (ufs_shim_set_upper once, ufs_shim_hand_over,
 * ufs_shim_take_back), and which lower files it may open (ufs_shim_hand_over_lower), with the C
 * core's functions to open and read them (ufs_shim_set_core, once), from the thread that runs the request handlers, before it replies
 * to the request that changes them; before a node's data moves or its name goes, it takes the
 * node back and adopts the files the shim opened for it (ufs_shim_adopt_opens), and a handle a
 * request names that the shim opened (ufs_shim_adopt_open); it
 * takes the queued forgets, changed nodes and removed files (ufs_shim_take_forgets,
 * ufs_shim_take_changed, ufs_shim_take_removed) before it handles the next request and before it
 * waits for one, whenever ufs_shim_queued says there are any, and registers and drops backing
 * files (ufs_shim_backing_open, ufs_shim_backing_close), from that thread too. It asks for
 * passthrough before the mount (ufs_shim_want_passthrough) and learns at its first open whether
 * the kernel granted it (ufs_shim_passthrough). Its request loop may wait for the next request
 * here (ufs_shim_wait_request) instead of in trio.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "unionfs_core.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                size_t, void *);

static struct fuse_lowlevel_ops ops;
/* libfuse's own functions, found in the RTLD_LOCAL copy that pyfuse3 loaded. */
static int (*reply_err)(fuse_req_t req, int err);
static int (*reply_data)(fuse_req_t req, struct fuse_bufvec *bufv, enum fuse_buf_copy_flags flags);
static int (*reply_write)(fuse_req_t req, size_t count);
static int (*reply_attr)(fuse_req_t req, const struct stat *attr, double attr_timeout);
static int (*reply_entry)(fuse_req_t req, const struct fuse_entry_param *e);
static int (*reply_buf)(fuse_req_t req, const char *buf, size_t size);
static size_t (*buf_size)(const struct fuse_bufvec *bufv);
static ssize_t (*buf_copy)(struct fuse_bufvec *dst, struct fuse_bufvec *src, enum fuse_buf_copy_flags flags);
static int (*session_fd_of)(struct fuse_session *);

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
    int backing_id; /* > 0: the kernel serves it from that backing file (passthrough) */
};
static struct open_file *files;
static size_t files_count;

/* Files the shim opened itself (see "lower files" below) have handle numbers from SHIM_FH_BASE
   up, far above Python's (small, reused numbers), so the two kinds never meet. */
#define SHIM_FH_BASE (UINT64_C(1) << 40)
struct shim_open {
    struct open_file file;
    uint64_t node_id;
    int adopted;   /* Python took it in (ufs_shim_adopt_*): all but its reads are Python's now */
    int next_free; /* the next free entry's index, -1 for none */
};
static struct shim_open *shim_opens;
static size_t shim_opens_count; /* entries allocated */
static int shim_opens_used;     /* entries ever handed out: those below are open or free */
static int shim_opens_free = -1;
uint64_t ufs_shim_lower_opens; /* opens answered here, since the start (for the status line) */

static struct shim_open *shim_open_at(uint64_t fh)
{
    if (fh < SHIM_FH_BASE || fh - SHIM_FH_BASE >= (uint64_t)shim_opens_used)
        return NULL;
    struct shim_open *entry = &shim_opens[fh - SHIM_FH_BASE];
    return entry->file.open ? entry : NULL;
}

static void free_shim_open(struct shim_open *entry)
{
    *entry = (struct shim_open){.next_free = shim_opens_free};
    shim_opens_free = (int)(entry - shim_opens);
}


int ufs_shim_set_file(uint64_t fh, int fd, int writable, int backing_id)
{
    if (fh >= SHIM_FH_BASE) { /* one the shim opened and Python adopted: it moved, or closed */
        struct shim_open *entry = shim_open_at(fh);
        if (!entry || !entry->adopted)
            return -EBADF;
        if (fd < 0)
            free_shim_open(entry);
        else
            entry->file = (struct open_file){.open = 1, .fd = fd, .writable = writable, .backing_id = backing_id};
        return 0;
    }
    if (fd < 0 && fh >= files_count)
        return 0;
    int rc = grow_zeroed((void **)&files, &files_count, fh, sizeof(*files));
    if (rc < 0)
        return rc;
    files[fh] = (struct open_file){.open = fd >= 0, .fd = fd, .writable = writable, .backing_id = backing_id};
    return 0;
}

static const struct open_file *file_at(uint64_t fh)
{
    if (fh >= SHIM_FH_BASE) {
        const struct shim_open *entry = shim_open_at(fh);
        return entry ? &entry->file : NULL;
    }
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

/* The same, for COUNT node ids at once, all with none (a listing's: one call instead of one each). */
int ufs_shim_mark_many_no_xattrs(const uint64_t *ids, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        int rc = ufs_shim_mark_no_xattrs(ids[i], 1);
        if (rc < 0)
            return rc;
    }
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

/* How many forgets, changed nodes and removed files are queued for Python, which looks at the
   total before each request it handles and then takes the queues that hold any
   (ufs_shim_take_*: a call each, so the counts save it the empty ones). */
struct shim_queued {
    size_t forgets, changed, removed, total;
} ufs_shim_queued;
static struct shim_queued *const queued = &ufs_shim_queued;

static void recount_queued(void)
{
    queued->total = queued->forgets + queued->changed + queued->removed;
}

/* Move up to MAX of the *COUNT entries (SIZE bytes each) at the head of QUEUE to OUT: how many. */
static size_t take_queued(void *queue, size_t *count, size_t size, void *out, size_t max)
{
    size_t taken = *count < max ? *count : max;
    memcpy(out, queue, taken * size);
    memmove(queue, (char *)queue + taken * size, (*count - taken) * size);
    *count -= taken;
    recount_queued();
    return taken;
}

/* Objects of the upper layer whose attributes the shim reads and changes itself. The kernel asks
   for a directory's attributes again after each change in it (its permission check before the
   next unlink or create in it), and tar sets the owner, mode and times of each file it unpacks:
   each a round trip into Python for one or two system calls. Python hands over, per node it has
   answered for, the object's path in the upper layer and what it found there
   (ufs_shim_hand_over): only directories of the upper layer alone and regular files with their
   own data and one link, whose attributes the union shows as they are stored. A GETATTR, or a
   SETATTR of the mode, times or (for an object without xattrs: a chown may drop
   security.capability) owner, is answered here when the path still leads, beneath the upper root
   and through no symlink (the C core's ufs_open_at), to that same object; else it goes to Python,
   which hands over the new path after a rename. A changed node is queued for Python
   (ufs_shim_take_changed): its own copy of the attributes is then stale. Python takes back a
   node whose object it removed (an inode number may be reused at the same path). A small cache:
   a node id takes the slot of its low bits. */
#define UPPER_OBJECT_SLOTS 1024
struct upper_object {
    uint64_t node_id;   /* 0: an empty slot */
    uint64_t shown_ino; /* st_ino as the union shows it */
    uint64_t dev, ino;  /* the upper object's own */
    uint32_t type;      /* S_IFDIR or S_IFREG */
    int queued;         /* in the queue of changed nodes (once is enough) */
    char *path;         /* beneath the upper root ("." for the root) */
};
static struct upper_object upper_objects[UPPER_OBJECT_SLOTS];
static int upper_root_fd = -1;
static int upper_layer_flags;
static int upper_changes_here; /* SETATTR may be answered here (no override_stat xattr in use) */
static double upper_attr_timeout;
/* The C core's (unionfs_core.h), whose address Python passes: the core is another library. */
static int (*core_open_at)(int root_fd, const char *path, int flags);
static int (*core_stat_fd)(int fd, int layer_flags, struct ufs_attr *out);

void ufs_shim_set_core(int (*open_at)(int, const char *, int), int (*stat_fd)(int, int, struct ufs_attr *))
{
    core_open_at = open_at;
    core_stat_fd = stat_fd;
}

void ufs_shim_set_upper(int root_fd, int layer_flags, int changes_here, double attr_timeout)
{
    upper_root_fd = root_fd;
    upper_layer_flags = layer_flags;
    upper_changes_here = changes_here;
    upper_attr_timeout = attr_timeout;
}

static struct upper_object *upper_object_slot(uint64_t node_id)
{
    return &upper_objects[node_id % UPPER_OBJECT_SLOTS];
}

static void take_back_upper(uint64_t node_id)
{
    struct upper_object *slot = upper_object_slot(node_id);
    if (slot->node_id != node_id)
        return;
    free(slot->path);
    *slot = (struct upper_object){0};
}

static void take_back_lower(uint64_t node_id);

void ufs_shim_take_back(uint64_t node_id)
{
    take_back_upper(node_id);
    take_back_lower(node_id);
}

int ufs_shim_hand_over(uint64_t node_id, const char *path, uint64_t dev, uint64_t ino, uint32_t type,
                       uint64_t shown_ino)
{
    if (!node_id || (type != S_IFDIR && type != S_IFREG))
        return -EINVAL;
    char *copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    struct upper_object *slot = upper_object_slot(node_id);
    /* One slot per object: an UNLINK is matched to its node by the object's dev:ino, and the
       node handed over last is the one Python counts (an older one was forgotten, or listed
       in a pass the kernel gave up). */
    for (size_t i = 0; i < UPPER_OBJECT_SLOTS; i++)
        if (upper_objects[i].ino == ino && upper_objects[i].dev == dev && &upper_objects[i] != slot &&
            upper_objects[i].node_id)
            take_back_upper(upper_objects[i].node_id);
    int was_queued = slot->node_id == node_id && slot->queued;
    free(slot->path);
    *slot = (struct upper_object){.node_id = node_id, .shown_ino = shown_ino, .dev = dev, .ino = ino,
                                  .type = type, .queued = was_queued, .path = copy};
    return 0;
}

/* Nodes whose attributes were changed here, until Python takes them. */
#define CHANGED_MAX 4096
static uint64_t changed[CHANGED_MAX];

size_t ufs_shim_take_changed(uint64_t *out, size_t max)
{
    size_t taken = take_queued(changed, &queued->changed, sizeof(*changed), out, max);
    for (size_t i = 0; i < taken; i++) {
        struct upper_object *slot = upper_object_slot(out[i]);
        if (slot->node_id == out[i])
            slot->queued = 0;
    }
    return taken;
}

/* The reply worked out for the GETATTR or SETATTR being answered: its node id (0: none), and
   an errno or the attributes. */
static uint64_t answer_of;
static int answer_errno;
static struct stat answer_stat;

/* Is the answer worked out for node ID's request (the one a handler below is called for)? It is
   then used up; else the handler hands the request to Python. */
static int take_answer(uint64_t id)
{
    if (!id || answer_of != id)
        return 0;
    answer_of = 0;
    return 1;
}

/* The closing read of a listing: once Python replied a directory's entries to the end, the
   kernel reads once more at the offset after the last one, only to learn that nothing follows (a
   round trip into Python per directory a walk lists). Python records that offset
   (ufs_shim_listed_to_end) and such a read is answered here, empty, once; Python takes the
   offset back as it answers any other read of the directory (a new pass, whose entries may go
   further), and learns so whether the closing read came (the pass was read to its end, not left
   after its first reply). A slot per node id's low bits: a closing read whose slot another
   directory took goes to Python, which answers it as well, only slower. */
#define LISTED_SLOTS 1024
static struct listed_end {
    uint64_t node_id; /* 0: an empty slot */
    uint64_t end;
} listed_ends[LISTED_SLOTS];
uint64_t ufs_shim_closing_reads; /* answered here, since the start (for the status line) */

void ufs_shim_listed_to_end(uint64_t node_id, uint64_t end)
{
    struct listed_end *slot = &listed_ends[node_id % LISTED_SLOTS];
    slot->node_id = node_id;
    slot->end = end;
}

/* Take back the end recorded for directory NODE_ID: 1 if it was still there (no closing read
   came), 0 if its closing read was answered (or another directory took its slot). */
int ufs_shim_take_back_listed_end(uint64_t node_id)
{
    struct listed_end *slot = &listed_ends[node_id % LISTED_SLOTS];
    if (!node_id || slot->node_id != node_id)
        return 0;
    slot->node_id = 0;
    return 1;
}

/* Is this read of directory NODE_ID at OFFSET its closing read? Then it is answered here. */
static int closing_read(uint64_t node_id, uint64_t offset)
{
    struct listed_end *slot = &listed_ends[node_id % LISTED_SLOTS];
    if (!node_id || slot->node_id != node_id || slot->end != offset)
        return 0;
    slot->node_id = 0;
    answer_of = node_id;
    ufs_shim_closing_reads++;
    return 1;
}

/* Without OPENDIR a listing arrives with handle 0: hand unionfs/fs/ops.py the node id instead, which
   is what its own opendir returns as the handle. */
static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    if (take_answer(ino)) {
        reply_buf(req, NULL, 0);
        return;
    }
    struct fuse_file_info with_handle = *fi;
    with_handle.fh = ino;
    python_readdirplus(req, ino, size, off, &with_handle);
}

/* Lower files: regular files of a lower layer with one link, their data their own, that Python
   handed over per node as it looked them up (ufs_shim_hand_over_lower: the layer's root fd, the
   path beneath it, and the file's dev:ino). An OPEN for reading of such a node is answered here:
   the file is opened beneath the layer root through no symlink (ufs_open_at), checked to be that
   same file, and given a handle number of the shim's own; its reads are served here as any
   other's, and its RELEASE closes it here. tar and a build read thousands of files, each an OPEN
   and a RELEASE. Python takes the node back before its data can move (a copy-up) or its name go
   (ufs_shim_take_back), and then takes in the files the shim opened for it (ufs_shim_adopt_opens;
   one handle at a time, ufs_shim_adopt_open, for a request that names a handle): from then on
   they are Python's open files, which a copy-up moves to the copy, and only their reads stay
   here. A small cache, as for upper objects: a node id takes the slot of its low bits. */
#define LOWER_FILE_SLOTS 4096
struct lower_file {
    uint64_t node_id; /* 0: an empty slot */
    uint64_t dev, ino;
    int layer_fd;     /* the layer's root: Python's, open as long as the union */
    char *path;       /* beneath it */
};
static struct lower_file lower_files[LOWER_FILE_SLOTS];

int ufs_shim_hand_over_lower(uint64_t node_id, int layer_fd, const char *path, uint64_t dev, uint64_t ino)
{
    if (!node_id || layer_fd < 0)
        return -EINVAL;
    char *copy = strdup(path);
    if (!copy)
        return -ENOMEM;
    struct lower_file *slot = &lower_files[node_id % LOWER_FILE_SLOTS];
    free(slot->path);
    *slot = (struct lower_file){.node_id = node_id, .dev = dev, .ino = ino, .layer_fd = layer_fd, .path = copy};
    return 0;
}

/* The same for COUNT files at once (a listing's): FILES holds node id, layer fd, dev and ino of
   each, PATHS their paths one after the other, each ending at its NUL. */
int ufs_shim_hand_over_many_lower(const uint64_t *files, const char *paths, size_t count)
{
    for (size_t i = 0; i < count; i++, files += 4) {
        int rc = ufs_shim_hand_over_lower(files[0], (int)files[1], paths, files[2], files[3]);
        if (rc < 0)
            return rc;
        paths += strlen(paths) + 1;
    }
    return 0;
}

static void take_back_lower(uint64_t node_id)
{
    struct lower_file *slot = &lower_files[node_id % LOWER_FILE_SLOTS];
    if (slot->node_id != node_id)
        return;
    free(slot->path);
    *slot = (struct lower_file){0};
}

/* An entry for a file opened here (its index), or -1 without memory. */
static int new_shim_open(void)
{
    if (shim_opens_free >= 0) {
        int index = shim_opens_free;
        shim_opens_free = shim_opens[index].next_free;
        return index;
    }
    if (shim_opens_used == INT32_MAX ||
        grow_zeroed((void **)&shim_opens, &shim_opens_count, (size_t)shim_opens_used, sizeof(*shim_opens)) < 0)
        return -1;
    return shim_opens_used++;
}

/* The entry opened for the OPEN being answered (-1: none). */
static int answer_open = -1;

/* Work out the answer to an OPEN of node NODE_ID with FLAGS here: 1 if it can be (the file is
   open, in entry answer_open), 0 if the request is for Python. */
static int open_lower_file(uint64_t node_id, uint32_t flags)
{
    const struct lower_file *slot = &lower_files[node_id % LOWER_FILE_SLOTS];
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) || !node_id || slot->node_id != node_id ||
        !core_open_at)
        return 0;
    int fd = core_open_at(slot->layer_fd, slot->path, O_RDONLY);
    if (fd < 0)
        return 0;
    struct stat st;
    int index;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_dev != slot->dev || st.st_ino != slot->ino ||
        (index = new_shim_open()) < 0) {
        close(fd);
        take_back_lower(node_id); /* not the file handed over (or no memory): Python's now */
        return 0;
    }
    shim_opens[index] = (struct shim_open){.file = {.open = 1, .fd = fd}, .node_id = node_id, .next_free = -1};
    answer_of = node_id;
    answer_open = index;
    return 1;
}

/* Close the entry answer_open if its OPEN was not answered after all. */
static void drop_unanswered_open(void)
{
    if (answer_open < 0)
        return;
    close(shim_opens[answer_open].file.fd);
    free_shim_open(&shim_opens[answer_open]);
    answer_open = -1;
}

typedef void (*open_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static open_fn python_open, python_release;

static void shim_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (answer_open < 0 || !take_answer(ino)) {
        python_open(req, ino, fi);
        return;
    }
    int index = answer_open;
    answer_open = -1;
    fi->fh = SHIM_FH_BASE + (uint64_t)index;
    fi->keep_cache = 1; /* as Python's open of a file the kernel never served by passthrough */
    fi->direct_io = 0;
    if (fuse_reply_open(req, fi) == 0) {
        ufs_shim_lower_opens++;
        return;
    }
    close(shim_opens[index].file.fd); /* the kernel gave up the request: no RELEASE follows */
    free_shim_open(&shim_opens[index]);
}

/* Is FH a file the shim opened and still holds (not adopted by Python)? */
static struct shim_open *held_here(uint64_t fh)
{
    struct shim_open *entry = shim_open_at(fh);
    return entry && !entry->adopted ? entry : NULL;
}

static void shim_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct shim_open *entry = held_here(fi->fh);
    if (!entry) {
        python_release(req, ino, fi);
        return;
    }
    close(entry->file.fd);
    free_shim_open(entry);
    reply_err(req, 0);
}

/* What Python takes in of a file the shim opened (struct shim_adopted in unionfs/fs/shim.py). */
struct shim_adopted {
    uint64_t fh, node_id;
    int32_t fd, unused;
};

static void adopt(struct shim_open *entry, struct shim_adopted *out)
{
    entry->adopted = 1;
    *out = (struct shim_adopted){.fh = SHIM_FH_BASE + (uint64_t)(entry - shim_opens), .node_id = entry->node_id,
                                 .fd = entry->file.fd};
}

/* Hand Python (OUT, room for MAX) the files the shim holds open for node NODE_ID: how many. */
size_t ufs_shim_adopt_opens(uint64_t node_id, struct shim_adopted *out, size_t max)
{
    size_t taken = 0;
    for (int i = 0; i < shim_opens_used && taken < max; i++)
        if (shim_opens[i].file.open && !shim_opens[i].adopted && shim_opens[i].node_id == node_id)
            adopt(&shim_opens[i], &out[taken++]);
    return taken;
}

/* Hand Python (OUT) the file the shim holds open as handle FH: 1, or 0 if it holds none such. */
int ufs_shim_adopt_open(uint64_t fh, struct shim_adopted *out)
{
    struct shim_open *entry = held_here(fh);
    if (!entry)
        return 0;
    adopt(entry, out);
    return 1;
}

/* NS nanoseconds since the epoch as a struct timespec, whose tv_nsec is never negative (a time
   before 1970 has a negative tv_sec, and C's division rounds toward zero). */
static struct timespec timespec_of(int64_t ns)
{
    int64_t sec = ns / 1000000000, nsec = ns % 1000000000;
    if (nsec < 0) {
        sec--;
        nsec += 1000000000;
    }
    return (struct timespec){.tv_sec = sec, .tv_nsec = nsec};
}

/* An O_PATH fd of node NODE_ID's upper object, if the cache holds it and its path still leads
   to it; else -1 (and the node is dropped from the cache). */
static int open_upper_object(uint64_t node_id, struct upper_object **found)
{
    struct upper_object *slot = upper_object_slot(node_id);
    if (slot->node_id != node_id || !node_id || !core_open_at || upper_root_fd < 0)
        return -1;
    int fd = core_open_at(upper_root_fd, slot->path, O_PATH);
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == slot->dev && st.st_ino == slot->ino &&
        (st.st_mode & S_IFMT) == slot->type && (slot->type == S_IFDIR || st.st_nlink == 1)) {
        *found = slot;
        return fd;
    }
    /* A file with more links may carry overlay.nlink, which Python reads. */
    if (fd >= 0)
        close(fd);
    take_back_upper(node_id);
    return -1;
}

/* Fill in the answer for node NODE_ID from FD, its object: 1, or 0 if it cannot be read. */
static int answer_with(uint64_t node_id, const struct upper_object *object, int fd)
{
    struct ufs_attr a;
    if (core_stat_fd(fd, upper_layer_flags, &a) < 0)
        return 0;
    answer_stat = (struct stat){
        .st_ino = object->shown_ino, .st_mode = a.mode, .st_nlink = a.nlink, .st_uid = a.uid, .st_gid = a.gid,
        .st_rdev = a.rdev, .st_size = (off_t)a.size, .st_blksize = a.blksize, .st_blocks = (blkcnt_t)a.blocks,
        .st_atim = timespec_of(a.atime_ns), .st_mtim = timespec_of(a.mtime_ns), .st_ctim = timespec_of(a.ctime_ns),
    };
    answer_of = node_id;
    answer_errno = 0;
    return 1;
}

/* Work out the answer to a GETATTR of node NODE_ID here: 1 if it can be. */
static int read_upper_attr(uint64_t node_id)
{
    struct upper_object *object;
    int fd = open_upper_object(node_id, &object);
    if (fd < 0)
        return 0;
    int here = answer_with(node_id, object, fd);
    close(fd);
    return here;
}

/* The changes of a SETATTR made here; any other (a size, a lock owner's) goes to Python. */
#define SETATTR_HERE (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | \
                      FATTR_MTIME_NOW | FATTR_FH)

static struct timespec time_to_set(int set, int now, uint64_t sec, uint32_t nsec)
{
    if (!set)
        return (struct timespec){.tv_nsec = UTIME_OMIT};
    if (now)
        return (struct timespec){.tv_nsec = UTIME_NOW};
    return (struct timespec){.tv_sec = (time_t)sec, .tv_nsec = nsec};
}

/* Make the changes of a SETATTR of node NODE_ID here, in the order Python makes them (a chown
   clears set-ID bits, so the mode comes after it): 1 if they were made, with the answer ready
   (an errno if one failed), 0 if the request is for Python (nothing was changed). */
static int change_upper_attr(uint64_t node_id, const struct fuse_setattr_in *arg)
{
    if (!upper_changes_here || (arg->valid & ~SETATTR_HERE) ||
        ((arg->valid & (FATTR_UID | FATTR_GID)) && !has_no_xattrs(node_id)))
        return 0;
    struct upper_object *object;
    int fd = open_upper_object(node_id, &object);
    if (fd < 0)
        return 0;
    if (!object->queued) {
        if (queued->changed == CHANGED_MAX) {
            close(fd);
            return 0;
        }
        changed[queued->changed++] = node_id;
        object->queued = 1;
        recount_queued();
    }
    int rc = 0;
    if (arg->valid & (FATTR_UID | FATTR_GID))
        rc = fchownat(fd, "", arg->valid & FATTR_UID ? arg->uid : (uid_t)-1,
                      arg->valid & FATTR_GID ? arg->gid : (gid_t)-1, AT_EMPTY_PATH);
    if (rc == 0 && (arg->valid & FATTR_MODE)) {
        char proc[64]; /* fchmod() refuses an O_PATH fd; the object is a file or a directory */
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        rc = chmod(proc, arg->mode & 07777);
    }
    if (rc == 0 && (arg->valid & (FATTR_ATIME | FATTR_MTIME))) {
        struct timespec times[2] = {
            time_to_set(arg->valid & FATTR_ATIME, arg->valid & FATTR_ATIME_NOW, arg->atime, arg->atimensec),
            time_to_set(arg->valid & FATTR_MTIME, arg->valid & FATTR_MTIME_NOW, arg->mtime, arg->mtimensec),
        };
        rc = utimensat(fd, "", times, AT_EMPTY_PATH);
    }
    int failed = rc < 0 ? errno : 0;
    if (failed || !answer_with(node_id, object, fd)) {
        answer_of = node_id;
        answer_errno = failed ? failed : EIO;
    }
    close(fd);
    return 1;
}

typedef void (*getattr_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static getattr_fn python_getattr;

static void shim_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (!take_answer(ino)) {
        python_getattr(req, ino, fi);
        return;
    }
    reply_attr(req, &answer_stat, upper_attr_timeout);
}

typedef void (*setattr_fn)(fuse_req_t, fuse_ino_t, struct stat *, int, struct fuse_file_info *);
static setattr_fn python_setattr;

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    if (!take_answer(ino)) {
        python_setattr(req, ino, attr, to_set, fi);
        return;
    }
    if (answer_errno)
        reply_err(req, answer_errno);
    else
        reply_attr(req, &answer_stat, upper_attr_timeout);
}

/* A plain name for the handed-over directory's own calls: not "." or "..", no '/', and not an
   OCI ".wh." name (a whiteout marker, which the union never shows); NAME is the request's
   argument of ARG_SIZE bytes, which must end at its NUL. */
static int plain_name(const char *name, size_t arg_size)
{
    return arg_size && strnlen(name, arg_size) == arg_size - 1 && strncmp(name, ".wh.", 4) != 0 &&
           !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* LOOKUP of a name absent from a handed-over directory, which is of the upper layer alone, so
   the name is absent from the union: answered here with the negative entry Python answers
   (the kernel caches it for the entry timeout). tar, compileall and git look a name up before
   they create it. A name that is there (a whiteout too) goes to Python. */
static int find_absent(uint64_t parent_id, const char *name, size_t arg_size)
{
    if (!plain_name(name, arg_size))
        return 0;
    struct upper_object *parent;
    int parent_fd = open_upper_object(parent_id, &parent);
    if (parent_fd < 0)
        return 0;
    struct stat st;
    int absent = parent->type == S_IFDIR && fstatat(parent_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 &&
                 errno == ENOENT;
    close(parent_fd);
    if (absent) {
        answer_of = parent_id;
        answer_errno = 0;
    }
    return absent;
}

typedef void (*lookup_fn)(fuse_req_t, fuse_ino_t, const char *);
static lookup_fn python_lookup;

static void shim_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (!take_answer(parent)) {
        python_lookup(req, parent, name);
        return;
    }
    struct fuse_entry_param absent = {.ino = 0, .entry_timeout = upper_attr_timeout};
    reply_entry(req, &absent);
}

/* UNLINK of a regular file with one link that Python handed over, in a directory it handed over
   (of the upper layer alone: no layer below has the name, so no whiteout is due), under the
   name Python knows it by: unlinked here, and queued for Python (ufs_shim_take_removed), which
   forgets the object as its own unlink would, before it handles any other request. `rm -rf`
   then costs no round trip into Python per file. Anything else (a directory, hard links, an
   OCI whiteout name, a name the shim does not hold) goes to Python. */
#define REMOVED_MAX 4096
struct removed_file {
    uint64_t node_id, parent_id;
};
static struct removed_file removed[REMOVED_MAX];

size_t ufs_shim_take_removed(struct removed_file *out, size_t max)
{
    return take_queued(removed, &queued->removed, sizeof(*removed), out, max);
}

/* The slot of the handed-over regular file DEV:INO at PARENT_PATH/NAME, or NULL. */
static struct upper_object *handed_over_file(uint64_t dev, uint64_t ino, const char *parent_path, const char *name)
{
    size_t parent_len = strcmp(parent_path, ".") == 0 ? 0 : strlen(parent_path);
    for (size_t i = 0; i < UPPER_OBJECT_SLOTS; i++) {
        struct upper_object *slot = &upper_objects[i];
        if (!slot->node_id || slot->ino != ino || slot->dev != dev || slot->type != S_IFREG)
            continue;
        const char *path = slot->path;
        if (parent_len && (strncmp(path, parent_path, parent_len) != 0 || path[parent_len] != '/'))
            continue;
        if (strcmp(path + (parent_len ? parent_len + 1 : 0), name) == 0)
            return slot;
    }
    return NULL;
}

/* Unlink NAME (ARG_SIZE bytes with its NUL) in node PARENT_ID's upper directory here: 1 if it
   was removed, with the answer ready; 0 if the request is for Python (nothing was changed). */
static int remove_upper_file(uint64_t parent_id, const char *name, size_t arg_size)
{
    if (queued->removed == REMOVED_MAX || !plain_name(name, arg_size))
        return 0;
    struct upper_object *parent;
    int parent_fd = open_upper_object(parent_id, &parent);
    if (parent_fd < 0)
        return 0;
    int here = 0;
    struct stat st;
    struct upper_object *file;
    if (parent->type == S_IFDIR && fstatat(parent_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG(st.st_mode) && st.st_nlink == 1 &&
        (file = handed_over_file(st.st_dev, st.st_ino, parent->path, name)) != NULL &&
        unlinkat(parent_fd, name, 0) == 0) {
        removed[queued->removed++] = (struct removed_file){.node_id = file->node_id, .parent_id = parent_id};
        recount_queued();
        take_back_upper(file->node_id);
        answer_of = parent_id;
        answer_errno = 0;
        here = 1;
    }
    close(parent_fd);
    return here;
}

typedef void (*unlink_fn)(fuse_req_t, fuse_ino_t, const char *);
static unlink_fn python_unlink;

static void shim_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (!take_answer(parent)) {
        python_unlink(req, parent, name);
        return;
    }
    reply_err(req, answer_errno);
}

/* The kernel's FORGETs (node id, lookups to drop), kept until Python takes them: a forget has
   no reply, and since node ids are never reused, dropping the lookups a little later only keeps
   a node alive a little longer. That saves a round trip into Python per file a `rm -rf` removes
   (the kernel forgets each one). When the queue is full, FORGET goes to Python as before. */
#define FORGETS_MAX 4096
static struct fuse_forget_one forgets[FORGETS_MAX];
static int queue_forgets_here; /* Python registered a forget handler, so it will take them */

size_t ufs_shim_take_forgets(struct fuse_forget_one *out, size_t max)
{
    return take_queued(forgets, &queued->forgets, sizeof(*forgets), out, max);
}

/* Queue the forgets of a FORGET or BATCH_FORGET request, if all of them fit. */
static int queue_forgets(const struct fuse_in_header *in, size_t arg_size)
{
    if (!queue_forgets_here)
        return 0;
    if (in->opcode == FUSE_FORGET) {
        if (arg_size < sizeof(struct fuse_forget_in) || queued->forgets == FORGETS_MAX)
            return 0;
        const struct fuse_forget_in *arg = (const struct fuse_forget_in *)(in + 1);
        forgets[queued->forgets++] = (struct fuse_forget_one){.nodeid = in->nodeid, .nlookup = arg->nlookup};
        recount_queued();
        return 1;
    }
    if (arg_size < sizeof(struct fuse_batch_forget_in))
        return 0;
    const struct fuse_batch_forget_in *arg = (const struct fuse_batch_forget_in *)(in + 1);
    size_t count = arg->count;
    if ((arg_size - sizeof(*arg)) / sizeof(struct fuse_forget_one) < count ||
        FORGETS_MAX - queued->forgets < count)
        return 0;
    memcpy(forgets + queued->forgets, arg + 1, count * sizeof(struct fuse_forget_one));
    queued->forgets += count;
    recount_queued();
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

/*
 * Passthrough (Linux 6.9, CONFIG_FUSE_PASSTHROUGH): the open reply of a file names a backing
 * file registered on the FUSE device, and the kernel then reads, writes and maps that file
 * itself. libfuse 3.14 knows none of it, so the shim
 *  - notes the kernel's INIT request, and when the kernel offers passthrough and Python asked for
 *    it, adds FUSE_PASSTHROUGH and max_stack_depth to libfuse's INIT reply as it is written (the
 *    session's I/O goes through write_reply, set with fuse_session_custom_io after the mount);
 *  - marks the open or create reply of a handle Python published with a backing id:
 *    FOPEN_PASSTHROUGH and the id, in place of libfuse's cache flags.
 * Which files, and which backing file, are Python's policy (unionfs/fs/passthrough.py): the
 * kernel wants every open of an inode to be passthrough with the same backing file, or none.
 * The constants are the kernel's (include/uapi/linux/fuse.h), which Debian 12's headers predate.
 */
#define SHIM_INIT_EXT (1u << 30)           /* FUSE_INIT_EXT: flags2 is valid */
#define SHIM_PASSTHROUGH_FLAGS2 (1u << 5)  /* FUSE_PASSTHROUGH (bit 37), in flags2 */
#define SHIM_FOPEN_PASSTHROUGH (1u << 7)
#define SHIM_MAX_STACK_DEPTH 2             /* FILESYSTEM_MAX_STACK_DEPTH */
struct shim_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define SHIM_BACKING_OPEN _IOW(229, 1, struct shim_backing_map)
#define SHIM_BACKING_CLOSE _IOW(229, 2, uint32_t)

static struct fuse_session *session;
static int passthrough_depth;  /* asked for: the max_stack_depth to reply, 0 for none */
static int passthrough_granted;
static uint64_t init_unique;   /* the INIT request's, while its reply is due */
static int init_offers_passthrough;
static __thread int reply_backing_id; /* set while an open or create reply is written */

int ufs_shim_want_passthrough(int max_stack_depth)
{
    if (max_stack_depth < 0 || max_stack_depth > SHIM_MAX_STACK_DEPTH)
        return -EINVAL;
    passthrough_depth = max_stack_depth;
    return 0;
}

int ufs_shim_passthrough(void)
{
    return passthrough_granted;
}

/* Register FD (a layer file) as a backing file: its id (> 0), or -errno (EPERM without
   CAP_SYS_ADMIN in the initial user namespace; ELOOP when its filesystem is stacked too deep). */
int ufs_shim_backing_open(int fd)
{
    if (!passthrough_granted || !session)
        return -EOPNOTSUPP;
    struct shim_backing_map map = {.fd = fd};
    int id = ioctl(session_fd_of(session), SHIM_BACKING_OPEN, &map);
    return id < 0 ? -errno : id;
}

int ufs_shim_backing_close(int backing_id)
{
    uint32_t id = (uint32_t)backing_id;
    return ioctl(session_fd_of(session), SHIM_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}

/* The session's writes: amend the INIT reply and passthrough open replies, as described above.
   Replies are written by the thread that handles requests, one at a time. */
static ssize_t write_reply(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (count == 2 && iov[0].iov_len == sizeof(struct fuse_out_header) &&
        ((const struct fuse_out_header *)iov[0].iov_base)->error == 0) {
        uint64_t unique = ((const struct fuse_out_header *)iov[0].iov_base)->unique;
        if (init_unique && unique == init_unique) {
            init_unique = 0;
            struct fuse_init_out *init = iov[1].iov_base;
            if (init_offers_passthrough && passthrough_depth && iov[1].iov_len >= sizeof(*init)) {
                init->flags |= SHIM_INIT_EXT;
                init->flags2 |= SHIM_PASSTHROUGH_FLAGS2;
                init->unused[0] = (uint32_t)passthrough_depth; /* max_stack_depth, since 7.40 */
                passthrough_granted = 1;
            }
        } else if (reply_backing_id > 0 && iov[1].iov_len >= sizeof(struct fuse_open_out)) {
            /* An open reply is a struct fuse_open_out; a create reply ends with one. */
            struct fuse_open_out *open_out =
                (struct fuse_open_out *)((char *)iov[1].iov_base + iov[1].iov_len - sizeof(*open_out));
            open_out->open_flags = (open_out->open_flags & ~(FOPEN_KEEP_CACHE | FOPEN_DIRECT_IO)) |
                                   SHIM_FOPEN_PASSTHROUGH;
            open_out->padding = (uint32_t)reply_backing_id; /* backing_id, since 7.40 */
        }
    }
    return writev(fd, iov, count);
}

static ssize_t read_request(int fd, void *buf, size_t size, void *userdata)
{
    (void)userdata;
    return read(fd, buf, size);
}

static int (*real_session_mount)(struct fuse_session *, const char *);
static int (*real_custom_io)(struct fuse_session *, const struct fuse_custom_io *, int);

/* Mount as libfuse does, then route the session's reads and writes through the shim (only
   when passthrough is asked for: otherwise libfuse's own I/O is left as it is). */
int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    int rc = real_session_mount(se, mountpoint);
    if (rc == 0 && passthrough_depth && real_custom_io) {
        static const struct fuse_custom_io io = {.writev = write_reply, .read = read_request};
        if (real_custom_io(se, &io, session_fd_of(se)) < 0)
            passthrough_depth = 0;
    }
    return rc;
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *, const struct fuse_file_info *);
static reply_open_fn real_reply_open;
static reply_create_fn real_reply_create;

static int backing_of(const struct fuse_file_info *fi)
{
    const struct open_file *file = passthrough_granted ? file_of(fi) : NULL;
    return file ? file->backing_id : 0;
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    reply_backing_id = backing_of(fi);
    int rc = real_reply_open(req, fi);
    reply_backing_id = 0;
    return rc;
}

int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e, const struct fuse_file_info *fi)
{
    reply_backing_id = backing_of(fi);
    int rc = real_reply_create(req, e, fi);
    reply_backing_id = 0;
    return rc;
}

/* The INIT request: its unique (for its reply) and whether the kernel offers passthrough. */
static void note_init(const struct fuse_in_header *in, size_t arg_size)
{
    const struct fuse_init_in *arg = (const struct fuse_init_in *)(in + 1);
    init_unique = in->unique;
    init_offers_passthrough = arg_size >= sizeof(*arg) && (arg->flags & SHIM_INIT_EXT) &&
                              (arg->flags2 & SHIM_PASSTHROUGH_FLAGS2);
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
    case FUSE_INIT:
        note_init(in, arg_size);
        return 0; /* libfuse answers it */
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        return queue_forgets(in, arg_size); /* nothing for libfuse to do: no reply */
    case FUSE_GETXATTR:
        here = ops.getxattr == shim_getxattr && has_no_xattrs(in->nodeid);
        break;
    case FUSE_GETATTR:
        here = ops.getattr == shim_getattr && read_upper_attr(in->nodeid);
        break;
    case FUSE_LOOKUP:
        here = ops.lookup == shim_lookup && find_absent(in->nodeid, (const char *)(in + 1), arg_size);
        break;
    case FUSE_UNLINK:
        here = ops.unlink == shim_unlink && remove_upper_file(in->nodeid, (const char *)(in + 1), arg_size);
        break;
    case FUSE_SETATTR:
        here = ops.setattr == shim_setattr && arg_size >= sizeof(struct fuse_setattr_in) &&
               change_upper_attr(in->nodeid, (const struct fuse_setattr_in *)(in + 1));
        break;
    case FUSE_OPENDIR:
        here = ops.opendir == shim_opendir;
        break;
    case FUSE_READDIRPLUS:
        here = ops.readdirplus == shim_readdirplus && reply_buf && arg_size >= sizeof(struct fuse_read_in) &&
               closing_read(in->nodeid, ((const struct fuse_read_in *)(in + 1))->offset);
        break;
    case FUSE_OPEN:
        here = ops.open == shim_open && arg_size >= sizeof(struct fuse_open_in) &&
               open_lower_file(in->nodeid, ((const struct fuse_open_in *)(in + 1))->flags);
        break;
    case FUSE_RELEASE:
        here = ops.release == shim_release && arg_size >= sizeof(struct fuse_release_in) &&
               held_here(((const struct fuse_release_in *)(in + 1))->fh);
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
    if (here) {
        real_process_buf(se, buf);
        answer_of = 0; /* used up, or libfuse answered without the handler: never for a later one */
        drop_unanswered_open();
    }
    return here;
}

/* At most this many requests are answered in C in a row, so Python's own tasks (signals,
   finished copies) are not kept waiting by a steady stream of reads; and how long the next one
   is waited for (a program working through a file or a listing sends it within microseconds). */
#define MAX_ANSWERED_IN_A_ROW 64
#define NEXT_REQUEST_WAIT_MS 1

static int (*real_receive_buf)(struct fuse_session *, struct fuse_buf *);

/* Set when ufs_shim_wait_request saw a request waiting: pyfuse3 reads it next, with nothing
   run in between. */
static int request_waiting;

/* How long the next request is looked for without sleeping: a program working through a tree
   sends it within tens of microseconds, and on a VM a CPU that went idle in between takes
   longer than that to wake (20,000 utime() calls here: 1.6-1.8 s with it, 2.8-3.3 s without). */
#define SPIN_NS 100000L

static long ns_since(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000000000L + (now.tv_nsec - start->tv_nsec);
}

/* Is a request waiting on the FUSE fd FD, or does one come in time: within SPIN_NS, looked for
   without sleeping, then NEXT_REQUEST_WAIT_MS? */
static int next_request_comes(int fd)
{
    struct pollfd waiting = {.fd = fd, .events = POLLIN};
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        if (poll(&waiting, 1, 0) > 0)
            return 1;
    } while (ns_since(&start) < SPIN_NS);
    return poll(&waiting, 1, NEXT_REQUEST_WAIT_MS) > 0;
}

int ufs_shim_wait_request(void)
{
    request_waiting = session && next_request_comes(session_fd_of(session));
    return request_waiting;
}

/* Answer the kernel's INIT, queued by the mount itself, at once: every other request waits in
   the kernel until it is answered, and the request loop would first read it only after trio has
   started (some milliseconds later, in a fresh fork). The caller holds the GIL: libfuse calls
   pyfuse3's init handler. Nothing else can come first; libfuse would answer any other request
   before INIT with EIO. Returns 1 if one was answered, 0 if none was waiting (the loop then
   answers it), or -errno. */
int ufs_shim_answer_init(void)
{
    struct pollfd ready = {.fd = session ? session_fd_of(session) : -1, .events = POLLIN};
    if (!session || poll(&ready, 1, 0) <= 0)
        return 0;
    struct fuse_buf buf = {.mem = NULL};
    int res = real_receive_buf(session, &buf);
    if (res > 0) {
        if (!(buf.flags & FUSE_BUF_IS_FD) && buf.size >= sizeof(struct fuse_in_header) &&
            ((const struct fuse_in_header *)buf.mem)->opcode == FUSE_INIT)
            note_init(buf.mem, buf.size - sizeof(struct fuse_in_header));
        real_process_buf(session, &buf);
    }
    free(buf.mem);
    return res > 0 ? 1 : res;
}

/* pyfuse3 waits in its event loop for the FUSE fd, receives one request and processes it: some
   30 us of Python per request, even for one answered here. Instead, a request answered here is
   processed at once, and the next one is awaited here. The first one for Python goes back to
   pyfuse3 as usual; when none comes in time, EINTR sends pyfuse3 back to its own waiting.
   A request is read only when one is waiting: the fd blocks, and a worker that trio woke may
   find its request taken by one that did not wait in trio (unionfs/fs/shim.py); blocking here
   would stop the whole event loop. */
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    struct pollfd ready = {.fd = session_fd_of(se), .events = POLLIN};
    if (!request_waiting && poll(&ready, 1, 0) == 0)
        return -EINTR;
    request_waiting = 0;
    for (int answered = 0;; answered++) {
        int res = real_receive_buf(se, buf);
        if (res <= 0 || !answer_here(se, buf))
            return res;
        if (answered + 1 >= MAX_ANSWERED_IN_A_ROW || !next_request_comes(session_fd_of(se)))
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
    reply_attr = (int (*)(fuse_req_t, const struct stat *, double))dlsym(libfuse, "fuse_reply_attr");
    reply_entry = (int (*)(fuse_req_t, const struct fuse_entry_param *))dlsym(libfuse, "fuse_reply_entry");
    reply_buf = (int (*)(fuse_req_t, const char *, size_t))dlsym(libfuse, "fuse_reply_buf");
    buf_size = (size_t (*)(const struct fuse_bufvec *))dlsym(libfuse, "fuse_buf_size");
    buf_copy = (ssize_t (*)(struct fuse_bufvec *, struct fuse_bufvec *, enum fuse_buf_copy_flags))dlsym(
        libfuse, "fuse_buf_copy");
    real_receive_buf = (int (*)(struct fuse_session *, struct fuse_buf *))dlsym(
        libfuse, "fuse_session_receive_buf");
    real_process_buf = (void (*)(struct fuse_session *, const struct fuse_buf *))dlsym(
        libfuse, "fuse_session_process_buf");
    session_fd_of = (int (*)(struct fuse_session *))dlsym(libfuse, "fuse_session_fd");
    real_session_mount = (int (*)(struct fuse_session *, const char *))dlsym(libfuse, "fuse_session_mount");
    real_custom_io = (int (*)(struct fuse_session *, const struct fuse_custom_io *, int))dlsym(
        libfuse, "fuse_session_custom_io");
    real_reply_open = (reply_open_fn)dlsym(libfuse, "fuse_reply_open");
    real_reply_create = (reply_create_fn)dlsym(libfuse, "fuse_reply_create");
    if (!real_receive_buf || !real_process_buf || !session_fd_of || !real_session_mount || !real_reply_open ||
        !real_reply_create)
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
    if (ops.getattr && reply_attr) {
        python_getattr = ops.getattr;
        ops.getattr = shim_getattr;
    }
    if (ops.lookup && reply_entry) {
        python_lookup = ops.lookup;
        ops.lookup = shim_lookup;
    }
    if (ops.unlink && reply_err) {
        python_unlink = ops.unlink;
        ops.unlink = shim_unlink;
    }
    if (ops.setattr && reply_attr && reply_err) {
        python_setattr = ops.setattr;
        ops.setattr = shim_setattr;
    }
    if (ops.open && ops.release && reply_err) {
        python_open = ops.open;
        ops.open = shim_open;
        python_release = ops.release;
        ops.release = shim_release;
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
    session = real(args, &ops, sizeof(ops), userdata);
    return session;
}
