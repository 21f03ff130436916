/* nrx-floor: the kernel work of one nanorix-agent lifecycle, in plain C, timed.
 *
 * The bench's floor: what a session's create, `exec true` and destroy cost when nothing
 * but the syscalls themselves is paid (no daemon, no RPC, no Python, no host-wide scans,
 * no wipe passes).  Each lifecycle, in order:
 *   1. cgroups: mkdir memory, pids, cpu, freezer (v1) below the prefix; write the limits
 *      (memory 256 MiB, pids 64, cpu 100%);
 *   2. mount the session tmpfs at a host path (size/nr_inodes limits), as nrx-init does;
 *   3. clone PID 1 into new user/mnt/pid/net/ipc/uts namespaces; the parent writes its
 *      uid/gid maps (a random host range) and attaches it to the cgroups through `tasks`,
 *      then releases it; PID 1 unshares a cgroup namespace (the seventh), makes mounts
 *      private, binds the tmpfs onto itself, becomes root of the user namespace, binds
 *      /usr read-only, links bin/lib/lib64/sbin, mounts /proc, binds /dev/null, sets the
 *      hostname, brings lo up, pivot_roots and detaches the old root;
 *   4. PID 1 forks and execs /usr/bin/true, reaps it and reports its status;
 *   5. destroy: freeze (freezer.state until FROZEN), SIGKILL PID 1, thaw, reap it,
 *      umount + rmdir the tmpfs mount point, memory.force_empty, rmdir the four cgroups;
 *   6. two Ed25519 signatures (libsodium) over a ~1.5 KB proof text, written to a new
 *      file, fsynced, renamed into place, directory fsynced.
 * It prints one line per lifecycle: the milliseconds from step 1 to the end of step 6,
 * then those of steps 1-4 (create + exec `true`), step 5 (destroy) and step 6 (proof).
 *
 *   nrx-floor -n COUNT -u UID_BASE -p CGROUP_PREFIX -d WORKDIR
 *
 * With -n 0 it runs one lifecycle per line read on stdin until EOF.
 * Needs root on a host with cgroup v1 memory/pids/cpu/freezer hierarchies (the hybrid
 * layout of the bench machine).  Removes everything it made before it exits, also on
 * failure (the cgroup prefix directories, mount points, proof files).
 * Built by bench/floor.py: cc -O2 floor.c -lsodium.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *CTRLS[] = {"memory", "pids", "cpu", "freezer"};
#define NCTRL 4

static const char *prefix, *workdir;
static unsigned long uid_base;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("nrx-floor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, ": %s\n", strerror(errno));
    va_end(ap);
    exit(1);
}

static int put(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- the sandbox side (PID 1 of the new PID namespace) ----------------------------- */

struct child_args {
    int go;       /* read end: the parent wrote the maps and attached the cgroups */
    int report;   /* write end: one byte, the exit status of `true` */
    const char *root;
};

static int bind_ro(const char *src, const char *dst)
{
    if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
        return -1;
    return mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
}

static int loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    int r = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (r == 0) {
        ifr.ifr_flags |= IFF_UP;
        r = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
    return r;
}

#define CHILD_FAIL(what)                                                                   \
    do {                                                                                   \
        fprintf(stderr, "nrx-floor sandbox: %s: %s\n", what, strerror(errno));            \
        _exit(2);                                                                          \
    } while (0)

static int sandbox_main(void *arg)
{
    struct child_args *a = arg;
    char c;
    if (read(a->go, &c, 1) != 1)
        _exit(3);
    if (unshare(CLONE_NEWCGROUP) < 0)
        CHILD_FAIL("cgroup namespace");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        CHILD_FAIL("private mounts");
    if (mount(a->root, a->root, NULL, MS_BIND | MS_REC, NULL) < 0 || chdir(a->root) < 0)
        CHILD_FAIL("entering the root");
    if (setsid() < 0 || setresgid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 ||
        setresuid(0, 0, 0) < 0)
        CHILD_FAIL("root of the user namespace");
    if (mkdir("usr", 0755) < 0 || bind_ro("/usr", "usr") < 0)
        CHILD_FAIL("/usr");
    static const char *links[] = {"bin", "lib", "lib64", "sbin"};
    char target[32];
    for (int i = 0; i < 4; i++) {
        snprintf(target, sizeof(target), "usr/%s", links[i]);
        if (symlink(target, links[i]) < 0)
            CHILD_FAIL("links");
    }
    if (mkdir("proc", 0555) < 0 ||
        mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        CHILD_FAIL("/proc");
    int fd;
    if (mkdir("dev", 0755) < 0 || (fd = open("dev/null", O_WRONLY | O_CREAT | O_EXCL, 0666)) < 0 ||
        close(fd) < 0 || mount("/dev/null", "dev/null", NULL, MS_BIND, NULL) < 0)
        CHILD_FAIL("/dev/null");
    if (mkdir("tmp", 01777) < 0)
        CHILD_FAIL("/tmp");
    if (sethostname("nrx-floor", 9) < 0)
        CHILD_FAIL("hostname");
    if (loopback_up() < 0)
        CHILD_FAIL("lo up");
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        CHILD_FAIL("pivot_root");
    if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        CHILD_FAIL("old root");

    pid_t p = fork();
    if (p < 0)
        CHILD_FAIL("fork");
    if (p == 0) {
        char *argv[] = {"true", NULL}, *envp[] = {"PATH=/usr/bin:/bin", NULL};
        execve("/usr/bin/true", argv, envp);
        _exit(127);
    }
    int st;
    if (waitpid(p, &st, 0) < 0)
        CHILD_FAIL("waitpid");
    c = WIFEXITED(st) ? (char)WEXITSTATUS(st) : (char)126;
    if (write(a->report, &c, 1) != 1)
        _exit(4);
    for (;;)
        pause(); /* idle, like a session waiting for its next exec, until killed */
}

/* ---- the host side ------------------------------------------------------------------ */

static char cg_path[NCTRL][512];
static char mnt_path[512];
static pid_t cur_pid;
static unsigned char pk[2][crypto_sign_PUBLICKEYBYTES], sk[2][crypto_sign_SECRETKEYBYTES];

static void cgroup_file(char *out, size_t len, int ctrl, const char *file)
{
    snprintf(out, len, "%.500s/%s", cg_path[ctrl], file);
}

static void wait_frozen(void)
{
    char path[600], buf[32];
    cgroup_file(path, sizeof(path), 3, "freezer.state");
    if (put(path, "FROZEN") < 0)
        die("freeze");
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
        if (fd >= 0)
            close(fd);
        if (n < 0)
            die("freezer.state");
        buf[n] = 0;
        if (!strncmp(buf, "FROZEN", 6))
            return;
        usleep(100);
    }
}

