#include "procscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const NS_NAMES[] = {"user", "mnt", "uts", "ipc", "pid", "net", "cgroup"};
#define N_NS (sizeof NS_NAMES / sizeof NS_NAMES[0])

static int is_number(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* calls fn(pid, tid, arg) for every task; fn returns 1 when the task matched.  Returns
 * the number of processes with a matching task (and adds matching tasks to *tasks), or
 * -errno when /proc cannot be listed. */
typedef int (*task_fn)(int taskfd, const char *tid, void *arg);

static int for_each_task(task_fn fn, void *arg, int *tasks)
{
    DIR *proc = opendir("/proc");
    if (!proc)
        return -errno;
    int procs = 0;
    struct dirent *de;
    char path[300];
    while ((de = readdir(proc)) != NULL) {
        if (!is_number(de->d_name))
            continue;
        snprintf(path, sizeof path, "/proc/%s/task", de->d_name);
        DIR *task = opendir(path);
        if (!task)
            continue; /* exited */
        int hit = 0;
        struct dirent *te;
        while ((te = readdir(task)) != NULL) {
            if (!is_number(te->d_name))
                continue;
            if (fn(dirfd(task), te->d_name, arg)) {
                hit = 1;
                if (tasks)
                    (*tasks)++;
            }
        }
        closedir(task);
        procs += hit;
    }
    closedir(proc);
    return procs;
}

struct ns_arg {
    const uint64_t *inodes;
    size_t n;
    unsigned mask;
};

/* Paths are resolved from the open /proc/PID/task directory (and the thread's ns
 * directory is opened once for its seven links): a full /proc/PID/task/TID/ns/NAME walk
 * per link cost ~3 us each, most of a host-wide scan. */
static int task_in_ns(int taskfd, const char *tid, void *p)
{
    struct ns_arg *a = p;
    char path[300], link[64];
    snprintf(path, sizeof path, "%s/ns", tid);
    int nsfd = openat(taskfd, path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (nsfd < 0)
        return 0; /* exited */
    int hit = 0;
    for (size_t i = 0; i < N_NS && !hit; i++) {
        if (!(a->mask & (1u << i)))
            continue;
        ssize_t len = readlinkat(nsfd, NS_NAMES[i], link, sizeof link - 1); /* "<name>:[<inode>]" */
        if (len <= 0)
            continue;
        link[len] = 0;
        const char *lb = strchr(link, '[');
        if (!lb)
            continue;
        uint64_t ino = strtoull(lb + 1, NULL, 10);
        for (size_t j = 0; j < a->n; j++)
            if (a->inodes[j] == ino)
                hit = 1;
    }
    close(nsfd);
    return hit;
}

int nrx_scan_ns(const uint64_t *inodes, size_t ninodes, unsigned name_mask, int *procs,
                int *threads)
{
    struct ns_arg a = {inodes, ninodes, name_mask};
    *threads = 0;
    *procs = 0;
    if (ninodes == 0)
        return 0;
    int r = for_each_task(task_in_ns, &a, threads);
    if (r < 0)
        return r;
    *procs = r;
    return 0;
}

struct ids_arg {
    const uint64_t *u, *g;
    size_t nu, ng;
};

/* the 4 ids after `key` ("\nUid:" or "\nGid:"); 1 when one is in a range */
static int ids_in(const char *buf, const char *key, const uint64_t *r, size_t n)
{
    const char *p = strstr(buf, key);
    if (!p)
        return 0;
    p += strlen(key);
    for (int k = 0; k < 4; k++) {
        char *end;
        unsigned long long id = strtoull(p, &end, 10);
        if (end == p)
            break;
        for (size_t j = 0; j + 1 < n; j += 2)
            if (r[j] <= id && id < r[j + 1])
                return 1;
        p = end;
    }
    return 0;
}

static int task_has_ids(int taskfd, const char *tid, void *p)
{
    struct ids_arg *a = p;
    char path[300], buf[8192];
    snprintf(path, sizeof path, "%s/status", tid);
    int fd = openat(taskfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    size_t got = 0;
    ssize_t r;
    while (got < sizeof buf - 1 && (r = read(fd, buf + got, sizeof buf - 1 - got)) > 0)
        got += (size_t)r;
    close(fd);
    buf[got] = 0;
    return ids_in(buf, "\nUid:", a->u, a->nu) || ids_in(buf, "\nGid:", a->g, a->ng);
}

int nrx_scan_ids(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                 size_t ngid)
{
    struct ids_arg a = {uid_ranges, gid_ranges, nuid, ngid};
    return for_each_task(task_has_ids, &a, NULL);
}

struct both_arg {
    struct ids_arg ids;
    struct ns_arg ns;
    int ids_procs, ns_procs, ns_threads;
    int ids_hit, ns_hit; /* per process being walked */
};

static int task_both(int taskfd, const char *tid, void *p)
{
    struct both_arg *a = p;
    if (task_has_ids(taskfd, tid, &a->ids))
        a->ids_hit = 1;
    if (a->ns.n && task_in_ns(taskfd, tid, &a->ns)) {
        a->ns_hit = 1;
        a->ns_threads++;
    }
    return 0;
}

static int end_process(void *p)
{
    struct both_arg *a = p;
    a->ids_procs += a->ids_hit;
    a->ns_procs += a->ns_hit;
    a->ids_hit = a->ns_hit = 0;
    return 0;
}

int nrx_scan_ids_ns(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                    size_t ngid, const uint64_t *inodes, size_t ninodes, unsigned name_mask,
                    int *ids_procs, int *ns_procs, int *ns_threads)
{
    struct both_arg a;
    memset(&a, 0, sizeof a);
    a.ids = (struct ids_arg){uid_ranges, gid_ranges, nuid, ngid};
    a.ns = (struct ns_arg){inodes, ninodes, name_mask};
    DIR *proc = opendir("/proc");
    if (!proc)
        return -errno;
    struct dirent *de;
    char path[300];
    while ((de = readdir(proc)) != NULL) {
        if (!is_number(de->d_name))
            continue;
        snprintf(path, sizeof path, "/proc/%s/task", de->d_name);
        DIR *task = opendir(path);
        if (!task)
            continue;
        struct dirent *te;
        while ((te = readdir(task)) != NULL)
            if (is_number(te->d_name))
                task_both(dirfd(task), te->d_name, &a);
        closedir(task);
        end_process(&a);
    }
    closedir(proc);
    *ids_procs = a.ids_procs;
    *ns_procs = a.ns_procs;
    *ns_threads = a.ns_threads;
    return 0;
}
