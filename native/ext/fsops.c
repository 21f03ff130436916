#include "fsops.h"

#include <errno.h>
#include <linux/openat2.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

#define BUF_SIZE (1u << 20)
#define BLOCK 4096u

int nrx_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags;
    how.mode = mode;
    how.resolve = resolve;
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    return fd < 0 ? -errno : (int)fd;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int pwrite_all(int fd, const unsigned char *buf, size_t n, uint64_t off, uint64_t *err_off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, buf + done, n - done, (off_t)(off + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            *err_off = off + done;
            return w < 0 ? -errno : -EIO;
        }
        done += (size_t)w;
    }
    return 0;
}

static int pread_all(int fd, unsigned char *buf, size_t n, uint64_t off, uint64_t *err_off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) { /* a file shorter than the range is an error too: nothing to verify */
            *err_off = off + done;
            return r < 0 ? -errno : -EIO;
        }
        done += (size_t)r;
    }
    return 0;
}

/* ChaCha20 keystream keyed from getrandom: the kernel's getrandom alone runs at
 * ~0.6 GiB/s here, libsodium's vectorised ChaCha20 several times faster. */
struct rng {
    unsigned char key[crypto_stream_chacha20_KEYBYTES];
    uint64_t counter;
};

static int rng_init(struct rng *r)
{
    size_t got = 0;
    while (got < sizeof r->key) {
        ssize_t n = getrandom(r->key + got, sizeof r->key - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        got += (size_t)n;
    }
    r->counter = 0;
    return 0;
}

static void rng_fill(struct rng *r, unsigned char *buf, size_t n)
{
    unsigned char nonce[crypto_stream_chacha20_NONCEBYTES];
    memcpy(nonce, &r->counter, sizeof nonce < sizeof r->counter ? sizeof nonce : sizeof r->counter);
    r->counter++;
    crypto_stream_chacha20(buf, n, nonce, r->key);
}

int nrx_wipe_ranges(int fd, const uint64_t *starts, const uint64_t *lens, size_t nranges,
                    const int *passes, size_t npasses, unsigned char *digests,
                    struct nrx_wipe_result *res)
{
    static const unsigned char zero_block[BLOCK];
    unsigned char zero_digest[crypto_hash_sha256_BYTES];
    struct rng rng;
    int rc = 0;

    memset(res, 0, sizeof *res);
    if (npasses == 0 || npasses > 7)
        return -EINVAL;
    for (size_t p = 0; p < npasses; p++)
        if (passes[p] < NRX_PASS_RANDOM || passes[p] > NRX_PASS_ZEROS)
            return -EINVAL;
    for (size_t i = 0; i < nranges; i++) {
        if (starts[i] + lens[i] < starts[i] || starts[i] + lens[i] > (uint64_t)INT64_MAX)
            return -EOVERFLOW;
        res->bytes += lens[i];
    }
    if (sodium_init() < 0)
        return -ENOSYS;
    unsigned char *buf = NULL;
    if (posix_memalign((void **)&buf, BLOCK, BUF_SIZE) != 0)
        return -ENOMEM;
    memset(zero_digest, 0, sizeof zero_digest);
    crypto_hash_sha256(zero_digest, zero_block, BLOCK);
    memset(&rng, 0, sizeof rng);

    for (size_t p = 0; p < npasses; p++) {
        uint64_t t0 = now_ns();
        if (passes[p] == NRX_PASS_RANDOM) {
            if ((rc = rng_init(&rng)) < 0)
                goto out;
        } else {
            memset(buf, passes[p] == NRX_PASS_ONES ? 0xFF : 0x00, BUF_SIZE);
        }
        for (size_t i = 0; i < nranges; i++) {
            for (uint64_t off = 0; off < lens[i]; off += BUF_SIZE) {
                size_t n = lens[i] - off < BUF_SIZE ? (size_t)(lens[i] - off) : BUF_SIZE;
                if (passes[p] == NRX_PASS_RANDOM)
                    rng_fill(&rng, buf, n);
                if ((rc = pwrite_all(fd, buf, n, starts[i] + off, &res->err_offset)) < 0)
                    goto out;
            }
        }
        res->pass_ns[p] = now_ns() - t0;
    }

    /* read the final pass back and digest every 4 KiB block */
    uint64_t t0 = now_ns();
    unsigned char *d = digests;
    for (size_t i = 0; i < nranges; i++) {
        for (uint64_t off = 0; off < lens[i]; off += BUF_SIZE) {
            size_t n = lens[i] - off < BUF_SIZE ? (size_t)(lens[i] - off) : BUF_SIZE;
            if ((rc = pread_all(fd, buf, n, starts[i] + off, &res->err_offset)) < 0)
                goto out;
            size_t padded = (n + BLOCK - 1) / BLOCK * BLOCK;
            if (padded > n)
                memset(buf + n, 0, padded - n);
            for (size_t b = 0; b < padded; b += BLOCK, d += crypto_hash_sha256_BYTES) {
                res->blocks++;
                if (memcmp(buf + b, zero_block, BLOCK) == 0) {
                    memcpy(d, zero_digest, sizeof zero_digest); /* = SHA-256 of this block */
                } else {
                    res->nonzero_blocks++;
                    crypto_hash_sha256(d, buf + b, BLOCK);
                }
            }
        }
    }
    res->pass_ns[npasses] = now_ns() - t0;
out:
    sodium_memzero(&rng, sizeof rng);
    sodium_memzero(buf, BUF_SIZE);
    free(buf);
    return rc;
}
