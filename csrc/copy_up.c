/*
 * copy_up.c: the data and metadata loops of a copy-up (contract in unionfs_core.h).
 */
#define _GNU_SOURCE
#include "unionfs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define COPY_CHUNK (8 << 20)     /* bytes per copy_file_range(); write-back starts per chunk */
#define FALLBACK_CHUNK (1 << 20) /* bytes per read/write where copy_file_range() cannot go */
#define NS_PER_S 1000000000LL

/* Copy LEN bytes at OFF with read and write (across filesystems that cannot copy_file_range).
   Returns the bytes copied (0 when the source ended) or -errno. */
static ssize_t copy_by_reading(int src, int dst, off_t off, size_t len)
{
    char *buf = malloc(FALLBACK_CHUNK);
    if (!buf)
        return -ENOMEM;
    ssize_t got = pread(src, buf, len < FALLBACK_CHUNK ? len : FALLBACK_CHUNK, off);
    ssize_t rc = got < 0 ? -errno : got;
    for (ssize_t put = 0; rc > 0 && put < got;) {
        ssize_t n = pwrite(dst, buf + put, (size_t)(got - put), off + put);
        if (n > 0)
            put += n;
        else if (n == 0)
            rc = -EIO; /* no progress: do not spin */
        else if (errno != EINTR)
            rc = -errno;
    }
    free(buf);
    return rc;
}

/* Copy the bytes in [START, END). */
static int copy_range(int src, int dst, off_t start, off_t end, unsigned int flags)
{
    for (off_t off = start; off < end;) {
        size_t want = end - off < COPY_CHUNK ? (size_t)(end - off) : COPY_CHUNK;
        loff_t in = off, out = off;
        ssize_t done = copy_file_range(src, &in, dst, &out, want, 0);
        if (done < 0 && errno == EINTR)
            continue;
        if (done < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP))
            done = copy_by_reading(src, dst, off, want);
        else if (done < 0)
            done = -errno;
        if (done < 0)
            return (int)done;
        if (done == 0)
            break; /* the source is shorter than it was */
        off += done;
        /* More to come: start writing this chunk out now, so the final fsync waits less. */
        if ((flags & UFS_COPY_SYNC) && off < end &&
            sync_file_range(dst, off - done, done, SYNC_FILE_RANGE_WRITE) < 0)
            return -errno;
    }
    return 0;
}

/* Copy the extents with data in [0, SIZE), skipping holes. */
static int copy_extents(int src, int dst, off_t size, unsigned int flags)
{
    for (off_t off = 0; off < size;) {
        off_t data = lseek(src, off, SEEK_DATA);
        if (data < 0 && errno == ENXIO)
            return 0; /* only a hole is left */
        if (data < 0 && (errno == EINVAL || errno == EOPNOTSUPP))
            return copy_range(src, dst, off, size, flags); /* no SEEK_DATA here: copy it all */
        if (data < 0)
            return -errno;
        if (data >= size)
            return 0;
        off_t hole = lseek(src, data, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        if (hole > size)
            hole = size;
        int rc = copy_range(src, dst, data, hole, flags);
        if (rc < 0)
            return rc;
        off = hole;
    }
    return 0;
}

int ufs_copy_data(int src_fd, int dst_fd, uint64_t size, unsigned int flags)
{
    if (ioctl(dst_fd, FICLONE, src_fd) < 0) {
        int rc = copy_extents(src_fd, dst_fd, (off_t)size, flags);
        if (rc < 0)
            return rc;
    }
    if (ftruncate(dst_fd, (off_t)size) < 0)
        return -errno;
    if ((flags & UFS_COPY_SYNC) && fsync(dst_fd) < 0)
        return -errno;
    return 0;
}

static struct timespec to_timespec(int64_t ns)
{
    int64_t sec = ns / NS_PER_S, rest = ns % NS_PER_S;
    if (rest < 0) { /* before 1970: tv_nsec must still be 0..999999999 */
        sec -= 1;
        rest += NS_PER_S;
    }
    return (struct timespec){.tv_sec = sec, .tv_nsec = rest};
}

static int set_owner_mode_times(int fd, const struct ufs_copy_meta *meta)
{
    struct timespec times[2] = {to_timespec(meta->atime_ns), to_timespec(meta->mtime_ns)};
    if (fchown(fd, meta->uid, meta->gid) < 0 || fchmod(fd, meta->mode & 07777) < 0 ||
        futimens(fd, times) < 0)
        return -errno;
    return 0;
}

int ufs_copy_file(int src_dir_fd, const char *src_name, int dst_fd, const struct ufs_copy_meta *meta,
                  unsigned int flags)
{
    if ((flags & UFS_COPY_DATA) && meta->size) {
        int src = openat(src_dir_fd, src_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (src < 0)
            return -errno;
        int rc = ufs_copy_data(src, dst_fd, meta->size, flags);
        close(src);
        if (rc < 0)
            return rc;
    }
    return set_owner_mode_times(dst_fd, meta);
}
