#ifndef NRX_PROCSCAN_H
#define NRX_PROCSCAN_H
/* Host-wide /proc scans of destruction steps 5 and 6 (agent/destroy/residue.py), one C
 * call each: done from Python they cost one GIL release + reacquire per syscall (~8 per
 * host thread), which serialised concurrent destructions on the GIL. */
#include <stddef.h>
#include <stdint.h>

/* Every thread of every process in /proc whose namespace link ns/<name> (for the names
 * whose bit is set in name_mask; bit i = user, mnt, uts, ipc, pid, net, cgroup) names
 * one of `inodes`.  *procs = processes with such a thread, *threads = such threads.
 * Tasks that exit while being read are skipped (ENOENT/ESRCH); any other error reading
 * /proc or a task (EIO, EACCES, ...) fails the whole scan.  Returns 0 or -errno. */
int nrx_scan_ns(const uint64_t *inodes, size_t ninodes, unsigned name_mask, int *procs,
                int *threads);

/* Processes with any thread whose real/effective/saved/fs uid lies in one of the
 * [lo, hi) pairs of `uid_ranges` (flattened: lo0, hi0, lo1, hi1, ...; nuid values) or whose gid lies
 * in one of `gid_ranges`.  Returns the count, or -errno when /proc or a task could not be
 * read (a task that exited meanwhile is skipped, as above). */
int nrx_scan_ids(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                 size_t ngid);
/* The same scans of a /proc-like tree at `root` (tests: a tree whose files give read
 * errors the live /proc cannot be made to give on demand). */
int nrx_scan_ns_at(const char *root, const uint64_t *inodes, size_t ninodes,
                   unsigned name_mask, int *procs, int *threads);
int nrx_scan_ids_at(const char *root, const uint64_t *uid_ranges, size_t nuid,
                    const uint64_t *gid_ranges, size_t ngid);
int nrx_count_mounts_at(const char *root, const char *dev, const uint64_t *pinned,
                        size_t npinned, int *mounts, int *mnt_ns);
/* Kernel facts that answer without a walk (procscan.c explains each): nsfs file handles
 * of a namespace and whether it still exists (nrx_ns_open: -ESTALE = gone), an inotify
 * watch that sees a superblock shut down (no mount of it left anywhere), and the id
 * scan through thread pidfds (PIDFD_GET_INFO) instead of status text. */
int nrx_ns_handle(int nsfd, unsigned char *out, size_t cap);
int nrx_ns_open(const unsigned char *handle, size_t len);
int nrx_sb_watch(int fd);
int nrx_sb_released(int ifd);
int nrx_scan_ids_pidfd(const uint64_t *uid_ranges, size_t nuid, const uint64_t *gid_ranges,
                       size_t ngid);
/* Step 2: mounts of a superblock in the caller's own mount namespace through
 * listmount/statmount (no mountinfo text), and fstatfs's f_type. */
int nrx_own_mounts_of_dev(unsigned major, unsigned minor);
long long nrx_fs_magic(int fd);
/* statx STATX_ATTR_MOUNT_ROOT of a path: 1, 0 or -errno */
int nrx_is_mount_root(const char *path);
#endif
