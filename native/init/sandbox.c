/* nrx-init, sandbox side: builds the sandbox's world inside the new namespaces.
 *
 * Runs in the cloned child (PID 1 of the new PID namespace) after the helper wrote
 * its uid/gid maps.  One ordered list of steps; each reports what failed to the
 * agent and stops the sequence:
 *   new cgroup namespace; make every mount private; enter the session tmpfs; become
 *   root of the user namespace; apply the mount plan (the agent's ordered list of setup
 *   ops, proto.h: the runtime binds, merged-usr links, /proc, /dev, /etc, /work, ...);
 *   hostname; loopback up; pivot_root into the tmpfs and detach the old root.
 * What the root holds is the plan's; that it is private, entered and pivoted into is
 * fixed here (a plan cannot leave the host's root in view).
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "proto.h"

#define STEP_FAIL(...) do { send_text(CONTROL_FD, MSG_ERROR, __VA_ARGS__); return -1; } while (0)

/* The directory that holds `dest` (an absolute path inside the new root with no ".", ".."
 * or empty component, checked by parse_config), reached from `rootfd` one component at a
 * time with O_NOFOLLOW (ELOOP on a symlink), so no op of the plan reaches outside the
 * session tmpfs; *base is dest's last component.  (openat2 with RESOLVE_BENEATH and
 * RESOLVE_NO_SYMLINKS would do it in one call, but under the shipped systemd unit's
 * SystemCallFilter it fails with ENOSYS.) */
