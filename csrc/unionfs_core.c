/*
 * unionfs_core.c: name resolution and merged directory listings across union layers.
 * See unionfs_core.h for the contract. Semantics follow kernel overlayfs (fs/overlayfs/namei.c and
 * readdir.c), plus the OCI/AUFS ".wh." forms that image layers carry.
 */
#define _GNU_SOURCE
#include "unionfs_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/openat2.h>

#define OCI_PREFIX ".wh."
#define OCI_PREFIX_LEN 4
#define OCI_META_PREFIX ".wh..wh." /* AUFS metadata such as .wh..wh..opq and .wh..wh..plnk */
#define OCI_OPAQUE ".wh..wh..opq"

/* One layer's copy of a directory during a call. */
struct loc {
    int fd;         /* the directory; -1 when the layer does not take part */
    int owned;      /* fd was opened by us and must be closed */
    int xwhiteouts; /* the directory is marked overlay.opaque=x: -1 not yet known, 0, 1 */
};

/* ---- paths ---- */

/* Open PATH below DIRFD without following any symlink and without leaving DIRFD's tree. */
static int open_beneath(int dirfd, const char *path, int flags)
{
    struct open_how how = {
        .flags = (uint64_t)(flags | O_NOFOLLOW | O_CLOEXEC),
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    if (fd < 0 && errno == ENOSYS) /* kernels before 5.6: only the last component is checked */
        fd = openat(dirfd, path, flags | O_NOFOLLOW | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ufs_open_at(int root_fd, const char *path, int flags)
{
    if (strlen(path) < PATH_MAX)
        return open_beneath(root_fd, path, flags);
    /* Too long for one call: open it a piece at a time, each piece ending at a '/'. */
    char piece[PATH_MAX];
    int dirfd = root_fd;
    const char *rest = path;
    while (strlen(rest) >= PATH_MAX) {
        const char *cut = rest + PATH_MAX - 1;
        while (cut > rest && *cut != '/')
            cut--;
        if (cut == rest) {
            if (dirfd != root_fd)
                close(dirfd);
            return -ENAMETOOLONG;
        }
        memcpy(piece, rest, (size_t)(cut - rest));
        piece[cut - rest] = '\0';
        int next = open_beneath(dirfd, piece, O_PATH | O_DIRECTORY);
        if (dirfd != root_fd)
            close(dirfd);
        if (next < 0)
            return next;
        dirfd = next;
        rest = cut + 1;
    }
    int fd = open_beneath(dirfd, rest, flags);
    close(dirfd);
    return fd;
}

/* ---- xattrs of a name in a layer directory ---- */

/* getxattrat() and listxattrat() (Linux 6.13) read the xattrs of a name relative to a directory
   fd; before them, the path-based calls do it through a /proc/self/fd path, at some 4 us more
   per call (procfs resolves the fd's link first). Their numbers are the same on every
   architecture; Debian 12's headers predate them. */
#define XATTRAT_GET 464 /* __NR_getxattrat */
#define XATTRAT_LIST 465 /* __NR_listxattrat */
struct xattrat_args {   /* struct xattr_args */
    uint64_t value;
    uint32_t size;
    uint32_t flags;
};
static int xattrat_missing; /* the kernel lacks them, or a seccomp filter refuses them */

/* A path naming NAME in DIR_FD (NAME "" for the directory) for the path-based xattr calls. */
static int proc_path(char *buf, int dir_fd, const char *name)
{
    int n = snprintf(buf, PATH_MAX, "/proc/self/fd/%d/%s", dir_fd, name);
    return (n < 0 || n >= PATH_MAX) ? -ENAMETOOLONG : 0;
}

/* The result of an xattr call made with getxattrat or listxattrat: N, or -1 with errno. If the
   call failed as a syscall the kernel lacks, or one a seccomp filter refuses (ENOSYS or EPERM;
   reading an xattr is otherwise never EPERM), the same call by path is its result, and the path
   form is used from then on when that one is not refused. */
static ssize_t by_path_if_refused(ssize_t n, int dir_fd, const char *name, const char *xname, void *buf,
                                  size_t size)
{
    if (n >= 0 || (errno != ENOSYS && errno != EPERM))
        return n;
    char path[PATH_MAX];
    if (proc_path(path, dir_fd, name) < 0)
        return -1;
    n = xname ? lgetxattr(path, xname, buf, size) : llistxattr(path, buf, size);
    if (n >= 0 || errno != EPERM)
        xattrat_missing = 1;
    return n;
}

/* llistxattr() of NAME in directory DIR_FD (NAME "" for the directory itself). */
static ssize_t list_xattrs_at(int dir_fd, const char *name, char *list, size_t size)
{
    ssize_t n = -1;
    errno = ENOSYS;
    if (!xattrat_missing)
        n = syscall(XATTRAT_LIST, dir_fd, *name ? name : ".", AT_SYMLINK_NOFOLLOW, list, size);
    return by_path_if_refused(n, dir_fd, name, NULL, list, size);
}

/* lgetxattr() of xattr XNAME of NAME in directory DIR_FD (NAME "" for the directory itself). */
static ssize_t get_xattr_at(int dir_fd, const char *name, const char *xname, void *value, size_t size)
{
    ssize_t n = -1;
    errno = ENOSYS;
    if (!xattrat_missing) {
        struct xattrat_args args = {.value = (uint64_t)(uintptr_t)value, .size = (uint32_t)size};
        n = syscall(XATTRAT_GET, dir_fd, *name ? name : ".", AT_SYMLINK_NOFOLLOW, xname, &args, sizeof(args));
    }
    return by_path_if_refused(n, dir_fd, name, xname, value, size);
}

/* Open layer directory PATH (with FLAGS) for the names to be looked up in it. */
static int loc_init(struct loc *l, int root_fd, const char *path, int flags)
{
    l->xwhiteouts = -1;
    l->owned = 0;
    l->fd = root_fd;
    if (strcmp(path, ".") == 0 && (flags & O_PATH))
        return 0;
    int fd = ufs_open_at(root_fd, path, flags | O_DIRECTORY);
    if (fd < 0)
        return fd;
    l->fd = fd;
    l->owned = 1;
    return 0;
}

static void locs_release(struct loc *locs, int nlayers)
{
    for (int i = 0; i < nlayers; i++)
        if (locs[i].owned)
            close(locs[i].fd);
}

/* ---- per-layer facts ---- */

static int stat_in(const struct loc *l, const char *name, struct stat *st)
{
    return fstatat(l->fd, name, st, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int exists_in(const struct loc *l, const char *name)
{
    struct stat st;
    return stat_in(l, name, &st) == 0;
}

/* The two namespaces of overlay xattrs; a value is looked for in them in this order. */
#define OVERLAY_TRUSTED 0
#define OVERLAY_USER 1
static const char *const overlay_namespaces[] = {"trusted.overlay.", "user.overlay."};
#define OVERLAY_NAMESPACES (sizeof(overlay_namespaces) / sizeof(overlay_namespaces[0]))

/* Value of overlay.KEY on LOC/NAME, in the trusted or the user namespace; -1 when absent. */
static ssize_t overlay_xattr(const struct loc *l, const char *name, const char *key, char *val,
                             size_t size)
{
    char xname[64];
    for (size_t i = 0; i < OVERLAY_NAMESPACES; i++) {
        snprintf(xname, sizeof(xname), "%s%s", overlay_namespaces[i], key);
        ssize_t n = get_xattr_at(l->fd, name, xname, val, size);
        if (n >= 0)
            return n;
    }
    return -1;
}

/* The overlay xattrs an object has, as far as resolution needs them. */
#define HAS_ORIGIN 1   /* overlay.origin, in the upper layer's namespace */
#define HAS_METACOPY 2 /* overlay.metacopy, likewise */
#define HAS_OPAQUE 4   /* overlay.opaque, in either namespace */
#define HAS_REDIRECT 8 /* overlay.redirect, in either namespace */
#define HAS_ANY 15

/* Which overlay xattrs LOC/NAME has, from one llistxattr() instead of a lookup per value (most
   objects have none); UPPER_NS is the upper layer's entry of overlay_namespaces, NULL elsewhere.
   HAS_ANY when the list cannot be read whole, so that each value is then looked up. *NONE (if
   given) is set when the object has no xattrs at all. */
static int overlay_xattrs_of(const struct loc *l, const char *name, const char *upper_ns, uint32_t *none)
{
    char names[1024];
    ssize_t size = list_xattrs_at(l->fd, name, names, sizeof(names));
    if (size < 0)
        return HAS_ANY;
    if (none)
        *none = size == 0;
    int has = 0;
    for (ssize_t at = 0; at < size; at += (ssize_t)strlen(names + at) + 1) {
        for (size_t i = 0; i < OVERLAY_NAMESPACES; i++) {
            size_t len = strlen(overlay_namespaces[i]);
            if (strncmp(names + at, overlay_namespaces[i], len) != 0)
                continue;
            const char *key = names + at + len;
            int in_upper_ns = overlay_namespaces[i] == upper_ns;
            has |= strcmp(key, "opaque") == 0 ? HAS_OPAQUE
                 : strcmp(key, "redirect") == 0 ? HAS_REDIRECT
                 : in_upper_ns && strcmp(key, "origin") == 0 ? HAS_ORIGIN
                 : in_upper_ns && strcmp(key, "metacopy") == 0 ? HAS_METACOPY : 0;
        }
    }
    return has;
}

/* The overlay.origin and overlay.metacopy of an upper object, into OUT, as HAS says it has them. */
static void read_upper_xattrs(const char *ns, const struct loc *l, const char *name, int has,
                              struct ufs_found *out)
{
    char xname[64];
    if (has & HAS_ORIGIN) {
        snprintf(xname, sizeof(xname), "%sorigin", ns);
        ssize_t n = get_xattr_at(l->fd, name, xname, out->origin, sizeof(out->origin));
        out->origin_len = n > 0 ? (uint32_t)n : 0;
    }
    if ((has & HAS_METACOPY) && S_ISREG(out->attr.mode)) {
        snprintf(xname, sizeof(xname), "%smetacopy", ns);
        out->metacopy = get_xattr_at(l->fd, name, xname, NULL, 0) >= 0;
    }
}

static int opaque_value_is(const struct loc *l, const char *name, char want)
{
    char val[8];
    ssize_t n = overlay_xattr(l, name, "opaque", val, sizeof(val));
    return n == 1 && val[0] == want;
}

/* Is the directory LOC/NAME, with the overlay xattrs HAS, opaque, so that lower layers do not
   take part below it? */
static int dir_is_opaque(const struct ufs_layer *layer, const struct loc *l, const char *name, int has)
{
    if ((has & HAS_OPAQUE) && opaque_value_is(l, name, 'y'))
        return 1;
    if (layer->flags & UFS_LAYER_OCI) {
        char marker[UFS_NAME_MAX + sizeof(OCI_OPAQUE) + 2];
        snprintf(marker, sizeof(marker), "%s/%s", name, OCI_OPAQUE);
        return exists_in(l, marker);
    }
    return 0;
}

static int is_whiteout(const struct ufs_layer *layer, struct loc *l, const char *name,
                       const struct stat *st)
{
    if (S_ISCHR(st->st_mode) && st->st_rdev == makedev(0, 0))
        return 1;
    if (!(layer->flags & UFS_LAYER_XWHITEOUT) || !S_ISREG(st->st_mode) || st->st_size != 0)
        return 0;
    if (l->xwhiteouts < 0)
        l->xwhiteouts = opaque_value_is(l, "", 'x');
    if (!l->xwhiteouts)
        return 0;
    char val[8];
    return overlay_xattr(l, name, "whiteout", val, sizeof(val)) >= 0;
}

static void fill_attr(struct ufs_attr *a, const struct stat *st)
{
    a->dev = st->st_dev;
    a->ino = st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->rdev = st->st_rdev;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->blksize = (uint32_t)st->st_blksize;
    a->atime_ns = (int64_t)st->st_atim.tv_sec * 1000000000 + st->st_atim.tv_nsec;
    a->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    a->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
}

/* The override_stat xattr a layer's flags name, or NULL. */
static const char *override_xattr(int layer_flags)
{
    if (layer_flags & UFS_LAYER_OVERRIDE_PRIVILEGED)
        return "security.fuseoverlayfs.override_stat";
    if (layer_flags & UFS_LAYER_OVERRIDE_CONTAINERS)
        return "user.containers.override_stat";
    if (layer_flags & UFS_LAYER_OVERRIDE_USER)
        return "user.fuseoverlayfs.override_stat";
    return NULL;
}

/* Replace the owner and permission bits in A with those the override_stat xattr of NAME in
   directory FD records ("UID:GID:OCTAL-MODE", more fields after those ignored), or of FD's own
   object when NAME is NULL; A stays as it is when the object has none or an unreadable one. */
static void apply_override(int layer_flags, int fd, const char *name, struct ufs_attr *a)
{
    const char *xattr = override_xattr(layer_flags);
    char value[64];
    if (!xattr)
        return;
    ssize_t n;
    if (name) {
        n = get_xattr_at(fd, name, xattr, value, sizeof(value) - 1);
    } else {
        /* FD may be O_PATH, which the xattr calls refuse: its /proc/self/fd link leads to exactly
           its object, a symlink too. */
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        n = getxattr(proc, xattr, value, sizeof(value) - 1);
    }
    if (n <= 0)
        return;
    value[n] = '\0';
    unsigned int uid, gid, mode;
    if (sscanf(value, "%u:%u:%o", &uid, &gid, &mode) != 3)
        return;
    a->uid = uid;
    a->gid = gid;
    a->mode = (a->mode & S_IFMT) | (mode & 07777);
}

int ufs_stat_fd(int fd, int layer_flags, struct ufs_attr *out)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    fill_attr(out, &st);
    apply_override(layer_flags, fd, NULL, out);
    return 0;
}

int ufs_stat_at(int root_fd, const char *path, int layer_flags, struct ufs_attr *out)
{
    int fd = ufs_open_at(root_fd, path, O_PATH);
    if (fd < 0)
        return fd;
    int rc = ufs_stat_fd(fd, layer_flags, out);
    close(fd);
    return rc;
}

/* ---- resolution ---- */

static int has_layer_below(const struct loc *locs, int i, int nlayers)
{
    for (int j = i + 1; j < nlayers; j++)
        if (locs[j].fd >= 0)
            return 1;
    return 0;
}

/* Does an OCI ".wh.NAME" in this layer hide NAME in the layers below? */
static int oci_whiteout_in(const struct ufs_layer *layer, const struct loc *l, const char *name)
{
    char wh[UFS_NAME_MAX + OCI_PREFIX_LEN + 1];
    if (!(layer->flags & UFS_LAYER_OCI) || strlen(name) + OCI_PREFIX_LEN > UFS_NAME_MAX)
        return 0;
    snprintf(wh, sizeof(wh), OCI_PREFIX "%s", name);
    return exists_in(l, wh);
}

/* Resolve NAME from layer FIRST down; the layers above FIRST are known not to hold it. */
static int resolve_from(const struct ufs_layer *layers, int nlayers, struct loc *locs, int first,
                        const char *name, struct ufs_found *out)
{
    int oci_name = strncmp(name, OCI_PREFIX, OCI_PREFIX_LEN) == 0;
    memset(out, 0, sizeof(*out));
    out->layer = -1;
    out->redirect_layer = -1;
    for (int i = first; i < nlayers; i++) {
        struct loc *l = &locs[i];
        if (l->fd < 0)
            continue;
        /* In an OCI layer ".wh." names are whiteout markers, not objects. */
        if (!(oci_name && (layers[i].flags & UFS_LAYER_OCI))) {
            struct stat st;
            int rc = stat_in(l, name, &st);
            if (rc == 0) {
                if (is_whiteout(&layers[i], l, name, &st))
                    break;
                int has = -1; /* the object's overlay xattrs in this layer, read once when needed */
                if (out->layer < 0) {
                    out->layer = i;
                    fill_attr(&out->attr, &st);
                    /* The visible object's xattr names are listed now: ls -l asks for the ACLs
                       of each entry it lists, and most have no xattrs at all. */
                    if (layers[i].flags & (UFS_LAYER_UPPER_TRUSTED | UFS_LAYER_UPPER_USER)) {
                        const char *ns = overlay_namespaces[(layers[i].flags & UFS_LAYER_UPPER_USER)
                                                                ? OVERLAY_USER : OVERLAY_TRUSTED];
                        has = overlay_xattrs_of(l, name, ns, &out->no_xattrs);
                        read_upper_xattrs(ns, l, name, has, out);
                    } else {
                        has = overlay_xattrs_of(l, name, NULL, &out->no_xattrs);
                    }
                    apply_override(layers[i].flags, l->fd, name, &out->attr);
                }
                /* A non-directory ends the search, and also ends a merged directory above it. */
                if (!S_ISDIR(st.st_mode) || !S_ISDIR(out->attr.mode))
                    break;
                out->dir_layers[i / 64] |= UINT64_C(1) << (i % 64);
                if (i == nlayers - 1)
                    break;
                if (has < 0)
                    has = overlay_xattrs_of(l, name, NULL, NULL);
                if (dir_is_opaque(&layers[i], l, name, has))
                    break;
                /* An absolute redirect leads into the lower layers even where the parent
                   directory has no lower copy, so it is looked for in any but the last layer. */
                if ((has & HAS_REDIRECT) && overlay_xattr(l, name, "redirect", NULL, 0) >= 0) {
                    out->redirect_layer = i;
                    break;
                }
                if (!has_layer_below(locs, i, nlayers))
                    break;
            } else if (rc != -ENOENT) {
                return rc;
            }
        }
        if (!has_layer_below(locs, i, nlayers) || oci_whiteout_in(&layers[i], l, name))
            break;
    }
    return out->layer < 0 ? -ENOENT : 0;
}

static int locs_init(struct loc *locs, const struct ufs_layer *layers, int nlayers,
                     const char *const *dir_paths, int flags)
{
    if (nlayers < 1 || nlayers > UFS_MAX_LAYERS)
        return -EINVAL;
    for (int i = 0; i < nlayers; i++)
        locs[i].owned = 0;
    for (int i = 0; i < nlayers; i++) {
        if (!dir_paths[i]) {
            locs[i].fd = -1;
            continue;
        }
        int rc = loc_init(&locs[i], layers[i].root_fd, dir_paths[i], flags);
        if (rc == -ENOENT || rc == -ENOTDIR) {
            locs[i].fd = -1; /* this layer has no such directory: it takes no part */
        } else if (rc < 0) {
            locs_release(locs, i);
            return rc;
        }
    }
    return 0;
}

int ufs_resolve(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                const char *name, struct ufs_found *out)
{
    struct loc locs[UFS_MAX_LAYERS];
    if (strlen(name) > UFS_NAME_MAX)
        return -ENAMETOOLONG;
    if (!*name || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return -EINVAL; /* one component, or a stat could leave the directory */
    int rc = locs_init(locs, layers, nlayers, dir_paths, O_PATH);
    if (rc < 0)
        return rc;
    rc = resolve_from(layers, nlayers, locs, 0, name, out);
    locs_release(locs, nlayers);
    return rc;
}

/* ---- listing ---- */

/* A set of names (open addressing, FNV-1a); it owns copies of its names. */
struct nameset {
    char **slots;
    size_t cap;
    size_t count;
};

static uint64_t hash_name(const char *s)
{
    uint64_t h = UINT64_C(1469598103934665603);
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    return h;
}

static char **nameset_slot(const struct nameset *set, const char *name)
{
    size_t i = hash_name(name) & (set->cap - 1);
    while (set->slots[i] && strcmp(set->slots[i], name) != 0)
        i = (i + 1) & (set->cap - 1);
    return &set->slots[i];
}

static int nameset_grow(struct nameset *set)
{
    struct nameset bigger = {calloc(set->cap * 2, sizeof(char *)), set->cap * 2, set->count};
    if (!bigger.slots)
        return -ENOMEM;
    for (size_t i = 0; i < set->cap; i++)
        if (set->slots[i])
            *nameset_slot(&bigger, set->slots[i]) = set->slots[i];
    free(set->slots);
    *set = bigger;
    return 0;
}

/* Add NAME; returns 1 when it was new, 0 when already there, or -errno. */
static int nameset_add(struct nameset *set, const char *name)
{
    if ((set->count + 1) * 2 > set->cap && nameset_grow(set) < 0)
        return -ENOMEM;
    char **slot = nameset_slot(set, name);
    if (*slot)
        return 0;
    if (!(*slot = strdup(name)))
        return -ENOMEM;
    set->count++;
    return 1;
}

static void nameset_free(struct nameset *set)
{
    for (size_t i = 0; i < set->cap; i++)
        free(set->slots[i]);
    free(set->slots);
}

static int names_push(struct ufs_names *out, uint64_t *cap, int layer, const char *name)
{
    uint16_t layer16 = (uint16_t)layer;
    size_t len = strlen(name) + 1;
    if (out->size + sizeof(layer16) + len > *cap) {
        uint64_t want = *cap ? *cap * 2 : 4096;
        char *grown = realloc(out->buf, want);
        if (!grown)
            return -ENOMEM;
        out->buf = grown;
        *cap = want;
    }
    memcpy(out->buf + out->size, &layer16, sizeof(layer16));
    memcpy(out->buf + out->size + sizeof(layer16), name, len);
    out->size += sizeof(layer16) + len;
    return 0;
}

/* Read layer I of the directory, adding the names it shows first and recording those it hides. */
static int list_layer(const struct ufs_layer *layers, const struct loc *locs, int i,
                      struct nameset *seen, struct ufs_names *out, uint64_t *cap)
{
    int fd = dup(locs[i].fd);
    if (fd < 0)
        return -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return -errno;
    }
    /* ".wh." markers hide names only in the layers below their own. */
    struct nameset hidden = {calloc(16, sizeof(char *)), 16, 0};
    int rc = hidden.slots ? 0 : -ENOMEM;
    int oci = layers[i].flags & UFS_LAYER_OCI;
    struct dirent *d;
    while (rc >= 0 && (errno = 0, d = readdir(dir))) {
        const char *name = d->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (oci && strncmp(name, OCI_PREFIX, OCI_PREFIX_LEN) == 0) {
            if (strncmp(name, OCI_META_PREFIX, strlen(OCI_META_PREFIX)) != 0)
                rc = nameset_add(&hidden, name + OCI_PREFIX_LEN);
            continue;
        }
        rc = nameset_add(seen, name);
        if (rc > 0) /* a whiteout is listed too: its resolution drops it, and what it hides */
            rc = names_push(out, cap, i, name);
    }
    if (rc >= 0 && errno)
        rc = -errno;
    closedir(dir);
    for (size_t k = 0; rc >= 0 && k < hidden.cap; k++)
        if (hidden.slots[k])
            rc = nameset_add(seen, hidden.slots[k]);
    if (hidden.slots)
        nameset_free(&hidden);
    return rc < 0 ? rc : 0;
}

int ufs_list_names(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                   struct ufs_names *out)
{
    struct loc locs[UFS_MAX_LAYERS];
    out->size = 0;
    out->buf = NULL;
    /* getdents needs readable fds, so each taking-part layer's directory is opened O_RDONLY. */
    int rc = locs_init(locs, layers, nlayers, dir_paths, O_RDONLY);
    if (rc < 0)
        return rc;
    struct nameset seen = {calloc(256, sizeof(char *)), 256, 0};
    uint64_t cap = 0;
    if (!seen.slots)
        rc = -ENOMEM;
    for (int i = 0; rc >= 0 && i < nlayers; i++)
        if (locs[i].fd >= 0)
            rc = list_layer(layers, locs, i, &seen, out, &cap);
    if (seen.slots)
        nameset_free(&seen);
    locs_release(locs, nlayers);
    if (rc < 0)
        ufs_names_free(out);
    return rc;
}

void ufs_names_free(struct ufs_names *names)
{
    free(names->buf);
    names->buf = NULL;
    names->size = 0;
}

int ufs_resolve_names(const struct ufs_layer *layers, int nlayers, const char *const *dir_paths,
                      const struct ufs_names *names, uint64_t *pos, struct ufs_dirent *out, int max)
{
    struct loc locs[UFS_MAX_LAYERS];
    if (*pos >= names->size || max < 1)
        return 0;
    int rc = locs_init(locs, layers, nlayers, dir_paths, O_PATH);
    if (rc < 0)
        return rc;
    int filled = 0;
    while (filled < max && *pos < names->size) {
        uint16_t layer;
        memcpy(&layer, names->buf + *pos, sizeof(layer));
        const char *name = names->buf + *pos + sizeof(layer);
        struct ufs_dirent *e = &out[filled];
        rc = layer < nlayers ? resolve_from(layers, nlayers, locs, layer, name, &e->found) : -EINVAL;
        if (rc == 0) {
            snprintf(e->name, sizeof(e->name), "%s", name);
            filled++;
        } else if (rc != -ENOENT) { /* ENOENT: a whiteout, or gone since it was read */
            break;
        }
        *pos += sizeof(layer) + strlen(name) + 1;
    }
    locs_release(locs, nlayers);
    return rc < 0 && rc != -ENOENT ? rc : filled;
}

int ufs_name_to_handle(int dir_fd, const char *name, unsigned char *handle, unsigned int *len, int *type)
{
    union {
        struct file_handle fh;
        unsigned char room[sizeof(struct file_handle) + UFS_HANDLE_MAX];
    } buf;
    int mount_id;
    buf.fh.handle_bytes = UFS_HANDLE_MAX;
    if (name_to_handle_at(dir_fd, name, &buf.fh, &mount_id, 0) < 0) /* 0: a final symlink is not followed */
        return -errno;
    memcpy(handle, buf.fh.f_handle, buf.fh.handle_bytes);
    *len = buf.fh.handle_bytes;
    *type = buf.fh.handle_type;
    return 0;
}

int ufs_stat_handle(int mount_fd, const unsigned char *handle, unsigned int len, int type,
                    struct ufs_attr *out)
{
    union {
        struct file_handle fh;
        unsigned char room[sizeof(struct file_handle) + UFS_HANDLE_MAX];
    } buf;
    struct stat st;
    if (len > UFS_HANDLE_MAX)
        return -EINVAL;
    buf.fh.handle_bytes = len;
    buf.fh.handle_type = type;
    memcpy(buf.fh.f_handle, handle, len);
    int fd = open_by_handle_at(mount_fd, &buf.fh, O_PATH | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fstat(fd, &st) < 0 ? -errno : 0;
    close(fd);
    if (rc == 0)
        fill_attr(out, &st);
    return rc;
}

int ufs_rename(int old_dir_fd, const char *old_name, int new_dir_fd, const char *new_name,
               unsigned int flags)
{
    return renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags) < 0 ? -errno : 0;
}
