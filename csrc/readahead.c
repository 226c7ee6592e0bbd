/*
 * readahead.c: merged directories read ahead by a worker thread, for the policy in
 * unionfs/fs/readahead.py. Python queues a directory under a key (its node id) with its path in
 * each layer; the thread lists and resolves it as ufs_list_names() and ufs_resolve_names() do,
 * with no Python and so no GIL, and keeps the entries until Python takes them or newer ones push
 * them out. See unionfs_core.h for the contract.
 */
#define _GNU_SOURCE
#include "unionfs_core.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

struct ra_job {
    uint64_t key;
    char **dir_paths; /* one per layer, NULL where the layer takes no part; owned */
};

struct ra_kept {
    uint64_t key;
    struct ufs_dirent *entries; /* owned */
    size_t count;
};

struct ufs_readahead {
    struct ufs_layer *layers;
    int nlayers;
    size_t max_entries, max_kept_entries, max_queued;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    pthread_t thread;
    int started, stopping;
    uint64_t generation;  /* one more at each ufs_readahead_clear: a read begun before is dropped */
    struct ra_job *queued; /* newest last */
    size_t queued_count;
    int reading;          /* the thread reads reading_key now */
    uint64_t reading_key;
    struct ra_kept *kept; /* oldest first */
    size_t kept_count, kept_entries;
};

static void free_paths(char **paths, int nlayers)
{
    if (!paths)
        return;
    for (int i = 0; i < nlayers; i++)
        free(paths[i]);
    free(paths);
}

struct ufs_readahead *ufs_readahead_new(const struct ufs_layer *layers, int nlayers, size_t max_entries,
                                        size_t max_kept_entries, size_t max_queued)
{
    if (nlayers < 1 || nlayers > UFS_MAX_LAYERS)
        return NULL;
    struct ufs_readahead *ra = calloc(1, sizeof(*ra));
    if (!ra)
        return NULL;
    ra->layers = malloc(nlayers * sizeof(*layers));
    ra->queued = calloc(max_queued ? max_queued : 1, sizeof(*ra->queued));
    ra->kept = calloc(max_kept_entries ? max_kept_entries : 1, sizeof(*ra->kept));
    if (!ra->layers || !ra->queued || !ra->kept) {
        free(ra->layers);
        free(ra->queued);
        free(ra->kept);
        free(ra);
        return NULL;
    }
    memcpy(ra->layers, layers, nlayers * sizeof(*layers));
    ra->nlayers = nlayers;
    ra->max_entries = max_entries;
    ra->max_kept_entries = max_kept_entries;
    ra->max_queued = max_queued;
    pthread_mutex_init(&ra->lock, NULL);
    pthread_cond_init(&ra->changed, NULL);
    return ra;
}

/* List and resolve the directory DIR_PATHS into *OUT (malloc'd) and *COUNT: 0, or -errno (-E2BIG
   when it has more than max_entries). */
static int read_dir(const struct ufs_readahead *ra, const char *const *dir_paths, struct ufs_dirent **out,
                    size_t *count)
{
    struct ufs_names names;
    int rc = ufs_list_names(ra->layers, ra->nlayers, dir_paths, &names);
    if (rc < 0)
        return rc;
    struct ufs_dirent *entries = NULL;
    size_t filled = 0, room = 0;
    uint64_t pos = 0;
    do {
        if (filled == room) {
            size_t bigger = room ? room * 2 : 64;
            struct ufs_dirent *grown = room > ra->max_entries ? NULL : realloc(entries, bigger * sizeof(*entries));
            if (!grown) {
                rc = room > ra->max_entries ? -E2BIG : -ENOMEM;
                break;
            }
            entries = grown;
            room = bigger;
        }
        rc = ufs_resolve_names(ra->layers, ra->nlayers, dir_paths, &names, &pos, entries + filled,
                               (int)(room - filled));
        if (rc > 0)
            filled += (size_t)rc;
    } while (rc > 0);
    ufs_names_free(&names);
    if (rc == 0 && filled > ra->max_entries)
        rc = -E2BIG;
    if (rc < 0) {
        free(entries);
        return rc;
    }
    *out = entries;
    *count = filled;
    return 0;
}

static void drop_kept(struct ufs_readahead *ra, size_t i)
{
    free(ra->kept[i].entries);
    ra->kept_entries -= ra->kept[i].count;
    memmove(&ra->kept[i], &ra->kept[i + 1], (ra->kept_count - i - 1) * sizeof(*ra->kept));
    ra->kept_count--;
}

static void drop_queued(struct ufs_readahead *ra, size_t i)
{
    free_paths(ra->queued[i].dir_paths, ra->nlayers);
    memmove(&ra->queued[i], &ra->queued[i + 1], (ra->queued_count - i - 1) * sizeof(*ra->queued));
    ra->queued_count--;
}

