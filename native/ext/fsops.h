#ifndef NRX_FSOPS_H
#define NRX_FSOPS_H
/* fd-relative file operations that never follow a sandbox's links (openat2), and the
 * multi-pass overwrite used by destruction for files and for /proc/PID/mem. */
#include <stddef.h>
#include <stdint.h>

/* wipe pass patterns */
#define NRX_PASS_RANDOM 0
#define NRX_PASS_ONES 1
#define NRX_PASS_ZEROS 2

struct nrx_wipe_result {
    uint64_t bytes;          /* bytes covered by the ranges (per pass) */
    uint64_t blocks;         /* 4 KiB blocks read back (a short last block counts) */
    uint64_t nonzero_blocks; /* blocks of the read-back that are not all zero */
    uint64_t err_offset;     /* where an I/O error happened (when -errno is returned) */
    uint64_t pass_ns[8];     /* wall time of each pass; pass_ns[npasses] = read-back */
};

/* openat2(2) with a struct open_how; returns the fd or -errno. */
int nrx_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);

/* Overwrite [starts[i], starts[i]+lens[i]) of fd with each pass in turn (pwrite, 1 MiB
 * blocks), then read the ranges back (pread) and store one SHA-256 per 4 KiB block in
 * digests (32 bytes each, a short last block of a range zero-padded).  digests must hold
 * 32 * sum(ceil(lens[i] / 4096)) bytes.  npasses <= 7.  Returns 0 or -errno. */
int nrx_wipe_ranges(int fd, const uint64_t *starts, const uint64_t *lens, size_t nranges,
                    const int *passes, size_t npasses, unsigned char *digests,
                    struct nrx_wipe_result *res);

/* Scan /proc/PID/pagemap entries for the pages [first_page, first_page + npages) and write
 * coalesced runs of pages whose entry satisfies (entry & mask) == want and whose PFN is in
 * none of the nskip [start, end) PFN ranges of skip_pfns (the shared zero pages: they
 * hold no data, and writing them would allocate) as (address, length) pairs into out
 * (cap pairs; at most npages/2 + 1 are needed).  Returns the number of pairs or -errno;
 * a pagemap shorter than asked (end of the address space) just ends the scan. */
long nrx_pagemap_runs(int pagemap_fd, uint64_t first_page, uint64_t npages, uint64_t page_size,
                      uint64_t mask, uint64_t want, const uint64_t *skip_pfns, size_t nskip,
                      uint64_t *out, size_t cap);

/* AES-128-CTR keystream (IV = nonce big-endian || 64-bit block counter from 0) with AES-NI,
 * the random pass's generator; -ENOSYS without AES-NI.  Exposed for its known-answer test. */
int nrx_aes_ctr_fill(const unsigned char *key, uint64_t nonce, unsigned char *out, size_t n);
#endif
