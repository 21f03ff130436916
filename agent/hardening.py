"""The agent's own process hardening at start (SPEC 11), via python-prctl.

- non-dumpable: the agent holds attestation and session keys; no core dump, no ptrace attach
  by same-uid processes, /proc/PID/mem of the agent closed to non-root;
- child subreaper: an orphaned sandbox helper is reparented to the agent (which reaps it and
  sees it in recovery), not to host init;
- the main thread is named (trio names its worker threads itself);
- every capability not in CAPS_USED is dropped from the bounding set, then effective and
  permitted are limited to CAPS_USED (effective first: limiting permitted while effective still
  holds a capability fails with EPERM, see NOTES).  The systemd unit's CapabilityBoundingSet=
  carries the same list; tests/test_systemd_unit.py checks that they agree.
"""

from __future__ import annotations

import prctl

from agent import log

# Each capability the agent (and nrx-init, which inherits the bounding set) uses, and why.
# Verified one by one: dropping any of these made sandbox creation or destruction fail
# (except kill and ipc_lock, kept for the paths noted, which a small test cannot reach).
CAPS_USED: dict[str, str] = {
    "sys_admin": "mount/umount/pivot_root, clone of user/mnt/pid/uts/ipc/net/cgroup namespaces, "
                 "setns, cgroupfs writes",
    "setuid": "write /proc/PID/uid_map mapping a host uid range other than our own",
    "setgid": "write /proc/PID/gid_map; setgroups in the sandbox helper",
    "kill": "signal sandbox processes that run as other host uids: v1 kill_all without "
            "cgroup.kill, recovery's pidfd kills of leftovers",
    "sys_ptrace": "read/overwrite /proc/PID/mem and pagemap of frozen sandbox processes "
                  "(destruction step 3); read /proc/PID/ns/* of other uids",
    "dac_override": "open sandbox files owned by the sandbox's host uid (wipe, inputs)",
    "fowner": "chmod/unlink sandbox files we do not own (sticky /tmp, wipe)",
    "chown": "hand /work and /input/data to the sandbox's host uid",
    "ipc_lock": "mlock session keys (sodium_malloc) beyond RLIMIT_MEMLOCK (1000 sessions)",
}
# Measured, not kept: each capability below was dropped in turn from a hardened daemon that
# then created, ran and destroyed general and PHI sessions with every step verified.
#   sys_chroot - pivot_root/chroot happen inside the sandbox's own user namespace, where the
#                new namespace gives nrx-init a full capability set; no host-side setns(mnt)
#   net_admin  - nrx-init brings `lo` up inside the sandbox's user namespace (SIOCSIFFLAGS)
NOT_NEEDED = ("sys_chroot", "net_admin")

THREAD_NAME = "nanorix-agent"


def _cap_numbers() -> dict[int, str]:
    """Every capability number this kernel knows -> name (``cap_N`` when python-prctl does not
    know it, e.g. checkpoint_restore on newer kernels)."""
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last = 40
    names = {getattr(prctl, "CAP_" + n.upper()): n for n in prctl.ALL_CAP_NAMES
             if n != "last_cap" and hasattr(prctl, "CAP_" + n.upper())}
    return {i: names.get(i, f"cap_{i}") for i in range(last + 1)}


def _status_mask(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def bounding_set() -> set[str]:
    """Capabilities currently in this process's bounding set."""
    mask = _status_mask("CapBnd")
    return {n for i, n in _cap_numbers().items() if mask >> i & 1}


def harden(cfg=None, *, keep: dict[str, str] | None = None, limit_permitted: bool = True) -> dict:
    """Harden the calling process; never raises.  Returns what was done and any errors.

    Call it in the agent process only (never in a test runner: it is irreversible)."""
    keep_set = set(CAPS_USED if keep is None else keep)
    report: dict = {"dumpable": None, "subreaper": None, "thread_name": None,
                    "bounding_dropped": [], "bounding": [], "errors": []}

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:  # every step is best effort; the report says what failed
            report["errors"].append(f"{what}: {e}")

    attempt("set_dumpable", lambda: prctl.set_dumpable(False))
    attempt("set_child_subreaper", lambda: prctl.set_child_subreaper(True))
    attempt("set_name", lambda: prctl.set_name(THREAD_NAME))
    nums = _cap_numbers()
    bnd = _status_mask("CapBnd")
    for i, cap in sorted(nums.items()):
        if bnd >> i & 1 and cap not in keep_set:
            try:
                prctl.capbset.drop(i)
                report["bounding_dropped"].append(cap)
            except Exception as e:
                report["errors"].append(f"capbset drop {cap}: {e}")
    if limit_permitted:
        unused = [i for i, n in nums.items() if n not in keep_set]
        attempt("cap_inheritable", lambda: prctl.cap_inheritable.limit())
        # effective before permitted (NOTES): the kernel refuses permitted < effective
        attempt("cap_effective", lambda: prctl.cap_effective.drop(*unused))
        attempt("cap_permitted", lambda: prctl.cap_permitted.drop(*unused))
    try:
        report["dumpable"] = bool(prctl.get_dumpable())
        report["subreaper"] = bool(prctl.get_child_subreaper())
        report["thread_name"] = prctl.get_name()
    except Exception as e:
        report["errors"].append(f"readback: {e}")
    report["bounding"] = sorted(bounding_set())
    lg = log.get()
    if report["errors"]:
        lg.warning("hardening_incomplete", errors=report["errors"])
    lg.info("hardened", dumpable=report["dumpable"], subreaper=report["subreaper"],
            bounding=report["bounding"], dropped=len(report["bounding_dropped"]))
    return report


def name_thread(name: str) -> None:
    """Name the calling OS thread (15 characters are kept by the kernel)."""
    prctl.set_name(name[:15])
