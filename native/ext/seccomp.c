/* <seccomp.h> is our header (found on -I native/ext); it include_next-s libseccomp's. */
#include <seccomp.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define NRX_SC_MAX_COND 6

int nrx_sc_resolve(const char *name)
{
    return seccomp_syscall_resolve_name(name);
}

void nrx_sc_free(void *p)
{
    free(p);
}

/* Read the whole memfd back into a malloc'd buffer. */
static int slurp(int fd, unsigned char **out, size_t *outlen)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    size_t n = (size_t)st.st_size;
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf)
        return -ENOMEM;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            free(buf);
            return -e;
        }
        got += (size_t)r;
    }
    *out = buf;
    *outlen = n;
    return 0;
}

int nrx_sc_compile(uint32_t default_action, uint32_t badarch_action,
                   const struct nrx_sc_rule *rules, size_t nrules, int pfc,
                   unsigned char **out, size_t *outlen, char *err, size_t errlen)
{
    int rc = 0, fd = -1;
    *out = NULL;
    *outlen = 0;
    if (errlen)
        err[0] = '\0';
    scmp_filter_ctx ctx = seccomp_init(default_action);
    if (!ctx) {
        snprintf(err, errlen, "seccomp_init failed (bad default action %#x?)", default_action);
        return -EINVAL;
    }
    rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, badarch_action);
    if (rc < 0) {
        snprintf(err, errlen, "bad-arch action %#x refused: %s", badarch_action, strerror(-rc));
        goto done;
    }
    /* the loader (nrx-init) sets no_new_privs itself; keep the exported filter pure */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    /* binary tree over syscall numbers: O(log n) per syscall instead of a linear chain of
     * ~300 comparisons (libseccomp >= 2.5; older versions keep the default layout) */
    seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    for (size_t i = 0; i < nrules; i++) {
        const struct nrx_sc_rule *r = &rules[i];
        struct scmp_arg_cmp cmp[NRX_SC_MAX_COND];
        if (r->ncond > NRX_SC_MAX_COND) {
            snprintf(err, errlen, "rule %zu: too many argument conditions", i);
            rc = -EINVAL;
            goto done;
        }
        for (unsigned int j = 0; j < r->ncond; j++) {
            cmp[j].arg = r->conds[j].arg;
            cmp[j].op = (enum scmp_compare)r->conds[j].op;
            cmp[j].datum_a = r->conds[j].a;
            cmp[j].datum_b = r->conds[j].b;
        }
        rc = seccomp_rule_add_array(ctx, r->action, r->nr, r->ncond, cmp);
        if (rc < 0) {
            char *name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, r->nr);
            snprintf(err, errlen, "rule %zu (syscall %s, action %#x, %u conditions) refused: %s",
                     i, name ? name : "?", r->action, r->ncond, strerror(-rc));
            free(name);
            goto done;
        }
    }
    fd = memfd_create("nrx-seccomp", MFD_CLOEXEC);
    if (fd < 0) {
        rc = -errno;
        snprintf(err, errlen, "memfd_create: %s", strerror(errno));
        goto done;
    }
    rc = pfc ? seccomp_export_pfc(ctx, fd) : seccomp_export_bpf(ctx, fd);
    if (rc < 0) {
        snprintf(err, errlen, "export failed: %s", strerror(-rc));
        goto done;
    }
    rc = slurp(fd, out, outlen);
    if (rc < 0)
        snprintf(err, errlen, "reading the exported filter: %s", strerror(-rc));
done:
    if (fd >= 0)
        close(fd);
    seccomp_release(ctx);
    return rc;
}
