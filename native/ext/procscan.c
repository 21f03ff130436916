#include "procscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const NS_NAMES[] = {"user", "mnt", "uts", "ipc", "pid", "net", "cgroup"};
#define N_NS (sizeof NS_NAMES / sizeof NS_NAMES[0])

/* The errors that mean "this task exited while we looked": its /proc directory (or a file
 * in it) is gone.  Every other error (EIO, EACCES, ENOMEM, EISDIR, ...) is a failure of the
 * scan, reported as -errno: a scan that could not look must not answer "nothing found". */
static int gone(int e)
{
    return e == ENOENT || e == ESRCH;
}

/* 1 when the task lives in the PID namespace of the /proc being read and in no namespace
 * below it (its status has one NSpid entry), 0 when it is in a nested PID namespace, or
 * -errno.  Used when a task's ns links are refused (EACCES: e.g. this VM's PID 1 is not
 * readable even with CAP_SYS_PTRACE): every sandbox process is in the sandbox's own PID
 * namespace, a child of the agent's, so a task with one NSpid entry is no sandbox process;
 * it could have joined a sandbox's other namespaces only by setns with CAP_SYS_ADMIN over
 * the sandbox's user namespace (host root).  docs/security.md lists this limit. */
static int in_top_pidns(int taskfd, const char *tid)
{
    char path[300], buf[8192];
    snprintf(path, sizeof path, "%s/status", tid);
    int fd = openat(taskfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n < 0)
        return -e;
    buf[n] = 0;
    const char *p = strstr(buf, "\nNSpid:");
    const char *end = p ? strchr(p + 1, '\n') : NULL;
    if (!p || !end)
        return -EIO;
    int fields = 0;
    for (const char *q = p + 7; q < end; q++)
        if ((*q >= '0' && *q <= '9') && (q[-1] == ' ' || q[-1] == '\t'))
            fields++;
    return fields == 1;
}

/* a refused ns link (EACCES/EPERM): not a hit when the task is provably outside every
 * sandbox (in_top_pidns), else the scan fails with the original error */
static int refused(int taskfd, const char *tid, int e)
{
    int top = in_top_pidns(taskfd, tid);
    if (top < 0)
        return gone(-top) ? 0 : top;
    return top ? 0 : -e;
}

