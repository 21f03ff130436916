/* nrx-init, the wire protocol's helpers (TLV records, messages, the CONFIG parser),
 * shared by the host side (nrx-init.c) and the sandbox side (sandbox.c, serve.c), so that
 * neither of those depends on the other for them.  Formats: proto.h.
 */
#include <errno.h>
#include <linux/filter.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "proto.h"

int tlv_next(struct tlv_iter *it, uint32_t *tag, uint32_t *len, const unsigned char **val)
{
    if (it->p == it->end)
        return 0;
    if (it->end - it->p < 8)
        return -1;
    memcpy(tag, it->p, 4);
    memcpy(len, it->p + 4, 4);
    if ((size_t)(it->end - it->p - 8) < *len)
        return -1;
    *val = it->p + 8;
    it->p += 8 + *len;
    return 1;
}

uint64_t tlv_u64(const unsigned char *val, uint32_t len)
{
    uint64_t v = 0;
    memcpy(&v, val, len < 8 ? len : 8);
    return v;
}

char *tlv_str(const unsigned char *val, uint32_t len)
{
    char *s = malloc(len + 1);
    if (!s)
        return NULL;
    memcpy(s, val, len);
    s[len] = 0;
    return s;
}

int send_msg(int fd, uint32_t type, const void *body, size_t len)
{
    unsigned char buf[4096];
    if (len > sizeof(buf) - 4)
        len = sizeof(buf) - 4;
    memcpy(buf, &type, 4);
    if (len)
        memcpy(buf + 4, body, len);
    ssize_t n;
    do
        n = send(fd, buf, len + 4, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -1 : 0;
}

int send_ints(int fd, uint32_t type, int32_t a, int32_t b, int n)
{
    int32_t v[2] = {a, b};
    return send_msg(fd, type, v, (size_t)n * 4);
}

int send_text(int fd, uint32_t type, const char *fmt, ...)
{
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(text))
        n = sizeof(text) - 1;
    return send_msg(fd, type, text, (size_t)n);
}

/* `p` (len bytes, no NUL) is an absolute path whose components are neither empty nor
 * "." nor "..": it names one place and never climbs out of it */
static int path_ok(const char *p, size_t len)
{
    if (len < 2 || len > MAX_OP_PATH || p[0] != '/' || memchr(p, 0, len))
        return 0;
    for (size_t i = 1, start = 1; i <= len; i++) {
        if (i < len && p[i] != '/')
            continue;
        size_t n = i - start;
        if (n == 0 || (n == 1 && p[start] == '.') ||
            (n == 2 && p[start] == '.' && p[start + 1] == '.'))
            return 0;
        start = i + 1;
    }
    return 1;
}

/* one T_MOUNT_OP value (format and rules: proto.h); 0, or -1 when it breaks a rule */
static int parse_op(const unsigned char *v, uint32_t len, struct mount_op *op)
{
    uint32_t h[7];
    if (len < sizeof(h))
        return -1;
    memcpy(h, v, sizeof(h));
    uint32_t dest_len = h[5], arg_len = h[6];
    if (dest_len > MAX_OP_PATH || arg_len > MAX_OP_DATA ||
        (size_t)len != sizeof(h) + dest_len + arg_len)
        return -1;
    const char *dest = (const char *)v + sizeof(h), *arg = dest + dest_len;
    *op = (struct mount_op){h[0], h[1], h[2], h[3], h[4], arg_len, NULL, NULL};
    int ids = op->uid != NO_ID || op->gid != NO_ID;
    int ok = path_ok(dest, dest_len) && op->mode <= 07777;
    switch (op->kind) {
    case OP_DIR: ok = ok && !op->flags && !arg_len; break;
    case OP_FILE: ok = ok && !op->flags; break;
    case OP_SYMLINK:
        ok = ok && !op->flags && !op->mode && !ids && arg_len && arg_len <= MAX_OP_PATH &&
             !memchr(arg, 0, arg_len);
        break;
    case OP_BIND: ok = ok && !(op->flags & ~OPF_ALL) && !op->mode && !ids &&
                       path_ok(arg, arg_len); break;
    case OP_PROC: ok = ok && !op->flags && !op->mode && !ids && !arg_len; break;
    default: ok = 0; /* an op this init does not know is never skipped */
    }
    if (!ok || !(op->dest = tlv_str((const unsigned char *)dest, dest_len)) ||
        !(op->arg = tlv_str((const unsigned char *)arg, arg_len)))
        return -1;
    return 0;
}

