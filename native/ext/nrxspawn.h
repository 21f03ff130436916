#ifndef NRX_NRXSPAWN_H
#define NRX_NRXSPAWN_H
int nrx_spawn_helper(const char *path, int control_fd);
#endif
