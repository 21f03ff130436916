#include "version.h"
/* ABI number of agent._native; bumped when a signature Python relies on changes. */
int nrx_native_abi(void) { return 1; }
