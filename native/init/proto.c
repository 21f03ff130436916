/* The wire protocol's helpers (TLV parsing, sending replies), used by every part of
 * nrx-init: the host side (nrx-init.c), the sandbox setup (sandbox.c) and the PID 1 loop
 * (serve.c).  Their own file, so no part depends on another for them.
 */
#include <errno.h>
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
