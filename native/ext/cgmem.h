#ifndef NRX_CGMEM_H
#define NRX_CGMEM_H
#include <stdint.h>
int nrx_cg_v1_release(const char *memdir, int tries, int64_t *out);
#endif
