/* nrx-init, PID 1 loop: runs commands on request, reaps every process, dies with the agent.
 *
 * fd 3 is the lifeline: when the agent closes its end (or dies), recv() returns 0 and
 * PID 1 kills everything in the sandbox and exits, which ends the PID namespace — unless
 * the agent gave it a re-attach socket and a grace (issue 12): then only the command in
 * flight is killed, and PID 1 waits that long for a restarted agent to connect to the
 * socket and send ATTACH, which makes the new connection the lifeline.
 * Each EXEC starts one command (clone with CLONE_VM | CLONE_VFORK, see run_command) in its
 * own process group, drops to the sandbox user with no capabilities, no_new_privs, rlimits
 * and the seccomp filter, then execs it.
 * A warm-pool sandbox (T_UNBOUND, issue 18) refuses EXEC until one BIND gave it its
 * session's hostname, and ends at once when the lifeline closes before that (it never
 * held anything of a customer: there is nothing to re-adopt).
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static pid_t leader; /* the running command, 0 when idle */
/* the running command's EXEC_TAG (issue 12): handed back to a re-attaching agent when the
 * agent died during the command, which PID 1 then killed */
static unsigned char leader_tag[1024];
static uint32_t leader_tag_len;
/* The command killed at the agent's death, until reported.  One struct, found by its
 * magic in this process's initialised data: a restarted agent that cannot ask PID 1
 * (the sandbox stalled at its memory cap while the agent was down, PID 1 charged to the
 * same cgroup) reads it from /proc/1's memory with the sandbox frozen, and clears
 * `leader` once the exec is on its record (agent/sandbox/initrecord.py). */
struct cut_record {
    char magic[16];
    volatile int32_t leader;
    volatile int32_t reaped;
    volatile int32_t status;
    volatile uint32_t tag_len;
    unsigned char tag[1024];
};
static struct cut_record cut = {.magic = "nrx-init-cut/1"};

/* The command is started like posix_spawn: clone(CLONE_VM | CLONE_VFORK) on a stack of its
 * own, so PID 1's page tables are neither copied nor torn down again at the execve, and
 * PID 1 resumes only when the child has exec'd or exited.  Until then the child shares
 * PID 1's memory: it writes why it failed into `spawn_err` (no error pipe), calls nothing
 * that allocates, and uses raw syscalls for the credential changes (no glibc setxid
 * machinery).  Its own signal dispositions, fd table, rlimits, credentials, cwd and umask
 * are its own (no CLONE_SIGHAND, CLONE_FILES, CLONE_THREAD, CLONE_FS). */
static char spawn_stack[64 * 1024] __attribute__((aligned(16)));
static char spawn_err[256];
/* signals not at SIG_DFL in PID 1 (SIGPIPE ignored, and whatever it inherited ignored):
 * execve keeps an ignored one, so the child resets these; every other one is SIG_DFL */
static int changed_sigs[NSIG];
static int n_changed_sigs;
static int devnull = -1; /* opened once: the command's stdin */

/* the kernel's sigaction: glibc refuses its two internal signals (32, 33), which may still
 * arrive ignored from the agent and would stay ignored across execve */
struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

static int raw_sigaction(int sig, const struct ksigaction *act, struct ksigaction *old)
{
    return (int)syscall(SYS_rt_sigaction, sig, act, old, sizeof(uint64_t));
}

struct spawn {
    struct config *c;
    int out, err;
    char **argv, **envp;
    const char *cwd;
};

/* the child: report the failing step in `spawn_err` and exit */
static void __attribute__((noreturn)) child_fail(const char *step)
{
    const char *parts[3] = {step, ": ", strerror(errno)};
    size_t n = 0;
    for (int i = 0; i < 3; i++)
        for (const char *t = parts[i]; *t && n < sizeof(spawn_err) - 1; t++)
            spawn_err[n++] = *t;
    spawn_err[n] = 0;
    _exit(127);
}