/* Called with the lock held. */
static void keep(struct ufs_readahead *ra, uint64_t key, struct ufs_dirent *entries, size_t count)
{
    if (count > ra->max_kept_entries) {
        free(entries);
        return;
    }
    while (ra->kept_count && (ra->kept_count == ra->max_kept_entries ||
                              ra->kept_entries + count > ra->max_kept_entries))
        drop_kept(ra, 0);
    ra->kept[ra->kept_count++] = (struct ra_kept){.key = key, .entries = entries, .count = count};
    ra->kept_entries += count;
}

static void *run(void *arg)
{
    struct ufs_readahead *ra = arg;
    pthread_mutex_lock(&ra->lock);
    for (;;) {
        while (!ra->queued_count && !ra->stopping)
            pthread_cond_wait(&ra->changed, &ra->lock);
        if (ra->stopping)
            break;
        struct ra_job job = ra->queued[--ra->queued_count]; /* the newest: a walk goes depth first */
        uint64_t generation = ra->generation;
        ra->reading = 1;
        ra->reading_key = job.key;
        pthread_mutex_unlock(&ra->lock);
        struct ufs_dirent *entries = NULL;
        size_t count = 0;
        int rc = read_dir(ra, (const char *const *)job.dir_paths, &entries, &count);
        free_paths(job.dir_paths, ra->nlayers);
        pthread_mutex_lock(&ra->lock);
        ra->reading = 0;
        if (rc == 0 && generation == ra->generation)
            keep(ra, job.key, entries, count);
        else
            free(entries);
        pthread_cond_broadcast(&ra->changed);
    }
    pthread_mutex_unlock(&ra->lock);
    return NULL;
}

int ufs_readahead_queue(struct ufs_readahead *ra, uint64_t key, const char *const *dir_paths)
{
    char **paths = calloc(ra->nlayers, sizeof(char *));
    if (!paths)
        return -ENOMEM;
    for (int i = 0; i < ra->nlayers; i++)
        if (dir_paths[i] && !(paths[i] = strdup(dir_paths[i]))) {
            free_paths(paths, ra->nlayers);
            return -ENOMEM;
        }
    int rc = 0;
    pthread_mutex_lock(&ra->lock);
    if (!ra->started) {
        /* The thread takes no signals: they are the daemon's main thread's. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        rc = -pthread_create(&ra->thread, NULL, run, ra);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        ra->started = rc == 0;
    }
    if (rc == 0 && ra->max_queued) {
        if (ra->queued_count == ra->max_queued)
            drop_queued(ra, 0);
        ra->queued[ra->queued_count++] = (struct ra_job){.key = key, .dir_paths = paths};
        paths = NULL;
        pthread_cond_signal(&ra->changed);
    }
    pthread_mutex_unlock(&ra->lock);
    free_paths(paths, ra->nlayers);
    return rc;
}

int ufs_readahead_take(struct ufs_readahead *ra, uint64_t key, struct ufs_dirent **entries, size_t *count)
{
    int found = 0;
    pthread_mutex_lock(&ra->lock);
    while (ra->reading && ra->reading_key == key) /* half done: waiting costs less than reading again */
        pthread_cond_wait(&ra->changed, &ra->lock);
    for (size_t i = 0; i < ra->kept_count; i++)
        if (ra->kept[i].key == key) {
            *entries = ra->kept[i].entries;
            *count = ra->kept[i].count;
            ra->kept[i].entries = NULL;
            drop_kept(ra, i);
            found = 1;
            break;
        }
    for (size_t i = 0; i < ra->queued_count; i++) /* listed now: no need to read it ahead */
        if (ra->queued[i].key == key) {
            drop_queued(ra, i);
            break;
        }
    pthread_mutex_unlock(&ra->lock);
    return found;
}

void ufs_readahead_free_entries(struct ufs_dirent *entries)
{
    free(entries);
}

void ufs_readahead_clear(struct ufs_readahead *ra)
{
    pthread_mutex_lock(&ra->lock);
    ra->generation++;
    while (ra->kept_count)
        drop_kept(ra, ra->kept_count - 1);
    while (ra->queued_count)
        drop_queued(ra, ra->queued_count - 1);
    pthread_mutex_unlock(&ra->lock);
}

void ufs_readahead_stop(struct ufs_readahead *ra)
{
    pthread_mutex_lock(&ra->lock);
    ra->stopping = 1;
    pthread_cond_broadcast(&ra->changed);
    pthread_mutex_unlock(&ra->lock);
    if (ra->started)
        pthread_join(ra->thread, NULL);
    ufs_readahead_clear(ra);
    pthread_cond_destroy(&ra->changed);
    pthread_mutex_destroy(&ra->lock);
    free(ra->layers);
    free(ra->queued);
    free(ra->kept);
    free(ra);
}
