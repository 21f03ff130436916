#ifndef NRX_SECRET_H
#define NRX_SECRET_H
#include <stddef.h>

/* Ed25519 keys held in libsodium guarded memory (sodium_malloc: mlocked, MADV_DONTDUMP,
 * guard pages, no access between uses).  The secret bytes never leave this file. */
typedef struct nrx_sk nrx_sk;

int nrx_secret_init(void);
nrx_sk *nrx_sk_generate(unsigned char pk_out[32]);
nrx_sk *nrx_sk_from_seed(const unsigned char seed[32], unsigned char pk_out[32]);
int nrx_sk_sign(nrx_sk *k, const unsigned char *msg, size_t len, unsigned char sig_out[64]);
int nrx_sk_zeroize(nrx_sk *k, size_t *wiped_out, int *readback_zero_out);
int nrx_sk_locked(nrx_sk *k);
int nrx_sk_mlocked(nrx_sk *k);
void nrx_sk_free(nrx_sk *k);
#endif