/* Fail closed: the command never runs without its seccomp filter in force.  A config
 * without one is refused at start (parse_config); this is the last line, right before
 * execve. */
static void load_filter(const struct config *c)
{
    if (!c->bpf || !c->bpf_len) {
        errno = EPERM;
        child_fail("seccomp filter missing, refusing to run the command");
    }
    struct sock_fprog prog = {(unsigned short)(c->bpf_len / sizeof(struct sock_filter)),
                              (struct sock_filter *)c->bpf};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
        child_fail("loading the seccomp filter");
}

static int run_command(void *arg)
{
    const struct spawn *sp = arg;
    const struct config *c = sp->c;
    unsigned id = c->sandbox_id;
    sigset_t none;

    /* own session and process group, no controlling terminal (no TIOCSTI target) */
    if (setsid() < 0)
        child_fail("setsid");
    int null = devnull >= 0 ? devnull : open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0 || dup2(sp->out, 1) < 0 || dup2(sp->err, 2) < 0)
        child_fail("stdio");
    /* nothing of PID 1 (the control socket above all) survives the execve */
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        child_fail("close_range");

    struct rlimit core = {0, 0}, nofile = {c->nofile, c->nofile};
    struct rlimit fsize = {RLIM_INFINITY, RLIM_INFINITY};
    if (c->fsize)
        fsize.rlim_cur = fsize.rlim_max = c->fsize;
    if (setrlimit(RLIMIT_CORE, &core) < 0 || setrlimit(RLIMIT_NOFILE, &nofile) < 0 ||
        setrlimit(RLIMIT_FSIZE, &fsize) < 0)
        child_fail("setrlimit");

    /* the bounding set is already empty: PID 1 dropped it once (setup_sandbox) */
    if (syscall(SYS_setgroups, 0, NULL) < 0)
        child_fail("setgroups");
    if (syscall(SYS_setresgid, id, id, id) < 0 || syscall(SYS_setresuid, id, id, id) < 0)
        child_fail("switching to the sandbox user");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        child_fail("clearing ambient capabilities");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capset, &hdr, data) < 0)
        child_fail("clearing capabilities");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_fail("no_new_privs");
    if (chdir(sp->cwd) < 0)
        child_fail("chdir");

    /* files the command creates are its own: 0600/0700 unless it asks otherwise */
    umask(077);
    const struct ksigaction dfl = {SIG_DFL, 0, NULL, 0};
    for (int i = 0; i < n_changed_sigs; i++)
        raw_sigaction(changed_sigs[i], &dfl, NULL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    load_filter(c);
    execve(sp->argv[0], sp->argv, sp->envp);
    child_fail("execve");
}