int parse_config(const unsigned char *buf, size_t len, struct config *c)
{
    struct tlv_iter it = {buf, buf + len};
    uint32_t tag, l;
    const unsigned char *v;
    int r;
    memset(c, 0, sizeof(*c));
    c->sandbox_id = 1000;
    c->map_size = 65536;
    c->oom_score = 500;
    c->nofile = 1024;
    c->attach_fd = -1;
    c->root_view_fd = -1;
    while ((r = tlv_next(&it, &tag, &l, &v)) > 0) {
        switch (tag) {
        case T_HOSTNAME: c->hostname = tlv_str(v, l); break;
        case T_ROOT: c->root = tlv_str(v, l); break;
        case T_TMPFS_SIZE: c->tmpfs_size = tlv_u64(v, l); break;
        case T_TMPFS_INODES: c->tmpfs_inodes = tlv_u64(v, l); break;
        case T_UID_BASE: c->uid_base = (uint32_t)tlv_u64(v, l); break;
        case T_GID_BASE: c->gid_base = (uint32_t)tlv_u64(v, l); break;
        case T_MAP_SIZE: c->map_size = (uint32_t)tlv_u64(v, l); break;
        case T_SANDBOX_ID: c->sandbox_id = (uint32_t)tlv_u64(v, l); break;
        case T_OOM_SCORE: c->oom_score = (int32_t)tlv_u64(v, l); break;
        case T_NOFILE: c->nofile = tlv_u64(v, l); break;
        case T_FSIZE: c->fsize = tlv_u64(v, l); break;
        case T_ATTACH_PATH: c->attach_path = tlv_str(v, l); break;
        case T_ORPHAN_GRACE_MS: c->orphan_grace_ms = tlv_u64(v, l); break;
        case T_UNBOUND: c->unbound = tlv_u64(v, l) != 0; break;
        case T_MOUNT_OP:
            if (!c->ops && !(c->ops = calloc(MAX_OPS, sizeof(*c->ops))))
                return -1;
            if (c->n_ops >= MAX_OPS || parse_op(v, l, &c->ops[c->n_ops]) < 0)
                return -1;
            c->n_ops++;
            break;
        case T_SECCOMP:
            /* a filter that cannot be kept is an error, never "no filter" */
            if (c->bpf || !l || l % sizeof(struct sock_filter) ||
                l / sizeof(struct sock_filter) > BPF_MAXINSNS || !(c->bpf = malloc(l)))
                return -1;
            memcpy(c->bpf, v, l);
            c->bpf_len = l;
            break;
        default: return -1; /* agent and init ship together: an unknown tag is an error,
                             * never a part of the sandbox left out */
        }
    }
    if (r < 0 || !c->hostname || !c->root || !c->uid_base || !c->gid_base || !c->n_ops)
        return -1;
    /* fail closed: no sandbox is built without the seccomp filter its commands need */
    if (!c->bpf || !c->bpf_len)
        return -2;
    return 0;
}


int parse_go(const unsigned char *buf, size_t len, struct config *c)
{
    struct tlv_iter it = {buf, buf + len};
    uint32_t tag, l;
    const unsigned char *v;
    int r;
    while ((r = tlv_next(&it, &tag, &l, &v)) > 0) {
        if (tag != T_CGROUP_PROCS || c->n_cgroups >= MAX_LIST ||
            !(c->cgroups[c->n_cgroups] = tlv_str(v, l)))
            return -1;
        c->n_cgroups++;
    }
    return r < 0 || c->n_cgroups == 0 ? -1 : 0;
}
