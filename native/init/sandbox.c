/* nrx-init, sandbox side: builds the sandbox's world inside the new namespaces.
 *
 * Runs in the cloned child (PID 1 of the new PID namespace) after the helper wrote
 * its uid/gid maps.  One ordered list of steps; each reports what failed to the
 * agent and stops the sequence:
 *   become root of the user namespace; make every mount private; bind the read-only
 *   runtime; merged-usr links; /proc; minimal /dev; /etc; /work /tmp /input;
 *   hostname; loopback up; pivot_root into the tmpfs and detach the old root.
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
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "proto.h"

#define STEP_FAIL(...) do { send_text(CONTROL_FD, MSG_ERROR, __VA_ARGS__); return -1; } while (0)

/* paths inside the new root are relative to the cwd, which is the root mount: the host
 * directories above it may not be searchable by the namespace's root (e.g. a 0700 /tmp dir) */
static const char *join(const char *root, const char *rel)
{
    (void)root;
    while (*rel == '/')
        rel++;
    return rel;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s", path);
    for (char *s = tmp + 1; *s; s++) {
        if (*s == '/') {
            *s = 0;
            if (mkdir(tmp, 0755) < 0 && errno != EEXIST)
                return -1;
            *s = '/';
        }
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int put_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* Read-only bind that keeps the flags the kernel locked on the source mount (a remount in
 * a user namespace may not clear nodev/nosuid/noexec/atime flags it inherited). */
static int ro_bind(const char *src, const char *dst, int is_dir)
{
    struct statvfs sv;
    if (is_dir) {
        if (mkdir_p(dst, 0755) < 0)
            return -1;
    } else {
        int fd = open(dst, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0444);
        if (fd < 0)
            return -1;
        close(fd);
    }
    if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
        return -1;
    if (statvfs(dst, &sv) < 0)
        return -1;
    unsigned long keep = 0;
    if (sv.f_flag & ST_NOEXEC) keep |= MS_NOEXEC;
    if (sv.f_flag & ST_NOATIME) keep |= MS_NOATIME;
    if (sv.f_flag & ST_NODIRATIME) keep |= MS_NODIRATIME;
    if (sv.f_flag & ST_RELATIME) keep |= MS_RELATIME;
    if (sv.f_flag & ST_NODEV) keep |= MS_NODEV;
    unsigned long extra = is_dir ? MS_NODEV : 0; /* device binds must keep working */
    return mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | extra | keep,
                 NULL);
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
    char text[2048];
    unsigned id = c->sandbox_id;

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
        STEP_FAIL("entering the session root %s: %s", R, strerror(errno));
    /* leave the agent's session: no controlling terminal, no terminal signals */
    if (setsid() < 0)
        STEP_FAIL("setsid: %s", strerror(errno));
    /* root of the user namespace (our host credentials are not mapped in it) */
    if (setresgid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 || setresuid(0, 0, 0) < 0)
        STEP_FAIL("becoming root of the user namespace: %s", strerror(errno));

    for (int i = 0; i < c->n_binds; i++) {
        const char *src = c->binds[i];
        const char *dst = src + strlen(src) + 1;
        if (ro_bind(src, join(R, dst), 1) < 0)
            STEP_FAIL("read-only bind of %s: %s", src, strerror(errno));
    }
    for (int i = 0; i < c->n_links; i++) {
        const char *name = c->links[i];
        const char *target = name + strlen(name) + 1;
        if (symlink(target, join(R, name)) < 0 && errno != EEXIST)
            STEP_FAIL("link /%s: %s", name, strerror(errno));
    }

    if (mkdir(join(R, "proc"), 0555) < 0 ||
        mount("proc", join(R, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        STEP_FAIL("mounting /proc: %s", strerror(errno));

    /* /dev and /dev/shm live in the session tmpfs: charged to the session, wiped with it */
    if (mkdir(join(R, "dev"), 0755) < 0 || mkdir(join(R, "dev/shm"), 01777) < 0)
        STEP_FAIL("creating /dev: %s", strerror(errno));
    static const char *devs[] = {"null", "zero", "full", "random", "urandom"};
    for (size_t i = 0; i < sizeof(devs) / sizeof(*devs); i++) {
        char src[64];
        snprintf(src, sizeof(src), "/dev/%s", devs[i]);
        snprintf(text, sizeof(text), "dev/%s", devs[i]);
        int fd = open(join(R, text), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 || close(fd) < 0 || mount(src, join(R, text), NULL, MS_BIND, NULL) < 0)
            STEP_FAIL("binding %s: %s", src, strerror(errno));
    }
    static const char *links[][2] = {{"dev/fd", "/proc/self/fd"}, {"dev/stdin", "/proc/self/fd/0"},
                                     {"dev/stdout", "/proc/self/fd/1"},
                                     {"dev/stderr", "/proc/self/fd/2"}};
    for (size_t i = 0; i < sizeof(links) / sizeof(*links); i++)
        if (symlink(links[i][1], join(R, links[i][0])) < 0)
            STEP_FAIL("link /%s: %s", links[i][0], strerror(errno));

    if (mkdir(join(R, "etc"), 0755) < 0)
        STEP_FAIL("creating /etc: %s", strerror(errno));
    snprintf(text, sizeof(text),
             "root:x:0:0:root:/root:/usr/sbin/nologin\n"
             "sandbox:x:%u:%u:sandbox:/work:/bin/sh\n"
             "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", id, id);
    if (put_file(join(R, "etc/passwd"), text, 0644) < 0)
        STEP_FAIL("writing /etc/passwd: %s", strerror(errno));
    snprintf(text, sizeof(text), "root:x:0:\nsandbox:x:%u:\nnogroup:x:65534:\n", id);
    if (put_file(join(R, "etc/group"), text, 0644) < 0)
        STEP_FAIL("writing /etc/group: %s", strerror(errno));
    if (put_file(join(R, "etc/nsswitch.conf"),
                 "passwd: files\ngroup: files\nshadow: files\nhosts: files\n", 0644) < 0)
        STEP_FAIL("writing /etc: %s", strerror(errno));

    if (mkdir(join(R, "work"), 0700) < 0 || chown(join(R, "work"), id, id) < 0 ||
        mkdir(join(R, "tmp"), 01777) < 0 || mkdir(join(R, "input"), 0755) < 0)
        STEP_FAIL("creating /work, /tmp, /input: %s", strerror(errno));

    if (set_identity(c->hostname) < 0)
        STEP_FAIL("sethostname (and /etc/hostname, /etc/hosts): %s", strerror(errno));
    if (loopback_up() < 0)
        STEP_FAIL("bringing lo up: %s", strerror(errno));

    if (syscall(SYS_pivot_root, ".", ".") < 0)
        STEP_FAIL("pivot_root: %s", strerror(errno));
    if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        STEP_FAIL("detaching the old root: %s", strerror(errno));
    return 0;
}
