/* Seccomp probe (bubblewrap-style): tries ONE syscall, named on the command line, and
 * exits with the errno it got (0 on success).  Used only inside a nanorix sandbox by
 * tests/test_seccomp_sandbox.py; it refuses to run anywhere else (exit 200), because
 * some of these calls would change the host if a filter were missing.
 *
 *   probe NAME     -> exit errno (0 = the call succeeded)
 *   probe -l       -> list the known names
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x80
#endif

static int in_sandbox(void)
{
    char host[256] = {0}, comm[64] = {0};
    if (gethostname(host, sizeof host - 1) != 0 || strncmp(host, "nrx-", 4) != 0)
        return 0;
    int fd = open("/proc/1/comm", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, comm, sizeof comm - 1);
    close(fd);
    return n > 0 && strcmp(comm, "nrx-init\n") == 0;
}

/* a raw syscall's result as an exit status: 0 on success, else errno */
static int rc(long r)
{
    return r < 0 ? errno : 0;
}

static int do_clone(unsigned long flags)
{
    /* fork-like raw clone; the child (if the filter let it through) exits at once */
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0)
        _exit(0);
    if (pid < 0)
        return errno;
    waitpid((pid_t)pid, NULL, 0);
    return 0;
}

static int do_socket(int family, int type, int proto)
{
    int fd = socket(family, type, proto);
    if (fd < 0)
        return errno;
    close(fd);
    return 0;
}

static int foreign_abi(void)
{
#if defined(__x86_64__)
    long ret;
    /* i386 getpid through int 0x80: a foreign-architecture syscall */
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20) : "memory");
    return ret < 0 ? (int)-ret : 0;
#else
    return 95; /* EOPNOTSUPP: no foreign ABI to try on this architecture */
#endif
}

static int x32_abi(void)
{
#if defined(__x86_64__)
    return rc(syscall(0x40000000 | SYS_getpid));
#else
    return 95;
#endif
}

struct probe {
    const char *name;
    int (*fn)(void);
};