static void rmdir_retry(const char *path)
{
    for (int i = 0; rmdir(path) < 0; i++) {
        if (errno != EBUSY || i > 2000)
            die("rmdir %s", path);
        usleep(50); /* the dying tasks leave the cgroup asynchronously */
    }
}

/* one lifecycle; phase[] gets the ms of create + exec `true`, destroy, proof */
static double lifecycle(unsigned long i, double phase[3])
{
    double t0 = now_ms();
    char path[600], text[2048];

    /* 1. cgroups */
    for (int k = 0; k < NCTRL; k++) {
        snprintf(cg_path[k], sizeof(cg_path[k]), "/sys/fs/cgroup/%s/%s/s%lu", CTRLS[k], prefix, i);
        if (mkdir(cg_path[k], 0755) < 0)
            die("mkdir %s", cg_path[k]);
    }
    cgroup_file(path, sizeof(path), 0, "memory.limit_in_bytes");
    if (put(path, "268435456") < 0)
        die("memory limit");
    cgroup_file(path, sizeof(path), 1, "pids.max");
    if (put(path, "64") < 0)
        die("pids.max");
    cgroup_file(path, sizeof(path), 2, "cpu.cfs_quota_us");
    if (put(path, "100000") < 0)
        die("cpu quota");

    /* 2. the session tmpfs at a host path */
    snprintf(mnt_path, sizeof(mnt_path), "%s/s%lu", workdir, i);
    if (mkdir(mnt_path, 0755) < 0)
        die("mkdir %s", mnt_path);
    snprintf(text, sizeof(text), "size=67108864,nr_inodes=4096,mode=0755,uid=%lu,gid=%lu",
             uid_base, uid_base);
    if (mount("tmpfs", mnt_path, "tmpfs", MS_NOSUID | MS_NODEV, text) < 0)
        die("mount tmpfs");

    /* 3. PID 1 in six new namespaces (the seventh, cgroup, it makes itself) */
    int go[2], report[2];
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(report, O_CLOEXEC) < 0)
        die("pipe");
    static char stack[256 * 1024] __attribute__((aligned(16)));
    struct child_args a = {go[0], report[1], mnt_path};
    pid_t pid = clone(sandbox_main, stack + sizeof(stack),
                      CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC |
                          CLONE_NEWUTS | SIGCHLD,
                      &a);
    if (pid < 0)
        die("clone");
    cur_pid = pid;
    close(go[0]);
    close(report[1]);
    snprintf(path, sizeof(path), "/proc/%d/uid_map", pid);
    snprintf(text, sizeof(text), "0 %lu 65536\n", uid_base);
    if (put(path, text) < 0)
        die("uid_map");
    snprintf(path, sizeof(path), "/proc/%d/gid_map", pid);
    if (put(path, text) < 0)
        die("gid_map");
    snprintf(text, sizeof(text), "%d", pid);
    for (int k = 0; k < NCTRL; k++) {
        cgroup_file(path, sizeof(path), k, "tasks");
        if (put(path, text) < 0)
            die("attach %s", path);
    }
    if (write(go[1], "g", 1) != 1)
        die("release");
    close(go[1]);

    /* 4. `true` ran inside */
    char status;
    if (read(report[0], &status, 1) != 1 || status != 0) {
        errno = EPROTO;
        die("sandbox did not run true (status %d)", status);
    }
    close(report[0]);

    /* 5. destroy */
    double t_exec = now_ms();
    wait_frozen();
    if (kill(pid, SIGKILL) < 0)
        die("kill");
    cgroup_file(path, sizeof(path), 3, "freezer.state");
    if (put(path, "THAWED") < 0)
        die("thaw");
    if (waitpid(pid, NULL, 0) < 0)
        die("waitpid");
    cur_pid = 0;
    if (umount2(mnt_path, 0) < 0 || rmdir(mnt_path) < 0)
        die("umount %s", mnt_path);
    mnt_path[0] = 0;
    cgroup_file(path, sizeof(path), 0, "memory.force_empty");
    if (put(path, "0") < 0)
        die("force_empty");
    for (int k = 0; k < NCTRL; k++) {
        rmdir_retry(cg_path[k]);
        cg_path[k][0] = 0;
    }

    /* 6. two signatures, the proof fsynced */
    double t_destroy = now_ms();
    int n = snprintf(text, sizeof(text), "{\"session\":\"s%lu\",\"steps\":[", i);
    for (int s = 0; s < 8; s++)
        n += snprintf(text + n, sizeof(text) - n,
                      "{\"step\":%d,\"status\":\"verified\",\"evidence\":\"%0128d\"},", s, s);
    n += snprintf(text + n, sizeof(text) - n, "{}]}");
    unsigned char sig[2][crypto_sign_BYTES];
    for (int k = 0; k < 2; k++)
        crypto_sign_detached(sig[k], NULL, (unsigned char *)text, (size_t)n, sk[k]);
    char tmp[600], final[600];
    snprintf(tmp, sizeof(tmp), "%s/proofs/.s%lu.tmp", workdir, i);
    snprintf(final, sizeof(final), "%s/proofs/s%lu.json", workdir, i);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, text, (size_t)n) != n || write(fd, sig, sizeof(sig)) != sizeof(sig) ||
        fsync(fd) < 0 || close(fd) < 0 || rename(tmp, final) < 0)
        die("proof");
    snprintf(path, sizeof(path), "%s/proofs", workdir);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) < 0 || close(dfd) < 0)
        die("proof dir");
    double t1 = now_ms();
    unlink(final); /* bookkeeping of the bench, not timed */
    phase[0] = t_exec - t0;
    phase[1] = t_destroy - t_exec;
    phase[2] = t1 - t_destroy;
    return t1 - t0;
}

