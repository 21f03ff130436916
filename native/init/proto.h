/* Wire protocol between the agent and nrx-init over a SOCK_SEQPACKET socket on fd 3.
 *
 * Every message starts with a uint32 type.  CONFIG and EXEC carry TLV records
 * (uint32 tag, uint32 length, bytes); replies carry fixed int32 fields or text.
 * Mirrored by agent/sandbox/initproto.py: change both together.
 */
#ifndef NRX_PROTO_H
#define NRX_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define CONTROL_FD 3
#define MAX_MSG (1024 * 1024)

enum msg_type {
    MSG_CONFIG = 1,    /* agent -> helper: TLV config */
    MSG_PID = 2,       /* helper -> agent: int32 host pid of the sandbox PID 1 */
    MSG_READY = 3,     /* PID 1 -> agent: setup done, serving */
    MSG_ERROR = 4,     /* helper or PID 1 -> agent: text; the sender exits */
    MSG_EXEC = 5,      /* agent -> PID 1: TLV (argv, env, cwd) + SCM_RIGHTS stdout, stderr */
    MSG_STARTED = 6,   /* PID 1 -> agent: int32 pid (= pgid) of the command */
    MSG_EXITED = 7,    /* PID 1 -> agent: int32 pid, int32 wait status */
    MSG_SIGNAL = 8,    /* agent -> PID 1: int32 pgid, int32 signal */
    MSG_EXEC_FAIL = 9, /* PID 1 -> agent: text (which step failed, errno) */
    MSG_ATTACH = 10,   /* agent -> PID 1, first message on an attach connection */
    MSG_ATTACHED = 11, /* PID 1 -> agent: int32 interrupted (0/1), int32 wait status,
                        * int32 fd number (in PID 1) of its host view of the session tmpfs
                        * (for pidfd_getfd; -1 if none), then the EXEC_TAG of the command
                        * the agent's death cut off */
    MSG_ADOPTED = 12,  /* agent -> PID 1: the cut-off command is on the record; forget it
                        * (until then every ATTACH reports it again) */
    MSG_BIND = 13,     /* agent -> PID 1 of a pooled (T_UNBOUND) sandbox: TLV T_HOSTNAME, the
                        * session's identity (issue 18); accepted once, before any EXEC */
    MSG_BOUND = 14,    /* PID 1 -> agent: int32 0, or the errno of the step that failed */
    MSG_GO = 15,       /* agent -> helper, after CONFIG: TLV T_CGROUP_PROCS (at least one),
                        * the session cgroups, made by the agent while the helper made the
                        * mount point, the tmpfs and the re-attach socket; only then does
                        * the helper join them and clone PID 1 (issue 18).  EOF instead:
                        * the agent gave up; the helper undoes its part and exits */
};

enum cfg_tag {
    T_HOSTNAME = 1,     /* string */
    T_ROOT = 2,         /* string: host path where the session tmpfs is mounted */
    T_TMPFS_SIZE = 3,   /* u64 */
    T_TMPFS_INODES = 4, /* u64 */
    T_UID_BASE = 5,     /* u32 host uid of uid 0 inside */
    T_GID_BASE = 6,     /* u32 */
    T_MAP_SIZE = 7,     /* u32 ids mapped */
    /* 8, 9: retired (read-only binds and links, now ops of the mount plan) */
    T_CGROUP_PROCS = 10,/* string path of a cgroup.procs to join, repeated (GO only) */
    T_OOM_SCORE = 11,   /* i32 */
    T_NOFILE = 12,      /* u64 */
    T_FSIZE = 13,       /* u64 (0 = unlimited) */
    T_SECCOMP = 14,     /* raw struct sock_filter[] */
    T_SANDBOX_ID = 15,  /* u32 uid/gid of the sandbox user inside */
    T_ATTACH_PATH = 16, /* string: host path of the re-attach socket (issue 12) */
    T_ORPHAN_GRACE_MS = 17, /* u64: how long PID 1 waits for a re-attach after EOF */
    T_UNBOUND = 18,     /* u64 1: a warm-pool sandbox; EXEC is refused until a BIND gave it
                         * its session's hostname (T_HOSTNAME is then a placeholder) */
    T_MOUNT_OP = 19,    /* one op of the mount plan (below), repeated, applied in order */
    /* EXEC */
    T_ARG = 20,         /* string, repeated */
    T_ENV = 21,         /* string "K=V", repeated */
    T_CWD = 22,         /* string */
    T_EXEC_TAG = 23,    /* bytes kept by PID 1 while the command runs (<= 1 KiB), handed
                         * back in ATTACHED when the agent died during the command */
};

