/* nrx-init, host side: creates one sandbox and hands its PID 1 to the agent.
 *
 * The agent execs this with a SOCK_SEQPACKET socket on fd 3.  Steps, in order:
 *   1. read the CONFIG message;
 *   2. make the mount point and mount the session tmpfs at the host path (nosuid,nodev,
 *      size/inode limits, owned by the slot's host root) so the agent keeps a host view
 *      of it; the re-attach socket, the audit login uid, oom_score_adj;
 *   3. wait for GO (the agent made the session cgroups and the proof reservation
 *      meanwhile), then join the cgroups (the sandbox inherits them; cgroup2 is entered
 *      by the clone itself);
 *   4. clone the sandbox PID 1 into new user/mnt/uts/ipc/pid/net/cgroup namespaces with
 *      CLONE_PARENT, so it is the agent's own child (pidfd, reaping);
 *   5. report its pid, write its uid/gid maps (only a parent may), release it, exit.
 * The sandbox side is in sandbox.c (setup) and serve.c (PID 1 loop); the wire helpers
 * all three use (TLV, messages, the CONFIG parser) are in proto.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "proto.h"

/* ---- host side ---------------------------------------------------------------- */

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    int e = errno;
    close(fd);
    errno = e;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* clone3's argument, up to the `cgroup` field (CLONE_ARGS_SIZE_VER2, Linux 5.7) */
struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
             set_tid, set_tid_size, cgroup;
};
#define CLONE_INTO_CGROUP_FLAG 0x200000000ULL
#ifndef SYS_clone3
#define SYS_clone3 435
#endif

/* `path` is a cgroup.procs file.  v1 (a `tasks` file beside it): move this thread (the
 * whole single-threaded process) by writing "0" there.  cgroup2: keep an fd on the
 * directory for clone3(CLONE_INTO_CGROUP) (first such directory only).  Returns 0 when
 * handled, -1 when the caller must write cgroup.procs. */
static int join_fast(const char *path, int *into_fd, const char **into_procs)
{
    char dir[4096], tasks[4200];
    size_t len = strlen(path);
    const char *suffix = "/cgroup.procs";
    size_t sl = strlen(suffix);
    if (len <= sl || len - sl >= sizeof(dir) || strcmp(path + len - sl, suffix) != 0)
        return -1;
    memcpy(dir, path, len - sl);
    dir[len - sl] = 0;
    snprintf(tasks, sizeof(tasks), "%s/tasks", dir);
    if (write_file(tasks, "0\n") == 0)
        return 0;
    if (errno != ENOENT || *into_fd >= 0) /* a v1 `tasks` that refused: cgroup.procs */
        return -1;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    *into_fd = fd;
    *into_procs = path;
    return 0;
}

/* The socket a restarted agent re-attaches through (issue 12): bound on the host before
 * the clone, so PID 1 inherits it and no path inside the sandbox leads to it; owned by
 * host root, mode 0600, in the agent's runtime directory. */
