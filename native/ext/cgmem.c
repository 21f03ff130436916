#include "cgmem.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

/* Step 3's memory release on a cgroup v1 memory directory in one call (issue 18): the
 * reclaim requests and the counter reads between them, which were ~10 Python file opens
 * per destruction (agent/sandbox/cgroups/v1.py V1Handle.reclaim_rounds; its Python twin
 * is CgroupHandle.reclaim_rounds, used when this returns an error). */

static int read_i64(int dirfd, const char *name, int64_t *out)
{
    char buf[64];
    char *end;
    ssize_t n;
    long long v;
    int e, fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -errno;
    n = read(fd, buf, sizeof buf - 1);
    e = errno;
    close(fd);
    if (n < 0)
        return -e;
    buf[n] = 0;
    errno = 0;
    v = strtoll(buf, &end, 10);
    if (end == buf || errno != 0 || (*end != 0 && *end != '\n'))
        return -EINVAL;
    *out = v;
    return 0;
}

/* (usage - kmem usage, kmem usage) from one consistent reading: the total is read before
 * and after kmem and the reading is retried until both agree, as V1Handle._counters. */
static int counters(int dirfd, const char *total, int64_t *user, int64_t *kernel)
{
    int64_t a, b, k;
    int rc;

    for (int i = 0; i < 100; i++) {
        if ((rc = read_i64(dirfd, total, &a)) < 0 ||
            (rc = read_i64(dirfd, "memory.kmem.usage_in_bytes", &k)) < 0 ||
            (rc = read_i64(dirfd, total, &b)) < 0)
            return rc;
        if (a == b) {
            *user = a > k ? a - k : 0;
            *kernel = k;
            return 0;
        }
    }
    return -EAGAIN;
}

/* Up to `tries` writes of "0" to memory.force_empty, each followed by a look at the
 * counters; stops at the first look with no user byte charged.  out = {requests, user
 * bytes, kernel bytes} of the last look.  Returns 0, or -errno when a counter could not
 * be read (a failed request is not an error: the next look says what it left). */
int nrx_cg_v1_release(const char *memdir, int tries, int64_t *out)
{
    const char *total = "memory.memsw.usage_in_bytes";
    int64_t user, kernel, n = 0;
    int rc, fd, dirfd = open(memdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (dirfd < 0)
        return -errno;
    if (faccessat(dirfd, total, F_OK, 0) != 0)
        total = "memory.usage_in_bytes";
    rc = counters(dirfd, total, &user, &kernel);
    while (rc == 0 && user != 0 && n < tries) {
        fd = openat(dirfd, "memory.force_empty", O_WRONLY | O_TRUNC | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, "0", 1) < 0) { /* EBUSY etc.: the next look tells */ }
            close(fd);
        }
        n++;
        rc = counters(dirfd, total, &user, &kernel);
    }
    close(dirfd);
    if (rc < 0)
        return rc;
    out[0] = n;
    out[1] = user;
    out[2] = kernel;
    return 0;
}
