#ifndef NRX_VERSION_H
#define NRX_VERSION_H
int nrx_native_abi(void);
#endif