static int open_attach_socket(struct config *c)
{
    /* bound through /proc/self/fd/N/<name>: sun_path holds 107 bytes, the runtime dir
     * may be deeper than that */
    char dir[4096];
    const char *slash = strrchr(c->attach_path, '/');
    if (!slash || (size_t)(slash - c->attach_path) >= sizeof(dir)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(dir, c->attach_path, (size_t)(slash - c->attach_path));
    dir[slash - c->attach_path] = 0;
    int dfd = open(dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    struct sockaddr_un a;
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    int n = snprintf(a.sun_path, sizeof(a.sun_path), "/proc/self/fd/%d/%s", dfd, slash + 1);
    int fd = -1, r = -1;
    if (n > 0 && (size_t)n < sizeof(a.sun_path))
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    else
        errno = ENAMETOOLONG;
    if (fd >= 0) {
        unlink(c->attach_path);
        mode_t old = umask(077);
        r = bind(fd, (struct sockaddr *)&a, sizeof(a));
        umask(old);
        if (r == 0)
            r = chmod(c->attach_path, 0600);
        if (r == 0)
            r = listen(fd, 4);
    }
    int e = errno;
    close(dfd);
    if (r < 0) {
        if (fd >= 0)
            close(fd);
        errno = e;
        return -1;
    }
    c->attach_fd = fd;
    return 0;
}

/* mkdir `path` and the two directories above it (`sessions/<id>/root`), 0700 (umask 0);
 * one that exists already is used (the agent checks `sessions/` at start) */
static int make_dirs(const char *path)
{
    char dir[4096];
    if (strlen(path) >= sizeof(dir)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(dir, path);
    char *cut[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        char *slash = strrchr(dir, '/');
        if (!slash || slash == dir) {
            errno = EINVAL;
            return -1;
        }
        *slash = 0;
        cut[i] = slash;
    }
    for (int i = 1; i >= -1; i--) {
        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
            return -1;
        if (i >= 0)
            *cut[i] = '/';
    }
    return 0;
}

/* `<session dir>/unbound`, 0600, new: a warm-pool sandbox's (engine.unbound_mark) */
static int make_unbound_mark(const char *root)
{
    char path[4200];
    const char *slash = strrchr(root, '/');
    if (!slash || snprintf(path, sizeof(path), "%.*s/unbound", (int)(slash - root), root)
                      >= (int)sizeof(path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

/* The audit login uid is inherited and can be set once, without privilege, while unset:
 * left unset, the sandbox user could claim any login uid for itself in the host's audit
 * trail.  Set it here, in the initial user namespace (the sandbox user's host uid), unless
 * the agent's is already set (then it is inherited, and changing it needs
 * CAP_AUDIT_CONTROL, which no sandbox has).  No audit support (no file): nothing to seal. */
static int seal_loginuid(uint32_t host_uid)
{
    char text[32];
    int fd = open("/proc/self/loginuid", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    ssize_t n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = 0;
    if (strtoul(text, NULL, 10) != 4294967295UL)
        return 0;
    snprintf(text, sizeof(text), "%u", host_uid);
    return write_file("/proc/self/loginuid", text);
}

#define FAIL(...) do { send_text(CONTROL_FD, MSG_ERROR, __VA_ARGS__); goto fail; } while (0)

int main(void)
{
    static unsigned char buf[MAX_MSG];
    struct config cfg;
    char text[512];
    int mounted = 0;
    pid_t child = -1;
    int release[2] = {-1, -1};

    /* nothing but fds 0-3 may reach the sandbox, whatever the agent leaked */
    syscall(SYS_close_range, 4U, ~0U, 0U);
    signal(SIGPIPE, SIG_IGN);
    umask(0);

    ssize_t n = recv(CONTROL_FD, buf, sizeof(buf), 0);
    if (n < 4) {
        fprintf(stderr, "nrx-init: no config on fd 3 (run by the agent only)\n");
        return 2;
    }
    uint32_t type;
    memcpy(&type, buf, 4);
    int parsed = type == MSG_CONFIG ? parse_config(buf + 4, (size_t)n - 4, &cfg) : -1;
    if (parsed == -2) {
        send_text(CONTROL_FD, MSG_ERROR, "nrx-init: the config carries no usable seccomp "
                  "filter; refusing to build a sandbox without one");
        return 2;
    }
    if (parsed < 0) {
        send_text(CONTROL_FD, MSG_ERROR, "nrx-init: malformed config message");
        return 2;
    }

    /* The mount point (with the session directory above it, 0700 like `sessions/`; an
     * existing one is used) and, for a warm-pool sandbox, the mark that says it never held
     * a session (engine.unbound_mark) */
    if (make_dirs(cfg.root) < 0)
        FAIL("making the session mount point %s: %s", cfg.root, strerror(errno));
    if (cfg.unbound && make_unbound_mark(cfg.root) < 0)
        FAIL("marking the sandbox unbound: %s", strerror(errno));

    snprintf(text, sizeof(text), "size=%llu,nr_inodes=%llu,mode=0755,uid=%u,gid=%u",
             (unsigned long long)cfg.tmpfs_size, (unsigned long long)cfg.tmpfs_inodes,
             cfg.uid_base, cfg.gid_base);
    if (mount("tmpfs", cfg.root, "tmpfs", MS_NOSUID | MS_NODEV, text) < 0)
        FAIL("mounting the session tmpfs at %s: %s", cfg.root, strerror(errno));
    mounted = 1;

    if (cfg.attach_path && cfg.orphan_grace_ms) {
        if (open_attach_socket(&cfg) < 0)
            FAIL("re-attach socket %s: %s", cfg.attach_path, strerror(errno));
        /* a restarted agent may live in a new mount namespace (systemd gives each start
         * one) where this mount is gone: PID 1 keeps it, without the sandbox's submounts */
        cfg.root_view_fd = open(cfg.root, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (cfg.root_view_fd < 0)
            FAIL("opening the session tmpfs: %s", strerror(errno));
    }
    if (seal_loginuid(cfg.uid_base + cfg.sandbox_id) < 0)
        FAIL("setting the audit login uid: %s", strerror(errno));
    snprintf(text, sizeof(text), "%d\n", cfg.oom_score);
    if (write_file("/proc/self/oom_score_adj", text) < 0)
        FAIL("setting oom_score_adj: %s", strerror(errno));

    if (pipe2(release, O_CLOEXEC) < 0)
        FAIL("pipe: %s", strerror(errno));

    /* Everything above needs nothing of the agent's; the cgroups do.  The agent makes them
     * (and the session's proof reservation) while this ran, then sends GO with their
     * paths: no PID 1 exists before both are done.  EOF: the agent gave up (the fail path
     * undoes the tmpfs and the socket; nothing else of the sandbox exists yet). */
    n = recv(CONTROL_FD, buf, sizeof(buf), 0);
    if (n == 0)
        goto fail;
    if (n < 4)
        FAIL("no GO from the agent: %s", n < 0 ? strerror(errno) : "short message");
    memcpy(&type, buf, 4);
    if (type != MSG_GO || parse_go(buf + 4, (size_t)n - 4, &cfg) < 0)
        FAIL("nrx-init: malformed GO message");

    /* Join the session cgroups without the kernel's global cgroup_threadgroup_rwsem:
     * writing a pid to cgroup.procs takes it for writing, which waits for an RCU grace
     * period (6-9 ms here, and it stalls every fork on the host meanwhile).  This helper
     * is single-threaded, so "0" written to a v1 hierarchy's `tasks` file moves the whole
     * process without that lock, and the one cgroup2 directory is entered by the sandbox
     * PID 1 itself through clone3(CLONE_INTO_CGROUP) (read side only).  Anything else
     * (no `tasks` file, a second cgroup2 directory, an old kernel) uses cgroup.procs. */
    char self_pid[32];
    snprintf(self_pid, sizeof(self_pid), "%d\n", (int)getpid());
    int into_fd = -1;
    const char *into_procs = NULL;
    for (int i = 0; i < cfg.n_cgroups; i++) {
        if (join_fast(cfg.cgroups[i], &into_fd, &into_procs) == 0)
            continue;
        if (write_file(cfg.cgroups[i], self_pid) < 0)
            FAIL("joining cgroup %s: %s", cfg.cgroups[i], strerror(errno));
    }

    /* fork-like clone (no new stack): the child continues below with a copy of memory */
    unsigned long ns_flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC |
                             CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP | CLONE_PARENT;
    child = -1;
    if (into_fd >= 0) {
        struct clone_args_v2 ca;
        memset(&ca, 0, sizeof(ca));
        ca.flags = ns_flags | CLONE_INTO_CGROUP_FLAG;
        /* with CLONE_PARENT clone3 wants exit_signal 0: the child takes the helper's
         * (SIGCHLD, as the agent spawned it), like the legacy clone below */
        ca.exit_signal = 0;
        ca.cgroup = (uint64_t)into_fd;
        child = (pid_t)syscall(SYS_clone3, &ca, sizeof(ca));
        if (child < 0) {
            /* clone3 or CLONE_INTO_CGROUP unavailable: join the slow way, clone below */
            if (write_file(into_procs, self_pid) < 0)
                FAIL("joining cgroup %s: %s", into_procs, strerror(errno));
        }
        close(into_fd); /* parent and child: the sandbox keeps no fd on a host cgroup */
        into_fd = -1;
    }
    if (child < 0)
        child = (pid_t)syscall(SYS_clone, ns_flags | SIGCHLD, NULL, NULL, NULL, 0UL);
    if (child < 0)
        FAIL("clone with new namespaces: %s (are user namespaces restricted on this host?)",
             strerror(errno));
    if (child == 0) {
        char c;
        close(release[1]);
        ssize_t r;
        do
            r = read(release[0], &c, 1);
        while (r < 0 && errno == EINTR);
        if (r != 1)
            _exit(1); /* the helper died before mapping us */
        close(release[0]);
        if (setup_sandbox(&cfg) < 0)
            _exit(1);
        send_msg(CONTROL_FD, MSG_READY, NULL, 0);
        serve(&cfg);
    }
    close(release[0]);
    if (cfg.attach_fd >= 0)
        close(cfg.attach_fd); /* PID 1 holds it now */
    if (cfg.root_view_fd >= 0)
        close(cfg.root_view_fd);
    /* the agent learns the pid first, so it can always kill and reap the child */
    send_ints(CONTROL_FD, MSG_PID, child, 0, 1);

    char path[64];
    snprintf(text, sizeof(text), "0 %u %u\n", cfg.uid_base, cfg.map_size);
    snprintf(path, sizeof(path), "/proc/%d/uid_map", (int)child);
    if (write_file(path, text) < 0)
        FAIL("writing uid_map: %s", strerror(errno));
    snprintf(text, sizeof(text), "0 %u %u\n", cfg.gid_base, cfg.map_size);
    snprintf(path, sizeof(path), "/proc/%d/gid_map", (int)child);
    if (write_file(path, text) < 0)
        FAIL("writing gid_map: %s", strerror(errno));
    if (write(release[1], "1", 1) != 1)
        FAIL("releasing the sandbox: %s", strerror(errno));
    return 0;

fail:
    if (cfg.attach_fd >= 0)
        unlink(cfg.attach_path);
    if (child > 0)
        kill(child, SIGKILL); /* the agent reaps it: it is the agent's child */
    if (mounted)
        umount2(cfg.root, MNT_DETACH);
    return 1;
}
