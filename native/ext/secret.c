/* Locked secret memory for session (receipt) keys, SPEC 7.
 *
 * The 64-byte libsodium Ed25519 secret key (seed ‖ public key) lives in memory from
 * sodium_malloc: mlock()ed (never swapped), madvise(MADV_DONTDUMP) (never in a core
 * dump), surrounded by guard pages, and mprotect()ed PROT_NONE except while signing or
 * zeroizing.  Signing happens here; no function hands the secret bytes to the caller.
 * A mutex per key serialises sign and zeroize (cffi releases the GIL around calls). */
#include "secret.h"

#include <pthread.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>

struct nrx_sk {
    pthread_mutex_t mu;
    unsigned char *sk;   /* crypto_sign_SECRETKEYBYTES in sodium_malloc memory, or NULL */
    int zeroized;
    int mlocked;         /* 1 when mlock() of the secret's page succeeded */
};

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_rc = -1;

static void do_init(void) { init_rc = sodium_init() < 0 ? -1 : 0; }

int nrx_secret_init(void)
{
    pthread_once(&init_once, do_init);
    return init_rc;
}

static nrx_sk *alloc_key(void)
{
    if (nrx_secret_init() != 0)
        return NULL;
    nrx_sk *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    k->sk = sodium_malloc(crypto_sign_SECRETKEYBYTES);
    if (!k->sk) {
        free(k);
        return NULL;
    }
    pthread_mutex_init(&k->mu, NULL);
    /* sodium_malloc already tried mlock() (and MADV_DONTDUMP) but ignores failure; ask
     * again so we can report whether the page is really locked (RLIMIT_MEMLOCK, no
     * CAP_IPC_LOCK).  Locking an already locked page is a no-op. */
    k->mlocked = mlock(k->sk, crypto_sign_SECRETKEYBYTES) == 0;
    return k;
}

nrx_sk *nrx_sk_generate(unsigned char pk_out[32])
{
    nrx_sk *k = alloc_key();
    if (!k)
        return NULL;
    crypto_sign_keypair(pk_out, k->sk);
    sodium_mprotect_noaccess(k->sk);
    return k;
}

nrx_sk *nrx_sk_from_seed(const unsigned char seed[32], unsigned char pk_out[32])
{
    nrx_sk *k = alloc_key();
    if (!k)
        return NULL;
    crypto_sign_seed_keypair(pk_out, k->sk, seed);
    sodium_mprotect_noaccess(k->sk);
    return k;
}

/* 0 ok, -1 zeroized/freed, -2 signing failed */
int nrx_sk_sign(nrx_sk *k, const unsigned char *msg, size_t len, unsigned char sig_out[64])
{
    int rc = 0;
    pthread_mutex_lock(&k->mu);
    if (k->zeroized || !k->sk) {
        rc = -1;
    } else {
        sodium_mprotect_readonly(k->sk);
        if (crypto_sign_detached(sig_out, NULL, msg, len, k->sk) != 0)
            rc = -2;
        sodium_mprotect_noaccess(k->sk);
    }
    pthread_mutex_unlock(&k->mu);
    return rc;
}

/* Overwrite the secret with zeros, read every byte back, then free the pages.
 * 0 ok, -1 already zeroized. */
int nrx_sk_zeroize(nrx_sk *k, size_t *wiped_out, int *readback_zero_out)
{
    int rc = 0;
    pthread_mutex_lock(&k->mu);
    if (k->zeroized || !k->sk) {
        rc = -1;
        *wiped_out = 0;
        *readback_zero_out = 0;
    } else {
        sodium_mprotect_readwrite(k->sk);
        sodium_memzero(k->sk, crypto_sign_SECRETKEYBYTES);
        volatile const unsigned char *p = k->sk;
        unsigned char acc = 0;
        for (size_t i = 0; i < crypto_sign_SECRETKEYBYTES; i++)
            acc |= p[i];
        *wiped_out = crypto_sign_SECRETKEYBYTES;
        *readback_zero_out = acc == 0;
        sodium_free(k->sk);
        k->sk = NULL;
        k->zeroized = 1;
    }
    pthread_mutex_unlock(&k->mu);
    return rc;
}

/* 1 while the key is usable. */
int nrx_sk_locked(nrx_sk *k)
{
    pthread_mutex_lock(&k->mu);
    int live = !k->zeroized && k->sk != NULL;
    pthread_mutex_unlock(&k->mu);
    return live;
}

/* 1 when the secret's memory is mlock()ed. */
int nrx_sk_mlocked(nrx_sk *k)
{
    return k->mlocked;
}

/* Release the handle; zeroizes first when that has not happened. */
void nrx_sk_free(nrx_sk *k)
{
    if (!k)
        return;
    size_t w;
    int z;
    nrx_sk_zeroize(k, &w, &z);
    pthread_mutex_destroy(&k->mu);
    free(k);
}