static int open_parent(int rootfd, const char *dest, const char **base)
{
    char path[MAX_OP_PATH + 1];
    snprintf(path, sizeof(path), "%s", dest + 1);
    int fd = fcntl(rootfd, F_DUPFD_CLOEXEC, 0);
    char *name = path, *slash;
    while (fd >= 0 && (slash = strchr(name, '/'))) {
        *slash = 0;
        int next = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int e = errno;
        close(fd);
        errno = e;
        fd = next;
        name = slash + 1;
    }
    *base = dest + 1 + (name - path);
    return fd;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* a mount's target must be there already and not be a symlink (mount(2) would follow it) */
static int mount_target(const char *base)
{
    struct stat st;
    if (lstat(base, &st) < 0)
        return -1;
    if (S_ISLNK(st.st_mode)) {
        errno = ELOOP;
        return -1;
    }
    return 0;
}

/* Bind, then (if asked) remount with the requested flags plus those the kernel locked on
 * the source mount (a remount in a user namespace may not clear nodev/nosuid/noexec/atime
 * flags it inherited). */
static int bind_mount(const struct mount_op *op, const char *base)
{
    unsigned long want = 0;
    if (op->flags & OPF_RO) want |= MS_RDONLY;
    if (op->flags & OPF_NOSUID) want |= MS_NOSUID;
    if (op->flags & OPF_NODEV) want |= MS_NODEV;
    if (op->flags & OPF_NOEXEC) want |= MS_NOEXEC;
    if (mount(op->arg, base, NULL, MS_BIND | (op->flags & OPF_REC ? MS_REC : 0), NULL) < 0)
        return -1;
    if (!want)
        return 0;
    struct statvfs sv;
    if (statvfs(base, &sv) < 0)
        return -1;
    unsigned long keep = 0;
    if (sv.f_flag & ST_NOEXEC) keep |= MS_NOEXEC;
    if (sv.f_flag & ST_NOATIME) keep |= MS_NOATIME;
    if (sv.f_flag & ST_NODIRATIME) keep |= MS_NODIRATIME;
    if (sv.f_flag & ST_RELATIME) keep |= MS_RELATIME;
    if (sv.f_flag & ST_NODEV) keep |= MS_NODEV;
    if (sv.f_flag & ST_NOSUID) keep |= MS_NOSUID;
    return mount(NULL, base, NULL, MS_BIND | MS_REMOUNT | want | keep, NULL);
}

/* one op, with the cwd at its dest's parent directory */
static int apply_op(const struct mount_op *op, const char *base)
{
    int fd;
    switch (op->kind) {
    case OP_DIR:
        if (mkdir(base, op->mode) < 0)
            return -1;
        break;
    case OP_FILE:
        fd = open(base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, op->mode);
        if (fd < 0)
            return -1;
        if (write_all(fd, op->arg, op->arg_len) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (close(fd) < 0)
            return -1;
        break;
    case OP_SYMLINK:
        return symlink(op->arg, base);
    case OP_BIND:
        return mount_target(base) < 0 ? -1 : bind_mount(op, base);
    case OP_PROC:
        if (mount_target(base) < 0)
            return -1;
        return mount("proc", base, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    default:
        errno = EINVAL;
        return -1;
    }
    if ((op->uid != NO_ID || op->gid != NO_ID) && lchown(base, op->uid, op->gid) < 0)
        return -1;
    return 0;
}

static const char *op_name(uint32_t kind)
{
    static const char *names[] = {"?", "dir", "file", "symlink", "bind", "proc"};
    return kind < sizeof(names) / sizeof(*names) ? names[kind] : "?";
}

/* `dest`'s parent directory inside the new root: its length in dest ("" for a top-level
 * dest, whose parent is the root itself) */
static size_t parent_len(const char *dest)
{
    return (size_t)(strrchr(dest, '/') - dest);
}

/* The mount plan, in order, from the new root (`rootfd`, the cwd on entry and on return).
 * Each op runs with the cwd at its dest's parent, reached by open_parent; consecutive ops
 * under the same parent (the /dev and /etc entries) reuse it, unless an op mounted on
 * that parent or above it (the open directory would then still show what lies under the
 * mount).  The first op that fails stops it: the agent is told the op's index, kind and
 * errno (never a path). */
static int apply_plan(const struct config *c, int rootfd)
{
    int cur = -1;                 /* the cwd's fd when it is not the root */
    const char *cur_dest = "";    /* an op's dest whose parent the cwd is; "" = the root,
                                   * NULL = reach the next op's parent again */
    size_t cur_len = 0;
    int r = 0, e = 0, i;
    for (i = 0; i < c->n_ops; i++) {
        const struct mount_op *op = &c->ops[i];
        size_t plen = parent_len(op->dest), mlen = strlen(op->dest);
        const char *base = op->dest + plen + 1;
        if (!cur_dest || plen != cur_len || strncmp(op->dest, cur_dest, plen) != 0) {
            int dfd = plen ? open_parent(rootfd, op->dest, &base) : rootfd;
            if (dfd < 0 || fchdir(dfd) < 0) {
                e = errno;
                if (dfd >= 0 && dfd != rootfd)
                    close(dfd);
                r = -1;
                break;
            }
            if (cur >= 0)
                close(cur);
            cur = dfd == rootfd ? -1 : dfd;
            cur_dest = op->dest;
            cur_len = plen;
        }
        if (apply_op(op, base) < 0) {
            e = errno;
            r = -1;
            break;
        }
        /* a mount on the cwd's directory or above it: reach it again, through the mount */
        if ((op->kind == OP_BIND || op->kind == OP_PROC) && mlen <= cur_len &&
            strncmp(cur_dest, op->dest, mlen) == 0 && (mlen == cur_len || cur_dest[mlen] == '/'))
            cur_dest = NULL;
    }
    if (cur >= 0)
        close(cur);
    if (fchdir(rootfd) < 0 && r == 0) {
        e = errno;
        r = -1;
        i = c->n_ops - 1;
    }
    if (r < 0) {
        const char *name = strerrorname_np(e);
        send_text(CONTROL_FD, MSG_ERROR, "mount plan op %d (%s) failed: %s (%s)", i,
                  op_name(c->ops[i].kind), name ? name : "?", strerror(e));
        return -1;
    }
    return 0;
}

static int loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    int r = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (r == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        r = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
    return r;
}

/* Replace a file of the session's /etc (cwd-relative; the last component is never followed) */
static int put_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    int rc = write_all(fd, text, strlen(text));
    if (close(fd) < 0)
        rc = -1;
    return rc;
}

/* The session's identity: hostname plus /etc/hostname and /etc/hosts, their one writer (at
 * setup after the mount plan; a warm-pool sandbox gets its real name at BIND) */
int set_identity(const char *hostname)
{
    char text[512];
    size_t len = strlen(hostname);
    if (!len || len > 64 || strchr(hostname, '/') || strchr(hostname, '\n')) {
        errno = EINVAL;
        return -1;
    }
    snprintf(text, sizeof(text), "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost\n",
             hostname);
    if (put_file("etc/hosts", text, 0644) < 0 || put_file("etc/hostname", hostname, 0644) < 0)
        return -1;
    return sethostname(hostname, len);
}

int setup_sandbox(struct config *c)
{
    const char *R = c->root;

    /* Still host root here, so the host path is searchable.  Private mounts first; then
     * bind the session tmpfs onto itself: the copy inherited from the host is locked in
     * this less privileged namespace and pivot_root refuses a locked mount. */
    /* A cgroup namespace rooted where we are now: clone3(CLONE_INTO_CGROUP) placed us in
     * the session's cgroup2 directory after the clone's own cgroup namespace was taken
     * from the helper's, so /proc/self/cgroup would show the host's path below it. */
    if (unshare(CLONE_NEWCGROUP) < 0)
        STEP_FAIL("new cgroup namespace: %s", strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        STEP_FAIL("making mounts private: %s", strerror(errno));
    if (mount(R, R, NULL, MS_BIND | MS_REC, NULL) < 0 || chdir(R) < 0)
        STEP_FAIL("entering the session root: %s", strerror(errno));
    /* leave the agent's session: no controlling terminal, no terminal signals */
    if (setsid() < 0)
        STEP_FAIL("setsid: %s", strerror(errno));
    /* root of the user namespace (our host credentials are not mapped in it) */
    if (setresgid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 || setresuid(0, 0, 0) < 0)
        STEP_FAIL("becoming root of the user namespace: %s", strerror(errno));

    int rootfd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        STEP_FAIL("opening the session root: %s", strerror(errno));
    if (apply_plan(c, rootfd) < 0)
        return -1;
    close(rootfd);

    if (set_identity(c->hostname) < 0)
        STEP_FAIL("sethostname (and /etc/hostname, /etc/hosts): %s", strerror(errno));
    if (loopback_up() < 0)
        STEP_FAIL("bringing lo up: %s", strerror(errno));

    if (syscall(SYS_pivot_root, ".", ".") < 0)
        STEP_FAIL("pivot_root: %s", strerror(errno));
    if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        STEP_FAIL("detaching the old root: %s", strerror(errno));
    /* PID 1 never execs, so its capability bounding set only matters to the commands it
     * starts: emptied once here, every command inherits it empty (fail closed: a sandbox
     * whose bounding set cannot be emptied runs nothing) */
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
            continue;
        if (errno != EINVAL || cap == 0)
            STEP_FAIL("dropping the capability bounding set: %s", strerror(errno));
        break; /* beyond the kernel's last capability (they are numbered without gaps) */
    }
    return 0;
}
