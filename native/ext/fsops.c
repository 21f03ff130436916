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

/* The random pass is a CSPRNG keystream keyed from getrandom: the kernel's getrandom
 * alone runs at ~0.6 GiB/s here and libsodium's ChaCha20 at ~2.2 GiB/s, so on x86_64 with
 * AES-NI we use AES-128-CTR (8 blocks in flight, ~3x faster), else ChaCha20. */
#if defined(__x86_64__)
#include <immintrin.h>
#define NRX_HAVE_AESNI_CODE 1

__attribute__((target("aes,sse2"))) static __m128i aes_expand(__m128i k, __m128i t)
{
    t = _mm_shuffle_epi32(t, 0xff);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

#define AES_RK(i, rcon) rk[i] = aes_expand(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rcon))

/* AES-128-CTR keystream: counter block = nonce (8 bytes, big-endian) || block counter
 * (8 bytes, big-endian, from 0), i.e. standard CTR with IV nonce||0. */
__attribute__((target("aes,sse2"))) static void aes_ctr_fill(const unsigned char key[16],
                                                             uint64_t nonce,
                                                             unsigned char *out, size_t n)
{
    __m128i rk[11];
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    AES_RK(1, 0x01); AES_RK(2, 0x02); AES_RK(3, 0x04); AES_RK(4, 0x08); AES_RK(5, 0x10);
    AES_RK(6, 0x20); AES_RK(7, 0x40); AES_RK(8, 0x80); AES_RK(9, 0x1b); AES_RK(10, 0x36);
    const long long nbe = (long long)__builtin_bswap64(nonce);
    uint64_t ctr = 0;
    size_t off = 0;
    while (off < n) {
        __m128i b[8];
        for (int j = 0; j < 8; j++)
            b[j] = _mm_xor_si128(_mm_set_epi64x((long long)__builtin_bswap64(ctr + (uint64_t)j), nbe),
                                 rk[0]);
        ctr += 8;
        for (int r = 1; r < 10; r++)
            for (int j = 0; j < 8; j++)
                b[j] = _mm_aesenc_si128(b[j], rk[r]);
        for (int j = 0; j < 8; j++)
            b[j] = _mm_aesenclast_si128(b[j], rk[10]);
        if (n - off >= 128) {
            for (int j = 0; j < 8; j++)
                _mm_storeu_si128((__m128i *)(out + off + 16 * j), b[j]);
            off += 128;
        } else {
            unsigned char tmp[128];
            for (int j = 0; j < 8; j++)
                _mm_storeu_si128((__m128i *)(tmp + 16 * j), b[j]);
            memcpy(out + off, tmp, n - off);
            sodium_memzero(tmp, sizeof tmp);
            off = n;
        }
    }
    sodium_memzero(rk, sizeof rk);
}

static int have_aesni(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes");
}
#endif

int nrx_aes_ctr_fill(const unsigned char *key, uint64_t nonce, unsigned char *out, size_t n)
{
#ifdef NRX_HAVE_AESNI_CODE
    if (have_aesni()) {
        aes_ctr_fill(key, nonce, out, n);
        return 0;
    }
#endif
    (void)key; (void)nonce; (void)out; (void)n;
    return -ENOSYS;
}

struct rng {
    unsigned char key[crypto_stream_chacha20_KEYBYTES]; /* AES uses the first 16 bytes */
    uint64_t counter;
    int aes;
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
#ifdef NRX_HAVE_AESNI_CODE
    r->aes = have_aesni();
#else
    r->aes = 0;
#endif
    return 0;
}

static void rng_fill(struct rng *r, unsigned char *buf, size_t n)
{
#ifdef NRX_HAVE_AESNI_CODE
    if (r->aes) {
        aes_ctr_fill(r->key, r->counter++, buf, n);
        return;
    }
#endif
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
    /* the buffer only as large as the longest range needs (rounded to whole blocks):
     * a 1 MiB buffer filled, zeroed and freed per call cost ~0.4 ms for a 100-byte file */
    uint64_t longest = 0;
    for (size_t i = 0; i < nranges; i++)
        if (lens[i] > longest)
            longest = lens[i];
    size_t bufsz = longest >= BUF_SIZE ? BUF_SIZE
                   : (size_t)((longest + BLOCK - 1) / BLOCK * BLOCK);
    if (bufsz < BLOCK)
        bufsz = BLOCK;
    unsigned char *buf = NULL;
    if (posix_memalign((void **)&buf, BLOCK, bufsz) != 0)
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
            memset(buf, passes[p] == NRX_PASS_ONES ? 0xFF : 0x00, bufsz);
        }
        for (size_t i = 0; i < nranges; i++) {
            for (uint64_t off = 0; off < lens[i]; off += bufsz) {
                size_t n = lens[i] - off < bufsz ? (size_t)(lens[i] - off) : bufsz;
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
        for (uint64_t off = 0; off < lens[i]; off += bufsz) {
            size_t n = lens[i] - off < bufsz ? (size_t)(lens[i] - off) : bufsz;
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
    sodium_memzero(buf, bufsz);
    free(buf);
    return rc;
}

#define PM_PFN_MASK ((1ull << 55) - 1)

long nrx_pagemap_runs(int pagemap_fd, uint64_t first_page, uint64_t npages, uint64_t page_size,
                      uint64_t mask, uint64_t want, const uint64_t *skip_pfns, size_t nskip,
                      uint64_t *out, size_t cap)
{
    enum { CHUNK = 1 << 16 };
    uint64_t *ent = malloc(CHUNK * sizeof *ent);
    if (!ent)
        return -ENOMEM;
    long nruns = 0;
    int open_run = 0;
    uint64_t idx = 0;
    while (idx < npages) {
        size_t want_n = npages - idx < CHUNK ? (size_t)(npages - idx) : CHUNK;
        ssize_t r = pread(pagemap_fd, ent, want_n * sizeof *ent,
                          (off_t)((first_page + idx) * sizeof *ent));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            free(ent);
            return -e;
        }
        size_t got = (size_t)r / sizeof *ent;
        if (got == 0)
            break;
        for (size_t j = 0; j < got; j++) {
            uint64_t e = ent[j];
            int keep = (e & mask) == want;
            if (keep && nskip) {
                uint64_t pfn = e & PM_PFN_MASK;
                for (size_t k = 0; k < nskip; k++)
                    if (pfn >= skip_pfns[2 * k] && pfn < skip_pfns[2 * k + 1]) {
                        keep = 0;
                        break;
                    }
            }
            uint64_t addr = (first_page + idx + j) * page_size;
            if (keep) {
                if (open_run) {
                    out[2 * (nruns - 1) + 1] += page_size;
                } else {
                    if ((size_t)nruns >= cap) {
                        free(ent);
                        return -ENOSPC;
                    }
                    out[2 * nruns] = addr;
                    out[2 * nruns + 1] = page_size;
                    nruns++;
                    open_run = 1;
                }
            } else {
                open_run = 0;
            }
        }
        idx += got;
        if (got < want_n)
            break;
    }
    free(ent);
    return nruns;
}