static void handle_exec(struct config *c, const unsigned char *body, size_t len, int out, int err)
{
    char *argv[256], *envp[256], *cwd = NULL;
    int na = 0, ne = 0;
    struct tlv_iter it = {body, body + len};
    uint32_t tag, l;
    const unsigned char *v;
    int r;
    uint32_t tag_len = 0;
    const unsigned char *tag_val = NULL;
    while ((r = tlv_next(&it, &tag, &l, &v)) > 0) {
        if (tag == T_EXEC_TAG && l <= sizeof(leader_tag)) { tag_val = v; tag_len = l; }
        else if (tag == T_ARG && na < 255) argv[na++] = tlv_str(v, l);
        else if (tag == T_ENV && ne < 255) envp[ne++] = tlv_str(v, l);
        else if (tag == T_CWD) cwd = tlv_str(v, l);
    }
    argv[na] = NULL;
    envp[ne] = NULL;
    if (r < 0 || na == 0 || out < 0 || err < 0 || leader || c->unbound) {
        /* fail closed: a pooled sandbox runs nothing before it has its session's identity */
        send_text(CONTROL_FD, MSG_EXEC_FAIL, r < 0 ? "malformed exec request"
                  : c->unbound ? "sandbox not bound to a session"
                  : leader ? "a command is already running" : "exec request without argv/fds");
        goto out;
    }
    struct spawn sp = {c, out, err, argv, envp, cwd ? cwd : "/work"};
    sigset_t all, old;
    /* no signal may run a handler of PID 1 in the child that shares its memory */
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old);
    spawn_err[0] = 0;
    pid_t pid = clone(run_command, spawn_stack + sizeof(spawn_stack),
                      CLONE_VM | CLONE_VFORK | SIGCHLD, &sp);
    int e = errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        send_text(CONTROL_FD, MSG_EXEC_FAIL, "clone: %s", strerror(e));
    } else if (spawn_err[0]) {
        /* the child exits 127; it is reaped by the SIGCHLD path but not reported */
        send_text(CONTROL_FD, MSG_EXEC_FAIL, "%s", spawn_err);
    } else {
        /* here the child has exec'd: its setsid() is done */
        leader = pid;
        leader_tag_len = tag_len;
        if (tag_len)
            memcpy(leader_tag, tag_val, tag_len);
        send_ints(CONTROL_FD, MSG_STARTED, pid, 0, 1);
    }
out:
    for (int i = 0; i < na; i++) free(argv[i]);
    for (int i = 0; i < ne; i++) free(envp[i]);
    free(cwd);
    if (out >= 0) close(out);
    if (err >= 0) close(err);
}

/* BIND (issue 18): a warm-pool sandbox takes its session's hostname (UTS name, /etc/hostname,
 * /etc/hosts), once, before any command ran in it.  Answers BOUND with 0 or an errno. */