#define P(n, expr) static int p_##n(void) { return (expr); }
P(mount, rc(syscall(SYS_mount, "none", "/tmp", "tmpfs", 0UL, NULL)))
P(umount2, rc(syscall(SYS_umount2, "/tmp", 0)))
P(pivot_root, rc(syscall(SYS_pivot_root, ".", ".")))
P(chroot, rc(syscall(SYS_chroot, "/tmp")))
P(fsopen, rc(syscall(SYS_fsopen, "tmpfs", 0)))
P(open_tree, rc(syscall(SYS_open_tree, AT_FDCWD, "/tmp", 0)))
P(move_mount, rc(syscall(SYS_move_mount, -1, "", -1, "", 0)))
P(unshare_user, rc(syscall(SYS_unshare, CLONE_NEWUSER)))
P(unshare_ns, rc(syscall(SYS_unshare, CLONE_NEWNS)))
P(setns, rc(syscall(SYS_setns, open("/proc/self/ns/uts", O_RDONLY), 0)))
P(ptrace, rc(syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0)))
P(process_vm_readv, ({
    char a[8], b[8] = "x";
    struct iovec l = {a, 1}, r = {b, 1};
    rc(syscall(SYS_process_vm_readv, getpid(), &l, 1UL, &r, 1UL, 0UL));
}))
P(process_vm_writev, ({
    char a[8] = "x", b[8];
    struct iovec l = {a, 1}, r = {b, 1};
    rc(syscall(SYS_process_vm_writev, getpid(), &l, 1UL, &r, 1UL, 0UL));
}))
P(keyctl, rc(syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0)))
P(add_key, rc(syscall(SYS_add_key, "user", "nrx", "x", 1, -3)))
P(request_key, rc(syscall(SYS_request_key, "user", "nrx", NULL, 0)))
P(bpf, ({ char attr[128] = {0}; rc(syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, attr, sizeof attr)); }))
P(perf_event_open, ({ char attr[128] = {0}; rc(syscall(SYS_perf_event_open, attr, 0, -1, -1, 0)); }))
P(io_uring_setup, ({ char params[120] = {0}; rc(syscall(SYS_io_uring_setup, 1, params)); }))
P(io_uring_enter, rc(syscall(SYS_io_uring_enter, -1, 0, 0, 0, NULL, 0)))
P(io_uring_register, rc(syscall(SYS_io_uring_register, -1, 0, NULL, 0)))
P(userfaultfd, rc(syscall(SYS_userfaultfd, 0)))
P(kexec_load, rc(syscall(SYS_kexec_load, 0UL, 0UL, NULL, 0UL)))
P(kexec_file_load, rc(syscall(SYS_kexec_file_load, -1, -1, 0UL, "", 0UL)))
P(init_module, rc(syscall(SYS_init_module, NULL, 0UL, "")))
P(finit_module, rc(syscall(SYS_finit_module, -1, "", 0)))
P(delete_module, rc(syscall(SYS_delete_module, "nrx_none", 0)))
P(reboot, rc(syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                     LINUX_REBOOT_CMD_CAD_OFF, NULL)))
P(swapon, rc(syscall(SYS_swapon, "/tmp/nrx-none", 0)))
P(swapoff, rc(syscall(SYS_swapoff, "/tmp/nrx-none")))
P(clone3, ({ char args[88] = {0}; rc(syscall(SYS_clone3, args, sizeof args)); }))
P(clone_newuser, do_clone(CLONE_NEWUSER))
P(clone_newns, do_clone(CLONE_NEWNS))
P(clone_newnet, do_clone(CLONE_NEWNET))
P(clone_newpid, do_clone(CLONE_NEWPID))
P(clone_fork, do_clone(0))
P(ioctl_tiocsti, ({ char c = 'x'; rc(syscall(SYS_ioctl, 0, TIOCSTI, &c)); }))
P(ioctl_tiocsti_hi, ({ char c = 'x'; rc(syscall(SYS_ioctl, 0, 0x100000000UL | TIOCSTI, &c)); }))
P(ioctl_tcgets, ({ struct termios t; rc(syscall(SYS_ioctl, 0, TCGETS, &t)); }))
P(socket_unix, do_socket(AF_UNIX, SOCK_STREAM, 0))
P(socket_inet, do_socket(AF_INET, SOCK_STREAM, 0))
P(socket_inet6, do_socket(AF_INET6, SOCK_DGRAM, 0))
P(socket_inet_raw, do_socket(AF_INET, SOCK_RAW, 1 /* IPPROTO_ICMP */))
P(socket_tcp, do_socket(AF_INET, SOCK_STREAM, 6 /* IPPROTO_TCP */))
P(socket_udp6, do_socket(AF_INET6, SOCK_DGRAM, 17 /* IPPROTO_UDP */))
P(socket_mptcp, do_socket(AF_INET, SOCK_STREAM, 262 /* IPPROTO_MPTCP */))
P(socket_mptcp6, do_socket(AF_INET6, SOCK_STREAM, 262 /* IPPROTO_MPTCP */))
P(socket_udplite, do_socket(AF_INET, SOCK_DGRAM, 136 /* IPPROTO_UDPLITE */))
P(socket_sctp, do_socket(AF_INET, SOCK_STREAM, 132 /* IPPROTO_SCTP */))
P(socket_netlink, do_socket(AF_NETLINK, SOCK_RAW, 0))
P(socket_packet, do_socket(AF_PACKET, SOCK_RAW, 0))
P(socket_vsock, do_socket(AF_VSOCK, SOCK_STREAM, 0))
P(socket_alg, do_socket(AF_ALG, SOCK_SEQPACKET, 0))
P(personality_query, rc(syscall(SYS_personality, 0xffffffffUL)))
P(personality_linux, rc(syscall(SYS_personality, (unsigned long)PER_LINUX)))
P(personality_linux32, rc(syscall(SYS_personality, (unsigned long)PER_LINUX32)))
P(personality_rie, rc(syscall(SYS_personality, (unsigned long)READ_IMPLIES_EXEC)))
P(open_by_handle_at, rc(syscall(SYS_open_by_handle_at, -1, NULL, 0)))
P(memfd_create, ({ long fd = syscall(SYS_memfd_create, "nrx", 0); if (fd >= 0) close((int)fd); rc(fd); }))
P(getpid, rc(syscall(SYS_getpid)))
P(foreign_abi, foreign_abi())
P(x32_abi, x32_abi())

#define E(n) {#n, p_##n}
static const struct probe probes[] = {
    E(mount), E(umount2), E(pivot_root), E(chroot), E(fsopen), E(open_tree), E(move_mount),
    E(unshare_user), E(unshare_ns), E(setns), E(ptrace), E(process_vm_readv),
    E(process_vm_writev), E(keyctl), E(add_key), E(request_key), E(bpf), E(perf_event_open),
    E(io_uring_setup), E(io_uring_enter), E(io_uring_register), E(userfaultfd),
    E(kexec_load), E(kexec_file_load), E(init_module), E(finit_module), E(delete_module),
    E(reboot), E(swapon), E(swapoff), E(clone3), E(clone_newuser), E(clone_newns),
    E(clone_newnet), E(clone_newpid), E(clone_fork), E(ioctl_tiocsti), E(ioctl_tiocsti_hi),
    E(ioctl_tcgets), E(socket_unix), E(socket_inet), E(socket_inet6), E(socket_inet_raw),
    E(socket_tcp), E(socket_udp6), E(socket_mptcp), E(socket_mptcp6), E(socket_udplite),
    E(socket_sctp), E(socket_netlink), E(socket_packet), E(socket_vsock), E(socket_alg),
    E(personality_query), E(personality_linux), E(personality_linux32), E(personality_rie),
    E(open_by_handle_at), E(memfd_create), E(getpid), E(foreign_abi), E(x32_abi),
};

int main(int argc, char **argv)
{
    if (argc != 2)
        return 201;
    if (strcmp(argv[1], "-l") == 0) {
        for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++)
            puts(probes[i].name);
        return 0;
    }
    if (!in_sandbox()) {
        fprintf(stderr, "probe: refusing to run outside a nanorix sandbox\n");
        return 200;
    }
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++)
        if (strcmp(argv[1], probes[i].name) == 0)
            return probes[i].fn();
    return 202;
}
