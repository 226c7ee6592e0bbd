/*
 * unionfs_core.h: the contract between pyunionfs's Python policy and its C loops.
 *
 * The C core knows layers only as open directory file descriptors and paths relative to them.
 * It never builds an absolute host path and never follows a symlink in the last component, so a
 * symlink inside a layer cannot lead out of it. It holds no state between calls and no Python
 * objects: Python decides which layers a directory spans, how inode numbers are composed and what
 * to cache; C does the per-layer system calls.
 *
 * Every function returns 0 on success or a negative errno value.
 */
#ifndef UNIONFS_CORE_H
#define UNIONFS_CORE_H

#include <stddef.h>
#include <stdint.h>

#define UFS_MAX_LAYERS 512 /* layers in one union, upper included (the kernel takes 500 lowers) */
#define UFS_MASK_WORDS 8   /* 64-bit words in a layer mask: UFS_MAX_LAYERS / 64 */
#define UFS_NAME_MAX 255
#define UFS_HANDLE_MAX 128 /* the largest file handle */
#define UFS_ORIGIN_MAX 149  /* an overlay.origin: struct ovl_fb's 21-byte header + UFS_HANDLE_MAX */

/* Layer flags. */
#define UFS_LAYER_OCI 1       /* honour OCI/AUFS ".wh.NAME" whiteouts and ".wh..wh..opq" */
#define UFS_LAYER_XWHITEOUT 2 /* honour xwhiteouts: empty files with overlay.whiteout in an
                                 overlay.opaque=x directory (lower layers only, like the kernel) */
/* The upper layer, whose own overlay xattrs are in trusted.overlay.* (or, with the second flag,
   user.overlay.*): objects found in it report their overlay.origin and overlay.metacopy. */
#define UFS_LAYER_UPPER_TRUSTED 4
#define UFS_LAYER_UPPER_USER 8
/* fuse-overlayfs's override_stat: the owner and permission bits shown for an object in the layer
   are those of its "UID:GID:OCTAL-MODE" xattr, when it has one. At most one of these, naming the
   xattr: security.fuseoverlayfs.override_stat, user.containers.override_stat,
   user.fuseoverlayfs.override_stat. */
#define UFS_LAYER_OVERRIDE_PRIVILEGED 16
#define UFS_LAYER_OVERRIDE_CONTAINERS 32
#define UFS_LAYER_OVERRIDE_USER 64

struct ufs_layer {
    int root_fd; /* directory fd of the layer root (O_PATH is enough) */
    int flags;   /* UFS_LAYER_* */
};

/* lstat() of the object as found in one layer, in fixed-width fields. */
struct ufs_attr {
    uint64_t dev;
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    uint64_t rdev;
    uint32_t mode;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint32_t blksize;
    int64_t atime_ns;
    int64_t mtime_ns;
    int64_t ctime_ns;
};

/* A name resolved across the layers of its parent directory. */
struct ufs_found {
    int layer;            /* the layer holding the visible object */
    struct ufs_attr attr; /* that object's attributes */
    /* For a directory: bit i is set when layer i takes part in the merged directory. The
       merge stops at an opaque directory, a whiteout, a non-directory or a ".wh." whiteout. */
    uint64_t dir_layers[UFS_MASK_WORDS];
    /* -1, or the layer whose copy of the directory carries overlay.redirect: the merge stopped
       there, and the caller goes on in the layers below at the path the redirect names. */
    int redirect_layer;
    /* For an object found in a layer flagged UFS_LAYER_UPPER_*: its overlay.origin value
       (origin_len bytes, 0 when it has none or a longer one) and, for a regular file, whether
       it carries overlay.metacopy. */
    uint32_t origin_len;
    uint32_t metacopy;
    unsigned char origin[UFS_ORIGIN_MAX];
    /* 1 when the visible object has no extended attributes at all (its layer lists none), 0
       when it has some or they could not be listed. */
    uint32_t no_xattrs;
};

/*
 * A directory of the union, as a path per layer. dir_paths[i] is the directory's path relative
 * to layer i's root ("." for the root), or NULL when layer i does not take part in it.
 */

/*
 * Resolve NAME (one path component: not empty, ".", ".." or with a '/', else -EINVAL) in the union
 * directory given by DIR_PATHS: stat it in each taking-part layer from the top, stop at the first
 * hit, skip whiteouts and merge directories.
 * Returns 0 and fills OUT, -ENOENT when the name is absent or whited out, or another -errno.
 */
int ufs_resolve(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                const char *name, struct ufs_found *out);

/*
 * A merged directory is listed in two steps, so that a huge directory never has all its entries
 * resolved at once: ufs_list_names() reads the layers into a small packed list of the visible
 * names, then ufs_resolve_names() resolves them a batch at a time.
 */

/* The candidate names of a merged directory, in listing order, packed one after the other: for
   each, the layer it was first found in (a uint16_t, native order) and the name with its NUL. */
struct ufs_names {
    uint64_t size; /* bytes used in buf */
    char *buf;     /* owned: release with ufs_names_free() */
};

/*
 * Read each taking-part layer of the union directory given by DIR_PATHS from the top, keep the
 * first occurrence of each name and drop the names that ".wh." markers hide. "." and ".." are not
 * listed. Names come in layer order, then in the order the layer's directory returns them.
 */
int ufs_list_names(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                   struct ufs_names *out);

void ufs_names_free(struct ufs_names *names);

/* One visible entry of a merged directory listing. */
struct ufs_dirent {
    char name[UFS_NAME_MAX + 1];
    struct ufs_found found;
};

