#ifndef NRX_SECCOMP_H
#define NRX_SECCOMP_H
/* Compile a seccomp profile (rules as data: the TOML files in seccomp/) into classic BPF with
 * libseccomp, for the native architecture only.  Nothing is loaded here: the bytes are
 * handed to nrx-init, which loads them per exec after no_new_privs. */
#include <stddef.h>
#include <stdint.h>
/* This file shadows libseccomp's <seccomp.h> on the -I native/ext path; pull the real one
 * in from the next include directory (seccomp.c includes us as <seccomp.h> for that). */
#include_next <seccomp.h>

struct nrx_sc_cond {
    unsigned int arg;   /* argument index 0..5 */
    int op;             /* enum scmp_compare value (1 NE .. 7 MASKED_EQ) */
    uint64_t a;         /* datum (MASKED_EQ: the mask) */
    uint64_t b;         /* MASKED_EQ: the value; otherwise unused */
};

struct nrx_sc_rule {
    int nr;                          /* syscall number from nrx_sc_resolve() */
    uint32_t action;                 /* SCMP_ACT_* value */
    unsigned int ncond;
    const struct nrx_sc_cond *conds; /* ANDed */
};

/* Syscall number for the native arch; negative pseudo numbers for syscalls the native
 * arch lacks; -1 (__NR_SCMP_ERROR) for names libseccomp does not know. */
int nrx_sc_resolve(const char *name);

/* Build the filter; on success *out (malloc'd, free with nrx_sc_free) holds the raw
 * struct sock_filter array and *outlen its size.  pfc != 0 exports libseccomp's
 * human-readable pseudo filter code instead.  Returns 0 or -errno, err gets a message. */
int nrx_sc_compile(uint32_t default_action, uint32_t badarch_action,
                   const struct nrx_sc_rule *rules, size_t nrules, int pfc,
                   unsigned char **out, size_t *outlen, char *err, size_t errlen);

void nrx_sc_free(void *p);
#endif