/* ---- proto.c: shared by the host side (nrx-init.c) and the sandbox side ------------- */

struct tlv_iter {
    const unsigned char *p, *end;
};

/* returns 1 and fills tag/len/val, 0 at end, -1 on a malformed record */
int tlv_next(struct tlv_iter *it, uint32_t *tag, uint32_t *len, const unsigned char **val);
uint64_t tlv_u64(const unsigned char *val, uint32_t len);
/* copies a TLV string into a fresh NUL-terminated buffer (the value may hold inner NULs) */
char *tlv_str(const unsigned char *val, uint32_t len);

int send_msg(int fd, uint32_t type, const void *body, size_t len);
int send_ints(int fd, uint32_t type, int32_t a, int32_t b, int n);
int send_text(int fd, uint32_t type, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define MAX_LIST 64

/* The mount plan (agent/sandbox/mounts.py builds it): an ordered list of setup ops that
 * sandbox.c applies in the new mount namespace, inside the session tmpfs, before
 * pivot_root; the first op that fails stops the sandbox (nothing runs).  One T_MOUNT_OP
 * value: u32 kind, flags, mode, uid, gid, dest_len, arg_len, then dest, then arg.
 * `dest` is an absolute path inside the sandbox with no empty, "." or ".." component;
 * no op follows a symlink on the way to its dest. */
enum op_kind {
    OP_DIR = 1,     /* mkdir dest (mode), then chown to uid/gid unless NO_ID */
    OP_FILE = 2,    /* create dest (mode, must not exist) holding arg (<= MAX_OP_DATA), chown */
    OP_SYMLINK = 3, /* symlink dest -> arg (the link text) */
    OP_BIND = 4,    /* bind host path arg (absolute) onto the existing dest; then, if any of
                     * RO/NOSUID/NODEV/NOEXEC is set, remount it with those plus the flags the
                     * kernel locked on the source (a user namespace may not clear them) */
    OP_PROC = 5,    /* mount a proc (nosuid, nodev, noexec) on the existing directory dest */
};
#define OPF_RO 1u
#define OPF_NOSUID 2u
#define OPF_NODEV 4u
#define OPF_NOEXEC 8u
#define OPF_REC 16u /* bind with MS_REC (submounts too) */
#define OPF_ALL 31u
#define NO_ID 0xFFFFFFFFu
#define MAX_OPS 256
#define MAX_OP_PATH 1024
#define MAX_OP_DATA 4096

struct mount_op {
    uint32_t kind, flags, mode, uid, gid, arg_len;
    char *dest, *arg; /* NUL-terminated copies */
};

struct config {
    char *hostname, *root;
    uint64_t tmpfs_size, tmpfs_inodes, nofile, fsize;
    uint32_t uid_base, gid_base, map_size, sandbox_id;
    int32_t oom_score;
    struct mount_op *ops; int n_ops;          /* the mount plan, in order */
    char *cgroups[MAX_LIST]; int n_cgroups;
    unsigned char *bpf; uint32_t bpf_len;
    char *attach_path;        /* NULL: no re-attach, EOF on the lifeline ends the sandbox */
    uint64_t orphan_grace_ms;
    int attach_fd;            /* listening socket inherited by PID 1, -1 when none */
    int root_view_fd;         /* O_PATH on the tmpfs root as the agent's namespace saw it
                               * (no submounts), kept by PID 1 for a re-adopting agent */
    int unbound;              /* pooled, no session yet: EXEC refused until BIND */
};

/* 0, -1 when malformed (a mount op out of bounds, of unknown kind or with a bad path, an
 * empty mount plan, an unknown tag), -2 when it carries no usable seccomp filter (fail closed: the
 * sandbox is not built) */
int parse_config(const unsigned char *buf, size_t len, struct config *c);
/* the body of GO into c->cgroups: 0, or -1 when malformed (a tag other than
 * T_CGROUP_PROCS, more than MAX_LIST of them, or none: no sandbox outside its cgroups) */
int parse_go(const unsigned char *buf, size_t len, struct config *c);

/* sandbox.c: runs in the cloned child; builds the root, returns 0 or -1 with a message sent */
int setup_sandbox(struct config *c);
/* sandbox.c: the hostname and the /etc files that name it (paths relative to the cwd,
 * the new root, both during setup and in PID 1 after pivot_root); 0 or -1 with errno */
int set_identity(const char *hostname);
/* serve.c: PID 1 main loop; never returns */
void serve(struct config *c) __attribute__((noreturn));

#endif