/*
 * Resolve NAMES (of the same DIR_PATHS) as ufs_resolve() would, from byte offset *POS: fill OUT
 * with up to MAX visible entries, skipping whiteouts and names gone since they were read, and
 * advance *POS. Returns the number of entries filled, 0 at the end, or -errno.
 */
int ufs_resolve_names(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                      const struct ufs_names *names, uint64_t *pos, struct ufs_dirent *out, int max);

/*
 * Read-ahead (csrc/readahead.c): a worker thread lists and resolves queued directories, as
 * ufs_list_names() and ufs_resolve_names() would, and keeps their entries for
 * ufs_readahead_take(). It holds state, unlike the rest of the core, and its functions may be
 * called from any thread.
 */
typedef struct ufs_readahead ufs_readahead;

/* A reader of LAYERS (copied; their fds must stay open until ufs_readahead_stop()) that keeps no
   directory of more than MAX_ENTRIES entries, MAX_KEPT_ENTRIES entries in all (the oldest go
   first) and MAX_QUEUED directories queued (the oldest go first). NULL when out of memory, or
   when NLAYERS is not 1 to UFS_MAX_LAYERS. */
ufs_readahead *ufs_readahead_new(const struct ufs_layer *layers, int nlayers, size_t max_entries,
                                 size_t max_kept_entries, size_t max_queued);

/* Queue the directory given by DIR_PATHS (copied) under KEY; the newest queued is read first. The
   thread starts with the first. */
int ufs_readahead_queue(ufs_readahead *ra, uint64_t key, const char *const *dir_paths);

/* What was read of KEY: 1, with *ENTRIES (release with ufs_readahead_free_entries()) and *COUNT;
   0 if nothing is kept for it (and it is no longer queued). Waits while KEY is being read. */
int ufs_readahead_take(ufs_readahead *ra, uint64_t key, struct ufs_dirent **entries, size_t *count);

void ufs_readahead_free_entries(struct ufs_dirent *entries);

/* Drop all that is kept or queued, and what is being read when it is done. */
void ufs_readahead_clear(ufs_readahead *ra);

/* Stop the thread, wait for it, and release RA. */
void ufs_readahead_stop(ufs_readahead *ra);

/* lstat() PATH below ROOT_FD into OUT, with the owner and mode of its override_stat xattr when
   LAYER_FLAGS has a UFS_LAYER_OVERRIDE_* flag (0: as it is). */
int ufs_stat_at(int root_fd, const char *path, int layer_flags, struct ufs_attr *out);

/* The same for the object FD refers to (an open file, which may have no name any more). */
int ufs_stat_fd(int fd, int layer_flags, struct ufs_attr *out);

/*
 * Open PATH (relative to ROOT_FD) with FLAGS | O_NOFOLLOW | O_CLOEXEC, walking it a piece at a
 * time when it is longer than PATH_MAX. Returns the new fd or -errno.
 */
int ufs_open_at(int root_fd, const char *path, int flags);

/* File handles, for the kernel's overlay.origin format. */

/* The file handle of NAME in DIR_FD (not following a final symlink): its bytes into HANDLE (room
   for UFS_HANDLE_MAX), their count into *LEN and the handle type into *TYPE. */
int ufs_name_to_handle(int dir_fd, const char *name, unsigned char *handle, unsigned int *len, int *type);

/* lstat() of the object that HANDLE names on the filesystem of MOUNT_FD (needs
   CAP_DAC_READ_SEARCH). */
int ufs_stat_handle(int mount_fd, const unsigned char *handle, unsigned int len, int type,
                    struct ufs_attr *out);

/* renameat2(2), which glibc 2.36 has but Python does not: FLAGS are RENAME_NOREPLACE (1),
   RENAME_EXCHANGE (2) and RENAME_WHITEOUT (4). */
int ufs_rename(int old_dir_fd, const char *old_name, int new_dir_fd, const char *new_name,
               unsigned int flags);

/* Copy-up (csrc/copy_up.c). Python decides what is copied and where; these do the byte loops. */

#define UFS_COPY_DATA 1 /* copy the data, not only the size */
#define UFS_COPY_SYNC 2 /* fsync the copy before returning, so that a rename can publish it */

/* What a copy takes from the object it copies, besides data and xattrs. */
struct ufs_copy_meta {
    uint32_t uid;
    uint32_t gid;
    uint32_t mode; /* permission bits */
    uint64_t size;
    int64_t atime_ns;
    int64_t mtime_ns;
};

/*
 * Copy SIZE bytes from SRC_FD to DST_FD: a reflink where the filesystem can, else extent by
 * extent, so holes stay holes; DST_FD ends SIZE bytes long. With UFS_COPY_SYNC the data is on
 * disk when this returns (write-back of each chunk starts while the next one is copied).
 */
int ufs_copy_data(int src_fd, int dst_fd, uint64_t size, unsigned int flags);

/*
 * Fill DST_FD, an empty regular file open for writing (Python makes it in the work directory),
 * as a copy of regular file SRC_NAME in SRC_DIR_FD: its data when FLAGS has UFS_COPY_DATA (else
 * it stays empty), then the owner, mode and times of META, in that order (a chown clears set-id
 * bits). With UFS_COPY_SYNC its data is on disk when this returns (owner, mode and times are set
 * after that fsync, as the kernel's copy-up sets them after its own).
 */
int ufs_copy_file(int src_dir_fd, const char *src_name, int dst_fd, const struct ufs_copy_meta *meta,
                  unsigned int flags);

#endif