static int is_number(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* the next numeric entry (a process) of an open /proc, NULL at the end or on an error
 * (then *err = -errno) */
static struct dirent *next_pid(DIR *proc, int *err)
{
    struct dirent *de;
    for (;;) {
        errno = 0;
        if ((de = readdir(proc)) == NULL) {
            *err = errno ? -errno : 0;
            return NULL;
        }
        if (is_number(de->d_name))
            return de;
    }
}

/* calls fn(taskfd, tid, arg) for every task, `tid` being the task's path relative to
 * `taskfd` (its number, or "PID/task/TID" from /proc itself; it starts with the tid
 * either way); fn returns 1 when the task matched, 0 when
 * not (or the task is gone), -errno when it could not be read.  Returns the number of
 * processes with a matching task (and adds matching tasks to *tasks), or -errno when
 * /proc or a task could not be read. */
typedef int (*task_fn)(int taskfd, const char *tid, void *arg);

static int for_each_task_at(const char *root, task_fn fn, void *arg, int *tasks)
{
    DIR *proc = opendir(root);
    if (!proc)
        return -errno;
    int procs = 0, err = 0;
    struct dirent *de;
    char path[4200];
    while ((de = next_pid(proc, &err)) != NULL) {
        /* /proc/PID/task's link count is 2 + the process's threads (zombie leader
         * included: it is released last).  One thread is then the leader itself, whose
         * path is known: no directory to open and list (most processes, on any host) */
        struct stat st;
        snprintf(path, sizeof path, "%s/task", de->d_name);
        if (fstatat(dirfd(proc), path, &st, 0) < 0) {
            if (gone(errno))
                continue;
            err = -errno;
            break;
        }
        if (st.st_nlink == 3) {
            snprintf(path, sizeof path, "%s/task/%s", de->d_name, de->d_name);
            int r = fn(dirfd(proc), path, arg);
            if (r < 0) {
                err = r;
                break;
            }
            if (r && tasks)
                (*tasks)++;
            procs += r > 0;
            continue;
        }
        snprintf(path, sizeof path, "%s/%s/task", root, de->d_name);
        DIR *task = opendir(path);
        if (!task) {
            if (gone(errno))
                continue; /* exited */
            err = -errno;
            break;
        }
        int hit = 0;
        struct dirent *te;
        for (;;) {
            errno = 0;
            if ((te = readdir(task)) == NULL) {
                if (errno && !gone(errno))
                    err = -errno;
                break;
            }
            if (!is_number(te->d_name))
                continue;
            int r = fn(dirfd(task), te->d_name, arg);
            if (r < 0) {
                err = r;
                break;
            }
            if (r) {
                hit = 1;
                if (tasks)
                    (*tasks)++;
            }
        }
        closedir(task);
        if (err)
            break;
        procs += hit;
    }
    closedir(proc);
    return err ? err : procs;
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
    if (a->mask && !(a->mask & (a->mask - 1))) {
        /* one namespace asked for (step 6: the one the kernel still keeps): one readlinkat
         * from the task directory instead of opening the thread's ns directory */
        size_t i = 0;
        while (!(a->mask & (1u << i)))
            i++;
        snprintf(path, sizeof path, "%s/ns/%s", tid, NS_NAMES[i]);
        ssize_t len = readlinkat(taskfd, path, link, sizeof link - 1);
        if (len < 0) {
            int e = errno;
            if (e == EACCES || e == EPERM)
                return refused(taskfd, tid, e);
            return gone(e) ? 0 : -e;
        }
        link[len] = 0;
        const char *lb = strchr(link, '[');
        if (!lb)
            return -EIO;
        uint64_t ino = strtoull(lb + 1, NULL, 10);
        for (size_t j = 0; j < a->n; j++)
            if (a->inodes[j] == ino)
                return 1;
        return 0;
    }
    snprintf(path, sizeof path, "%s/ns", tid);
    int nsfd = openat(taskfd, path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (nsfd < 0) {
        int e = errno;
        if (e == EACCES || e == EPERM)
            return refused(taskfd, tid, e);
        return gone(e) ? 0 : -e;
    }
    int hit = 0;
    for (size_t i = 0; i < N_NS && !hit; i++) {
        if (!(a->mask & (1u << i)))
            continue;
        ssize_t len = readlinkat(nsfd, NS_NAMES[i], link, sizeof link - 1); /* "<name>:[<inode>]" */
        if (len < 0 && gone(errno))
            break; /* exited */
        if (len < 0 && (errno == EACCES || errno == EPERM)) {
            int e = errno;
            close(nsfd);
            return refused(taskfd, tid, e);
        }
        if (len <= 0) {
            int e = len < 0 ? errno : EIO;
            close(nsfd);
            return -e;
        }
        link[len] = 0;
        const char *lb = strchr(link, '[');
        if (!lb) {
            close(nsfd);
            return -EIO; /* not a namespace link: nothing can be concluded */
        }
        uint64_t ino = strtoull(lb + 1, NULL, 10);
        for (size_t j = 0; j < a->n; j++)
            if (a->inodes[j] == ino)
                hit = 1;
    }
    close(nsfd);
    return hit;
}

/* The user namespace is one per process: the kernel refuses setns(2) and unshare(2) of a
 * user namespace to a process with more than one thread (EINVAL), a thread cannot be
 * cloned into another one (CLONE_NEWUSER | CLONE_THREAD: EINVAL), and nothing else
 * changes a task's cred->user_ns.  So the leader's ns/user link answers for every thread
 * (even a zombie leader's: it keeps its credentials until reaped), and no task directory
 * is listed.  *threads counts the processes found (their threads are not listed). */
static int scan_userns_at(const char *root, struct ns_arg *a, int *procs, int *threads)
{
    DIR *proc = opendir(root);
    if (!proc)
        return -errno;
    int err = 0;
    struct dirent *de;
    char path[300];
    while ((de = next_pid(proc, &err)) != NULL) {
        snprintf(path, sizeof path, "%s", de->d_name);
        int r = task_in_ns(dirfd(proc), path, a); /* "PID/ns/user" from /proc */
        if (r < 0) {
            err = r;
            break;
        }
        *procs += r;
    }
    closedir(proc);
    *threads = *procs;
    return err;
}

int nrx_scan_ns_at(const char *root, const uint64_t *inodes, size_t ninodes,
                   unsigned name_mask, int *procs, int *threads)
{
    struct ns_arg a = {inodes, ninodes, name_mask};
    *threads = 0;
    *procs = 0;
    if (ninodes == 0)
        return 0;
    if (name_mask == 1u) /* the user namespace alone: one link per process */
        return scan_userns_at(root, &a, procs, threads);
    int r = for_each_task_at(root, task_in_ns, &a, threads);
    if (r < 0)
        return r;
    *procs = r;
    return 0;
}

int nrx_scan_ns(const uint64_t *inodes, size_t ninodes, unsigned name_mask, int *procs,
                int *threads)
{
    return nrx_scan_ns_at("/proc", inodes, ninodes, name_mask, procs, threads);
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
        return gone(errno) ? 0 : -errno;
    size_t got = 0;
    ssize_t r = 0;
    while (got < sizeof buf - 1 && (r = read(fd, buf + got, sizeof buf - 1 - got)) > 0)
        got += (size_t)r;
    int e = errno;
    close(fd);
    if (r < 0)
        return gone(e) ? 0 : -e;
    buf[got] = 0;
    if (!strstr(buf, "\nUid:") || !strstr(buf, "\nGid:"))
        return got == 0 ? 0 : -EIO; /* empty: the task went away; garbled: cannot tell */
    return ids_in(buf, "\nUid:", a->u, a->nu) || ids_in(buf, "\nGid:", a->g, a->ng);
}

int nrx_scan_ids_at(const char *root, const uint64_t *uid_ranges, size_t nuid,
                    const uint64_t *gid_ranges, size_t ngid)
{
    struct ids_arg a = {uid_ranges, gid_ranges, nuid, ngid};
    return for_each_task_at(root, task_has_ids, &a, NULL);
}

int nrx_scan_ids(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                 size_t ngid)
{
    return nrx_scan_ids_at("/proc", uid_ranges, nuid, gid_ranges, ngid);
}

/* ---- mounts of a superblock in every mount namespace (step 6) ------------------------ */

/* the whole of an open file into *buf (grown as needed); bytes read or -errno */
static ssize_t read_all(int fd, char **buf, size_t *cap)
{
    size_t got = 0;
    for (;;) {
        if (got + 4096 > *cap) {
            size_t ncap = *cap ? *cap * 2 : 65536;
            char *nb = realloc(*buf, ncap);
            if (!nb)
                return -ENOMEM;
            *buf = nb;
            *cap = ncap;
        }
        ssize_t r = read(fd, *buf + got, *cap - got - 1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    (*buf)[got] = 0;
    return (ssize_t)got;
}

/* 1 when `root` (a mountinfo root field) is "<ns name>:[<inode>]" of a pinned inode */
static int pinned_root(const char *root, size_t len, const uint64_t *pinned, size_t npinned)
{
    const char *lb = memchr(root, '[', len);
    if (!lb || lb == root || lb[-1] != ':' || root[len - 1] != ']')
        return 0;
    size_t nlen = (size_t)(lb - 1 - root);
    int named = 0;
    for (size_t i = 0; i < N_NS; i++)
        if (strlen(NS_NAMES[i]) == nlen && memcmp(NS_NAMES[i], root, nlen) == 0)
            named = 1;
    if (!named)
        return 0;
    uint64_t ino = strtoull(lb + 1, NULL, 10);
    for (size_t j = 0; j < npinned; j++)
        if (pinned[j] == ino)
            return 1;
    return 0;
}

/* the mountinfo lines whose superblock (field 3) is `dev`, or that are nsfs mounts of a
 * pinned namespace (as residue._count_mounts) */
static int count_mount_lines(char *text, const char *dev, const uint64_t *pinned,
                             size_t npinned)
{
    int count = 0;
    size_t devlen = dev ? strlen(dev) : 0;
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        char *sep = strstr(line, " - ");
        const char *f[5];
        size_t fl[5];
        int n = 0;
        char *p = line;
        while (sep && n < 5 && p < sep) {
            while (p < sep && *p == ' ')
                p++;
            if (p >= sep)
                break;
            f[n] = p;
            while (p < sep && *p != ' ')
                p++;
            fl[n] = (size_t)(p - f[n]);
            n++;
        }
        if (sep && n == 5) {
            const char *t = sep + 3;
            while (*t == ' ')
                t++;
            size_t tl = strcspn(t, " ");
            if (tl && ((dev && fl[2] == devlen && memcmp(f[2], dev, devlen) == 0) ||
                       (tl == 4 && memcmp(t, "nsfs", 4) == 0 &&
                        pinned_root(f[3], fl[3], pinned, npinned))))
                count++;
        }
        line = nl ? nl + 1 : NULL;
    }
    return count;
}

int nrx_count_mounts_at(const char *root, const char *dev, const uint64_t *pinned,
                        size_t npinned, int *mounts, int *mnt_ns)
{
    *mounts = *mnt_ns = 0;
    int procfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (procfd < 0)
        return -errno;
    DIR *proc = fdopendir(dup(procfd));
    if (!proc) {
        int e = errno;
        close(procfd);
        return -e;
    }
    uint64_t *seen = NULL;
    size_t nseen = 0, capseen = 0, cap = 0;
    char *buf = NULL, path[300], link[64];
    int err = 0;
    struct dirent *de;
    while ((de = next_pid(proc, &err)) != NULL) {
        snprintf(path, sizeof path, "%s/ns/mnt", de->d_name);
        ssize_t len = readlinkat(procfd, path, link, sizeof link - 1); /* "mnt:[inode]" */
        int e = errno;
        uint64_t ino = 0;
        if (len > 0) {
            link[len] = 0;
            const char *lb = strchr(link, '[');
            if (!lb) {
                err = -EIO;
                break;
            }
            ino = strtoull(lb + 1, NULL, 10);
            int dup_ns = 0;
            for (size_t i = 0; i < nseen && !dup_ns; i++)
                dup_ns = seen[i] == ino;
            if (dup_ns)
                continue;
            snprintf(path, sizeof path, "%s/mountinfo", de->d_name);
            int fd = openat(procfd, path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                len = -1;
                e = errno;
                /* the kernel answers EINVAL when the task has already dropped its
                 * namespaces (it is exiting: mounts_open_common finds no nsproxy), so it
                 * pins no mount namespace any more: the same as gone */
                if (e == EINVAL)
                    e = ESRCH;
            } else {
                ssize_t r = read_all(fd, &buf, &cap);
                close(fd);
                if (r < 0) {
                    len = -1;
                    e = (int)-r;
                }
            }
        } else if (len == 0) {
            e = EIO;
        }
        if (len <= 0) {
            if (gone(e))
                continue; /* exited */
            if (e == EACCES || e == EPERM) {
                int top = in_top_pidns(procfd, de->d_name);
                if (top == 1 || (top < 0 && gone(-top)))
                    continue; /* provably outside every sandbox, or exited */
            }
            err = -e;
            break;
        }
        if (nseen == capseen) {
            size_t ncap = capseen ? capseen * 2 : 256;
            uint64_t *ns = realloc(seen, ncap * sizeof *seen);
            if (!ns) {
                err = -ENOMEM;
                break;
            }
            seen = ns;
            capseen = ncap;
        }
        seen[nseen++] = ino;
        *mounts += count_mount_lines(buf, dev, pinned, npinned);
    }
    closedir(proc);
    close(procfd);
    free(seen);
    free(buf);
    *mnt_ns = (int)nseen;
    return err;
}

/* ---- kernel facts that answer without a walk (steps 5 and 6) -------------------------- */

/* An nsfs file handle (Linux 6.18: a namespace's unique 64-bit id, its type and inode)
 * of the namespace `nsfd` is open on, as [handle_type u32][handle_bytes u32][bytes]. */
int nrx_ns_handle(int nsfd, unsigned char *out, size_t cap)
{
    struct {
        struct file_handle fh;
        unsigned char room[128];
    } h;
    int mnt;
    h.fh.handle_bytes = sizeof h.room;
    if (name_to_handle_at(nsfd, "", &h.fh, &mnt, AT_EMPTY_PATH) < 0)
        return -errno;
    size_t need = 8 + h.fh.handle_bytes;
    if (need > cap)
        return -ENOSPC;
    memcpy(out, &h.fh.handle_type, 4);
    memcpy(out + 4, &h.fh.handle_bytes, 4);
    memcpy(out + 8, h.fh.f_handle, h.fh.handle_bytes);
    return (int)need;
}

/* Opens the namespace a handle of nrx_ns_handle names: an fd (a new pin on it), or
 * -errno.  -ESTALE is the kernel's answer that the namespace no longer exists (no task,
 * open fd or bind mount holds it); its id is never reused, unlike its inode number. */
int nrx_ns_open(const unsigned char *handle, size_t len)
{
    struct {
        struct file_handle fh;
        unsigned char room[128];
    } h;
    if (len < 8 || len - 8 > sizeof h.room)
        return -EINVAL;
    memcpy(&h.fh.handle_type, handle, 4);
    memcpy(&h.fh.handle_bytes, handle + 4, 4);
    if (h.fh.handle_bytes != len - 8)
        return -EINVAL;
    memcpy(h.fh.f_handle, handle + 8, len - 8);
    int nsfs = open("/proc/self/ns/uts", O_RDONLY | O_CLOEXEC); /* any fd on nsfs */
    if (nsfs < 0)
        return -errno;
    int fd = open_by_handle_at(nsfs, &h.fh, O_RDONLY | O_CLOEXEC);
    int e = errno;
    close(nsfs);
    return fd < 0 ? -e : fd;
}

/* An inotify fd watching the root inode of the filesystem `fd` is open on.  The kernel
 * queues IN_UNMOUNT on it when the superblock is shut down, which happens only once no
 * mount of it is left anywhere (every mount, attached or detached, in any mount
 * namespace, holds an active reference on the superblock; so does every open file). */
int nrx_sb_watch(int fd)
{
    char path[64];
    int ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ifd < 0)
        return -errno;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    if (inotify_add_watch(ifd, path, IN_DELETE_SELF) < 0) {
        int e = errno;
        close(ifd);
        return -e;
    }
    return ifd;
}

/* 1 when the watch of nrx_sb_watch has received IN_UNMOUNT (the superblock was shut
 * down), 0 when not (yet), or -errno. */
int nrx_sb_released(int ifd)
{
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    int seen = 0;
    for (;;) {
        ssize_t n = read(ifd, buf, sizeof buf);
        if (n < 0)
            return errno == EAGAIN ? seen : -errno;
        if (n == 0)
            return seen;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if (ev->mask & IN_UNMOUNT)
                seen = 1;
            p += sizeof *ev + ev->len;
        }
    }
}

/* PIDFD_GET_INFO (Linux 6.13): the credentials of the task a pidfd names, not munged
 * by dumpability as /proc's owner is; with PIDFD_THREAD (6.9) the thread's own. */
struct nrx_pidfd_info {
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
    uint32_t coredump_mask, spare;
};
#define NRX_PIDFD_GET_INFO _IOWR(0xFF, 11, struct nrx_pidfd_info)
#define NRX_PIDFD_INFO_CREDS 2u
#define NRX_PIDFD_THREAD O_EXCL

static int in_ranges(uint64_t id, const uint64_t *r, size_t n)
{
    for (size_t j = 0; j + 1 < n; j += 2)
        if (r[j] <= id && id < r[j + 1])
            return 1;
    return 0;
}

/* one task's real/effective/saved/fs uid and gid through a thread pidfd: 1 when one is in
 * a range, 0 when not or the task is gone, -errno */
static int task_ids_pidfd(int taskfd, const char *tid, void *p)
{
    (void)taskfd;
    struct ids_arg *a = p;
    int fd = (int)syscall(SYS_pidfd_open, atoi(tid), NRX_PIDFD_THREAD);
    if (fd < 0)
        return gone(errno) ? 0 : -errno;
    struct nrx_pidfd_info i;
    memset(&i, 0, sizeof i);
    i.mask = NRX_PIDFD_INFO_CREDS;
    int r = ioctl(fd, NRX_PIDFD_GET_INFO, &i);
    int e = errno;
    close(fd);
    if (r < 0)
        return gone(e) ? 0 : -e;
    if (!(i.mask & NRX_PIDFD_INFO_CREDS))
        return -EIO;
    uint64_t u[4] = {i.ruid, i.euid, i.suid, i.fsuid}, g[4] = {i.rgid, i.egid, i.sgid, i.fsgid};
    for (int k = 0; k < 4; k++)
        if (in_ranges(u[k], a->u, a->nu) || in_ranges(g[k], a->g, a->ng))
            return 1;
    return 0;
}

/* nrx_scan_ids through pidfds: the same answer (every thread's four uids and gids) for
 * a fraction of the cost (no /proc/PID/task/TID/status text is generated).  The tids come
 * from /proc, so /proc must be of this process's PID namespace: -EXDEV when it is not. */
int nrx_scan_ids_pidfd(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                       size_t ngid)
{
    char self[32];
    ssize_t n = readlink("/proc/self", self, sizeof self - 1);
    if (n <= 0)
        return n < 0 ? -errno : -EIO;
    self[n] = 0;
    if (atoi(self) != getpid())
        return -EXDEV;
    struct ids_arg a = {uid_ranges, gid_ranges, nuid, ngid};
    return for_each_task_at("/proc", task_ids_pidfd, &a, NULL);
}

/* ---- the caller's own mount table without mountinfo text (step 2) -------------------- */

#include <sys/statfs.h>

#ifndef SYS_statmount
#define SYS_statmount 457
#endif
#ifndef SYS_listmount
#define SYS_listmount 458
#endif

struct nrx_mnt_id_req {
    uint32_t size, spare;
    uint64_t mnt_id, param;
};
#define NRX_LSMT_ROOT 0xffffffffffffffffULL
#define NRX_STATMOUNT_SB_BASIC 0x1ULL

/* Mounts in the caller's mount namespace whose superblock is dev major:minor, read
 * through listmount(2) + statmount(2) (Linux 6.8): the same mount table mountinfo
 * prints, without generating and parsing a text line per mount (a node's mount table
 * holds every live session's view).  Returns the count or -errno (-ENOSYS: older
 * kernel; a mount that goes away meanwhile, ENOENT, is not counted). */
int nrx_own_mounts_of_dev(unsigned major, unsigned minor)
{
    uint64_t ids[512];
    uint64_t buf[128]; /* struct statmount, 8-aligned */
    struct nrx_mnt_id_req req;
    int count = 0;
    uint64_t last = 0;
    for (;;) {
        memset(&req, 0, sizeof req);
        req.size = sizeof req;
        req.mnt_id = NRX_LSMT_ROOT;
        req.param = last;
        long n = syscall(SYS_listmount, &req, ids, 512, 0);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++) {
            memset(&req, 0, sizeof req);
            req.size = sizeof req;
            req.mnt_id = ids[i];
            req.param = NRX_STATMOUNT_SB_BASIC;
            if (syscall(SYS_statmount, &req, buf, sizeof buf, 0) < 0) {
                if (errno == ENOENT)
                    continue;
                return -errno;
            }
            const unsigned char *b = (const unsigned char *)buf;
            uint64_t mask;
            uint32_t maj, min;
            memcpy(&mask, b + 8, 8);
            memcpy(&maj, b + 16, 4);
            memcpy(&min, b + 20, 4);
            if (!(mask & NRX_STATMOUNT_SB_BASIC))
                return -EIO;
            count += maj == major && min == minor;
        }
        if (n < 512)
            return count;
        last = ids[n - 1];
    }
}

/* f_type of the filesystem `fd` is on (fstatfs), or -errno */
long long nrx_fs_magic(int fd)
{
    struct statfs s;
    if (fstatfs(fd, &s) < 0)
        return -errno;
    return (long long)(unsigned long)s.f_type;
}

/* 1 when `path` (not following a final symlink) is the root of a mount in the caller's
 * view (statx STATX_ATTR_MOUNT_ROOT, Linux 5.8), 0 when not, or -errno (-EOPNOTSUPP:
 * the kernel does not report the attribute) */
int nrx_is_mount_root(const char *path)
{
    struct statx stx;
    if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_TYPE, &stx) < 0)
        return -errno;
    if (!(stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
        return -EOPNOTSUPP;
    return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
}
