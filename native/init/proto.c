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
        case T_RO_BIND:
            if (c->n_binds < MAX_LIST) c->binds[c->n_binds++] = tlv_str(v, l);
            break;
        case T_LINK:
            if (c->n_links < MAX_LIST) c->links[c->n_links++] = tlv_str(v, l);
            break;
        case T_CGROUP_PROCS:
            if (c->n_cgroups < MAX_LIST) c->cgroups[c->n_cgroups++] = tlv_str(v, l);
            break;
        case T_SECCOMP:
            /* a filter that cannot be kept is an error, never "no filter" */
            if (c->bpf || !l || l % sizeof(struct sock_filter) ||
                l / sizeof(struct sock_filter) > BPF_MAXINSNS || !(c->bpf = malloc(l)))
                return -1;
            memcpy(c->bpf, v, l);
            c->bpf_len = l;
            break;
        default: break; /* unknown tags are ignored: newer agent, older init */
        }
    }
    if (r < 0 || !c->hostname || !c->root || !c->uid_base || !c->gid_base)
        return -1;
    /* fail closed: no sandbox is built without the seccomp filter its commands need */
    if (!c->bpf || !c->bpf_len)
        return -2;
    return 0;
}

