#include "nrxspawn.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>

/* posix_spawn of the nrx-init helper with stdin/stdout/stderr on /dev/null, the control
 * socket on fd 3, an empty signal mask and SIGPIPE/SIGXFSZ at their defaults, empty
 * environment: what engine._spawn did through os.posix_spawn, which holds the GIL for
 * the whole vfork+exec (every worker thread of the agent stalled meanwhile, and longer
 * when the CPUs are busy); cffi releases the GIL around this call.  Returns the pid, or
 * -errno.  control_fd must not be 3 (dup2(3, 3) would keep its O_CLOEXEC). */
int nrx_spawn_helper(const char *path, int control_fd)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t mask, def;
    pid_t pid = -1;
    int rc;

    if (control_fd == 3)
        return -22; /* EINVAL */
    if ((rc = posix_spawn_file_actions_init(&fa)) != 0)
        return -rc;
    if ((rc = posix_spawnattr_init(&at)) != 0) {
        posix_spawn_file_actions_destroy(&fa);
        return -rc;
    }
    sigemptyset(&mask);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    sigaddset(&def, SIGXFSZ);
    if ((rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0)) == 0 &&
        (rc = posix_spawn_file_actions_adddup2(&fa, 0, 1)) == 0 &&
        (rc = posix_spawn_file_actions_adddup2(&fa, 0, 2)) == 0 &&
        (rc = posix_spawn_file_actions_adddup2(&fa, control_fd, 3)) == 0 &&
        (rc = posix_spawnattr_setsigmask(&at, &mask)) == 0 &&
        (rc = posix_spawnattr_setsigdefault(&at, &def)) == 0 &&
        (rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)) == 0) {
        /* argv[0] is a neutral name: the sandbox's /proc/1/cmdline must not show where
         * the agent is installed on the host */
        char *argv[] = {(char *)"nrx-init", NULL};
        char *envp[] = {NULL};
        rc = posix_spawn(&pid, path, &fa, &at, argv, envp);
    }
    posix_spawnattr_destroy(&at);
    posix_spawn_file_actions_destroy(&fa);
    return rc != 0 ? -rc : (int)pid;
}