static void one(unsigned long i)
{
    double phase[3];
    double total = lifecycle(i, phase);
    printf("%.3f %.3f %.3f %.3f\n", total, phase[0], phase[1], phase[2]);
}

/* on exit, also after a failure halfway through a lifecycle: nothing stays behind */
static void cleanup(void)
{
    char path[600];
    if (cur_pid > 0) {
        kill(cur_pid, SIGKILL);
        cgroup_file(path, sizeof(path), 3, "freezer.state");
        put(path, "THAWED");
        waitpid(cur_pid, NULL, 0);
    }
    if (mnt_path[0]) {
        umount2(mnt_path, MNT_DETACH);
        rmdir(mnt_path);
    }
    for (int k = 0; k < NCTRL; k++)
        if (cg_path[k][0])
            for (int t = 0; rmdir(cg_path[k]) < 0 && errno == EBUSY && t < 2000; t++)
                usleep(50);
    for (int k = 0; k < NCTRL; k++) {
        snprintf(path, sizeof(path), "/sys/fs/cgroup/%s/%s", CTRLS[k], prefix);
        rmdir(path);
    }
    snprintf(path, sizeof(path), "%s/proofs", workdir);
    rmdir(path);
}

int main(int argc, char **argv)
{
    unsigned long count = 10;
    int opt;
    while ((opt = getopt(argc, argv, "n:u:p:d:")) != -1) {
        switch (opt) {
        case 'n': count = strtoul(optarg, NULL, 10); break;
        case 'u': uid_base = strtoul(optarg, NULL, 10); break;
        case 'p': prefix = optarg; break;
        case 'd': workdir = optarg; break;
        default: goto usage;
        }
    }
    if (!prefix || !workdir || uid_base < 65536) {
usage:
        fprintf(stderr, "usage: nrx-floor -n COUNT -u UID_BASE -p CGROUP_PREFIX -d WORKDIR\n");
        return 2;
    }
    if (sodium_init() < 0)
        die("sodium_init");
    for (int k = 0; k < 2; k++)
        crypto_sign_keypair(pk[k], sk[k]);
    atexit(cleanup);
    char path[600];
    for (int k = 0; k < NCTRL; k++) {
        snprintf(path, sizeof(path), "/sys/fs/cgroup/%s/%s", CTRLS[k], prefix);
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            die("mkdir %s", path);
    }
    snprintf(path, sizeof(path), "%s/proofs", workdir);
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        die("mkdir %s", path);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (count) {
        for (unsigned long i = 0; i < count; i++)
            one(i);
        return 0;
    }
    /* -n 0: one lifecycle per line read on stdin, until EOF (so a caller can alternate
     * the floor with other runs without paying a process start each time) */
    char line[16];
    for (unsigned long i = 0; fgets(line, sizeof(line), stdin); i++)
        one(i);
    return 0;
}