static void handle_bind(struct config *c, const unsigned char *body, size_t len)
{
    struct tlv_iter it = {body, body + len};
    uint32_t tag, l;
    const unsigned char *v;
    char *hostname = NULL;
    int r, e = 0;
    while ((r = tlv_next(&it, &tag, &l, &v)) > 0)
        if (tag == T_HOSTNAME && !hostname)
            hostname = tlv_str(v, l);
    if (!c->unbound)
        e = EALREADY; /* bound at creation or by an earlier BIND: identity never changes */
    else if (r < 0 || !hostname)
        e = EINVAL;
    else if (set_identity(hostname) < 0)
        e = errno ? errno : EIO;
    else
        c->unbound = 0;
    free(hostname);
    send_ints(CONTROL_FD, MSG_BOUND, e, 0, 1);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The agent's end of the lifeline closed.  Without a re-attach socket the sandbox ends
 * at once.  With one, the command in flight (if any) is killed (its output had nowhere
 * to go) and remembered, and PID 1 waits `orphan_grace_ms` for a restarted agent. */
static void orphaned(struct config *c)
{
    if (c->attach_fd < 0 || !c->orphan_grace_ms || c->unbound) {
        kill(-1, SIGKILL);
        _exit(0);
    }
    close(CONTROL_FD);
    if (leader) {
        kill(-leader, SIGKILL);
        cut.leader = leader;
        cut.reaped = 0;
        cut.tag_len = leader_tag_len;
        memcpy(cut.tag, leader_tag, leader_tag_len);
        leader = 0;
    }
}

/* An agent connected to the attach socket: its first message must be ATTACH; it then
 * becomes the lifeline (fd 3).  Returns 1 when attached. */
static int attach(struct config *c, int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    unsigned char msg[64];
    if (poll(&p, 1, 2000) != 1)
        return 0;
    ssize_t n = recv(fd, msg, sizeof(msg), 0);
    uint32_t type = 0;
    if (n >= 4)
        memcpy(&type, msg, 4);
    if (type != MSG_ATTACH)
        return 0;
    if (fd != CONTROL_FD && dup2(fd, CONTROL_FD) < 0) /* accept4 may have reused fd 3 */
        return 0;
    fcntl(CONTROL_FD, F_SETFD, FD_CLOEXEC);
    unsigned char out[12 + sizeof(cut.tag)];
    int32_t v[3] = {cut.leader ? 1 : 0, cut.reaped ? cut.status : (int32_t)SIGKILL,
                    c->root_view_fd};
    memcpy(out, v, 12);
    uint32_t len = cut.leader ? cut.tag_len : 0;
    memcpy(out + 12, cut.tag, len);
    send_msg(CONTROL_FD, MSG_ATTACHED, out, 12 + len);
    return 1;
}

void serve(struct config *c)
{
    int lost = 0;            /* the lifeline is gone; waiting for a re-attach */
    long long deadline = 0;
    static unsigned char buf[MAX_MSG];
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        _exit(1);
    for (int s = 1; s < NSIG; s++) {
        struct ksigaction sa;
        if (raw_sigaction(s, NULL, &sa) == 0 && sa.handler != (void *)SIG_DFL)
            changed_sigs[n_changed_sigs++] = s;
    }
    devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    fcntl(CONTROL_FD, F_SETFD, FD_CLOEXEC);

    for (;;) {
        struct pollfd p[3] = {{lost ? -1 : CONTROL_FD, POLLIN, 0}, {sfd, POLLIN, 0},
                              {lost ? c->attach_fd : -1, POLLIN, 0}};
        int wait_ms = -1;
        if (lost) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                /* no agent came back within the grace: end the sandbox as before */
                kill(-1, SIGKILL);
                _exit(0);
            }
            wait_ms = left > 1000000 ? 1000000 : (int)left;
        }
        int pr = poll(p, 3, wait_ms);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        if (pr == 0)
            continue;
        if (lost && p[2].revents) {
            int fd = accept4(c->attach_fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) {
                int ok = attach(c, fd);
                if (ok)
                    lost = 0;
                if (!ok || fd != CONTROL_FD)
                    close(fd);
            }
        }
        if (p[1].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) > 0) {
            }
            int st;
            pid_t pid;
            while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
                if (pid == cut.leader) {
                    cut.status = st;
                    cut.reaped = 1;
                }
                if (pid == leader) {
                    leader = 0;
                    send_ints(CONTROL_FD, MSG_EXITED, pid, st, 2);
                }
            }
        }
        if (p[0].revents) {
            union {
                struct cmsghdr h;
                char b[CMSG_SPACE(2 * sizeof(int))];
            } cm;
            struct iovec iov = {buf, sizeof(buf)};
            struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                                .msg_control = cm.b, .msg_controllen = sizeof(cm.b)};
            ssize_t n = recvmsg(CONTROL_FD, &mh, MSG_CMSG_CLOEXEC);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                /* lifeline: the agent is gone; end the sandbox, or keep it for a grace */
                orphaned(c);
                lost = 1;
                deadline = now_ms() + (long long)c->orphan_grace_ms;
                continue;
            }
            int fds[2] = {-1, -1}, nfds = 0;
            for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
                if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
                    nfds = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    if (nfds > 2)
                        nfds = 2;
                    memcpy(fds, CMSG_DATA(h), (size_t)nfds * sizeof(int));
                }
            }
            uint32_t type = 0;
            if (n >= 4)
                memcpy(&type, buf, 4);
            if (type == MSG_EXEC) {
                handle_exec(c, buf + 4, (size_t)n - 4, fds[0], fds[1]);
                continue;
            }
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            if (type == MSG_BIND)
                handle_bind(c, buf + 4, (size_t)n - 4);
            if (type == MSG_ADOPTED) {
                cut.leader = 0;
                cut.tag_len = 0;
            }
            if (type == MSG_SIGNAL && n >= 12) {
                int32_t v[2];
                memcpy(v, buf + 4, 8);
                if (v[0] > 1)
                    kill(-v[0], v[1]);
            }
        }
    }
}
