"""`nanorix-agent doctor`: check that this host can run the agent (SPEC 11).

One line per check: `ok`, `warn` or `fail`, what was found, and for warn/fail how to fix it.
Exit status 1 when any check fails, else 0.  Namespace checks run `unshare` from util-linux
in a short-lived child (nothing is tried beyond creating the namespace and exiting).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import config as config_mod

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
NAMESPACES = {"user": "--user", "mount": "--mount", "pid": "--pid --fork", "net": "--net",
              "uts": "--uts", "ipc": "--ipc", "cgroup": "--cgroup"}
SYS_openat2 = 437
AT_FDCWD = -100
RESOLVE_BENEATH = 0x08
RESOLVE_NO_SYMLINKS = 0x04


@dataclass
class Check:
    name: str
    level: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        s = f"{self.level:<4}  {self.name:<22} {self.detail}"
        if self.level != "ok" and self.fix:
            s += f" — fix: {self.fix}"
        return s


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# -- namespaces ------------------------------------------------------------------------------

def check_namespace(kind: str) -> Check:
    """Create one namespace of `kind` in a child that runs `true` and exits."""
    unshare = shutil.which("unshare")
    name = f"namespace.{kind}"
    if unshare is None:
        return Check(name, "fail", "util-linux `unshare` not found, cannot test",
                     "apt-get install util-linux")
    try:
        r = subprocess.run([unshare, *NAMESPACES[kind].split(), "true"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, "fail", f"could not run unshare: {e}", "check util-linux")
    if r.returncode == 0:
        return Check(name, "ok", f"{kind} namespaces can be created")
    fixes = {"user": "set user.max_user_namespaces > 0 (sysctl) and check AppArmor/SELinux policy",
             "net": "kernel needs CONFIG_NET_NS", "pid": "kernel needs CONFIG_PID_NS",
             "cgroup": "kernel needs CONFIG_CGROUPS with cgroup namespaces (4.6+)"}
    return Check(name, "fail", f"unshare {NAMESPACES[kind]} failed: {r.stderr.strip()[:120]}",
                 fixes.get(kind, f"kernel needs {kind} namespace support"))


def check_userns_limits(cfg) -> list[Check]:
    out = []
    mx = _read("/proc/sys/user/max_user_namespaces")
    if mx is None:
        out.append(Check("userns.max", "warn", "user.max_user_namespaces not readable",
                         "kernel needs CONFIG_USER_NS"))
    elif int(mx) == 0:
        out.append(Check("userns.max", "fail", "user.max_user_namespaces = 0: no user namespaces",
                         "sysctl -w user.max_user_namespaces=65536 (and in /etc/sysctl.d/)"))
    elif int(mx) < cfg.node.max_sessions:
        out.append(Check("userns.max", "warn", f"user.max_user_namespaces = {mx} < node.max_sessions "
                         f"= {cfg.node.max_sessions}",
                         f"sysctl -w user.max_user_namespaces={max(65536, cfg.node.max_sessions * 2)}"))
    else:
        out.append(Check("userns.max", "ok", f"user.max_user_namespaces = {mx}"))
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    if clone is None:
        out.append(Check("userns.unprivileged", "ok",
                         "kernel.unprivileged_userns_clone absent (upstream kernel, no restriction)"))
    else:
        out.append(Check("userns.unprivileged", "ok",
                         f"kernel.unprivileged_userns_clone = {clone} (the agent runs as root: "
                         "not affected)"))
    aa = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if aa is None or aa == "0":
        out.append(Check("userns.apparmor", "ok",
                         "AppArmor does not restrict user namespaces"
                         + (" (sysctl absent)" if aa is None else " (= 0)")))
    else:
        out.append(Check("userns.apparmor", "warn",
                         "kernel.apparmor_restrict_unprivileged_userns = 1: user namespaces are "
                         "allowed only to profiles that grant `userns` (root with CAP_SYS_ADMIN "
                         "is exempt, but a confined agent is not)",
                         "run the agent unconfined as root, or give its AppArmor profile `userns,`"))
    return out


# -- cgroups ---------------------------------------------------------------------------------

def _mount_types() -> dict[str, tuple[str, str]]:
    out = {}
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) > 4 and len(rfields) >= 3:
            out[fields[4]] = (rfields[0], rfields[2])
    return out


def cgroup_mode() -> str:
    t = _mount_types().get(str(CGROUP_ROOT), ("", ""))[0]
    return {"cgroup2": "v2", "tmpfs": "v1"}.get(t, "none")


def check_cgroups() -> list[Check]:
    mode = cgroup_mode()
    mounts = _mount_types()
    if mode == "none":
        return [Check("cgroup.mode", "fail", f"nothing usable mounted at {CGROUP_ROOT}",
                      "mount cgroup2 at /sys/fs/cgroup (or boot with systemd)")]
    if mode == "v1":
        out = [Check("cgroup.mode", "ok", "v1/hybrid (per-controller hierarchies under "
                     f"{CGROUP_ROOT}); the agent builds <controller>/<prefix>/ itself")]
        missing = []
        for c in V1_CONTROLLERS:
            d = CGROUP_ROOT / c
            if not (d.is_dir() and mounts.get(str(d), ("",))[0] == "cgroup"):
                # cpu may be co-mounted as cpu,cpuacct
                if not any(mp.startswith(str(CGROUP_ROOT) + "/") and t[0] == "cgroup"
                           and c in t[1].split(",") for mp, t in mounts.items()):
                    missing.append(c)
        if missing:
            out.append(Check("cgroup.controllers", "fail", f"v1 controllers missing: "
                             f"{', '.join(missing)}", "mount them (or move the host to cgroup v2)"))
        else:
            out.append(Check("cgroup.controllers", "ok", "memory, pids, cpu, freezer available"))
        writable = all(os.access(CGROUP_ROOT / c, os.W_OK) for c in V1_CONTROLLERS
                       if (CGROUP_ROOT / c).is_dir())
        out.append(Check("cgroup.delegation", "ok" if writable else "fail",
                         "controller roots writable" if writable else "controller roots read-only",
                         "run as root without ProtectControlGroups="))
        if (CGROUP_ROOT / "unified").is_dir():
            out.append(Check("cgroup.unified", "ok",
                             "controller-less cgroup2 at /sys/fs/cgroup/unified (cgroup.kill)"))
        return out
    out = [Check("cgroup.mode", "ok", "v2 (unified)")]
    own = "/"
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            own = line[3:]
    base = CGROUP_ROOT / own.lstrip("/")
    avail = set((_read(str(CGROUP_ROOT / "cgroup.controllers")) or "").split())
    missing = [c for c in V2_CONTROLLERS if c not in avail]
    out.append(Check("cgroup.controllers", "fail" if missing else "ok",
                     f"missing: {', '.join(missing)}" if missing
                     else "memory, pids, cpu available at the root",
                     "boot with the controllers enabled (cgroup_no_v1=, systemd)"))
    mine = set((_read(str(base / "cgroup.controllers")) or "").split())
    deleg = os.access(base / "cgroup.subtree_control", os.W_OK) and os.access(
        base / "cgroup.procs", os.W_OK)
    if own == "/" or (deleg and all(c in mine for c in V2_CONTROLLERS)):
        out.append(Check("cgroup.delegation", "ok",
                         f"own cgroup {own} is delegated with {' '.join(sorted(mine)) or 'root'}"))
    else:
        out.append(Check("cgroup.delegation", "warn",
                         f"own cgroup {own} is not delegated (controllers: "
                         f"{' '.join(sorted(mine)) or 'none'})",
                         "run under the shipped unit (Delegate=yes) or `systemd-run -p Delegate=yes`"))
    return out


# -- kernel interfaces -----------------------------------------------------------------------

def check_libseccomp() -> Check:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return Check("libseccomp", "fail", "libseccomp not found", "apt-get install libseccomp2")
    try:
        lib = ctypes.CDLL(name)
        lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
        v = lib.seccomp_version().contents
        ver = f"{v[0]}.{v[1]}.{v[2]}"
    except (OSError, AttributeError) as e:
        return Check("libseccomp", "fail", f"{name} unusable: {e}", "reinstall libseccomp2")
    if (v[0], v[1]) < (2, 5):
        return Check("libseccomp", "warn", f"libseccomp {ver} < 2.5 (no notify/new syscalls)",
                     "upgrade libseccomp2")
    return Check("libseccomp", "ok", f"libseccomp {ver}")


def check_pidfd() -> Check:
    try:
        fd = os.pidfd_open(os.getpid())
        os.close(fd)
        return Check("pidfd_open", "ok", "pidfd_open works")
    except (OSError, AttributeError) as e:
        return Check("pidfd_open", "fail", f"pidfd_open unavailable: {e}", "kernel 5.3+ needed")


def check_openat2() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                                RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_openat2), ctypes.c_int(AT_FDCWD), b".",
                      ctypes.byref(how), ctypes.c_size_t(24))
    if fd < 0:
        e = ctypes.get_errno()
        return Check("openat2", "fail", f"openat2 failed: {os.strerror(e)}",
                     "kernel 5.6+ needed (RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)")
    os.close(fd)
    return Check("openat2", "ok", "openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS works")


def check_swap() -> Check:
    lines = (_read("/proc/swaps") or "").splitlines()[1:]
    if not lines:
        return Check("swap", "ok", "no swap: sandbox memory never reaches disk")
    return Check("swap", "warn", f"{len(lines)} swap device(s) active: pages of a session could "
                 "reach disk before the memory wipe (v2 sets memory.swap.max=0 per session; v1 "
                 "needs memsw accounting)", "swapoff -a, or cgroup v2 / swapaccount=1")


def check_init_on_free() -> Check:
    cmd = (_read("/proc/cmdline") or "").split()
    val = next((a.split("=", 1)[1] for a in cmd if a.startswith("init_on_free=")), None)
    cfg_on = False
    kcfg = Path(f"/boot/config-{os.uname().release}")
    if kcfg.exists():
        cfg_on = "CONFIG_INIT_ON_FREE_DEFAULT_ON=y" in kcfg.read_text()
    if val in ("1", "on", "y") or (val is None and cfg_on):
        return Check("init_on_free", "ok", "init_on_free on: freed pages are zeroed by the kernel")
    return Check("init_on_free", "warn", "init_on_free off: freed pages keep their content until "
                 "reused (the agent overwrites before freeing; CDPs report this setting)",
                 "add init_on_free=1 to the kernel command line")


def check_core_pattern() -> Check:
    cp = _read("/proc/sys/kernel/core_pattern") or ""
    if cp.startswith("|"):
        return Check("core_pattern", "warn", f"kernel.core_pattern pipes cores to {cp[1:].split()[0]}: "
                     "a crashing sandbox process's memory (customer data) would be handed to it "
                     "regardless of RLIMIT_CORE", "sysctl -w kernel.core_pattern=core "
                     "(sandboxes run with RLIMIT_CORE=0, the agent is non-dumpable)")
    return Check("core_pattern", "ok", f"kernel.core_pattern = {cp!r} (RLIMIT_CORE=0 applies)")


def _meminfo() -> dict[str, int]:
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts:
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def check_memory(cfg) -> Check:
    mi = _meminfo()
    total, avail = mi.get("MemTotal", 0), mi.get("MemAvailable", 0)
    cap = cfg.node.memory_capacity_bytes or int(total * 0.8)
    gib = 1024 ** 3
    detail = (f"capacity {cap / gib:.1f} GiB, MemTotal {total / gib:.1f} GiB, "
              f"MemAvailable {avail / gib:.1f} GiB")
    if cap > total:
        return Check("memory", "fail", detail + ": capacity exceeds physical memory",
                     "lower node.memory_capacity_bytes (0 = 80% of MemTotal)")
    if cap > avail:
        return Check("memory", "warn", detail + ": capacity exceeds memory available now",
                     "free memory on the host or lower node.memory_capacity_bytes")
    smallest = min((t.memory_bytes for t in cfg.tiers.values()), default=0)
    if smallest and cap < smallest:
        return Check("memory", "fail", detail + ": not even one session of the smallest tier fits",
                     "raise node.memory_capacity_bytes")
    return Check("memory", "ok", detail)


def check_uid_range(cfg, subid_files=("/etc/subuid", "/etc/subgid")) -> Check:
    """The sandboxes' host uid/gid range must not overlap subordinate ranges handed to users
    (rootless containers) or uids processes run as now: recovery kills what runs there."""
    sc = cfg.sandbox
    lo, hi = sc.uid_base, sc.uid_base + sc.uid_slot_size * cfg.node.max_sessions
    rng = f"[{lo}, {hi})"
    clashes = []
    for path in subid_files:
        for line in (_read(path) or "").splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                a, n = int(parts[1]), int(parts[2])
                if a < hi and lo < a + n:
                    clashes.append(f"{path} {parts[0]}:{a}:{n}")
    if clashes:
        return Check("uid_range", "fail", f"sandbox uid range {rng} overlaps {', '.join(clashes)}",
                     "move sandbox.uid_base above every /etc/subuid and /etc/subgid range")
    busy = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for line in (_read(f"/proc/{pid}/status") or "").splitlines():
            if line.startswith("Uid:"):
                if any(lo <= int(u) < hi for u in line.split()[1:]):
                    busy += 1
                break
    if busy:
        return Check("uid_range", "warn", f"{busy} process(es) already run with uids in the "
                     f"sandbox range {rng} (an agent running now, or another user of that range)",
                     "stop them or move sandbox.uid_base; recovery kills processes in "
                     "journaled slots")
    return Check("uid_range", "ok", f"sandbox uid range {rng} is free")


def check_init_binary() -> Check:
    p = Path(__file__).resolve().parent / "_bin" / "nrx-init"
    if p.exists() and os.access(p, os.X_OK):
        return Check("nrx-init", "ok", "sandbox init binary present")
    return Check("nrx-init", "fail", "sandbox init binary agent/_bin/nrx-init missing",
                 "reinstall: pip install . (builds native parts)")


def check_root() -> Check:
    uid = os.geteuid()
    if uid == 0:
        return Check("root", "ok", "running as root")
    return Check("root", "fail", f"running as uid {uid}: the agent needs root (namespaces, "
                 "cgroups, uid maps), and so do several checks below, which fail for that "
                 "reason alone", "run `nanorix-agent doctor` as root (sudo)")


def run_checks(cfg) -> list[Check]:
    checks: list[Check] = [check_root()] if os.geteuid() != 0 else []
    checks += [check_namespace(k) for k in NAMESPACES]
    checks += check_userns_limits(cfg)
    checks += check_cgroups()
    checks += [check_libseccomp(), check_pidfd(), check_openat2(), check_swap(),
               check_init_on_free(), check_core_pattern(), check_memory(cfg), check_uid_range(cfg),
               check_init_binary()]
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nanorix-agent doctor",
                                 description="check that this host can run nanorix-agent")
    ap.add_argument("--config", type=Path, default=None, metavar="FILE",
                    help="check against this config (default /etc/nanorix-agent/agent.toml "
                         "when it exists)")
    ap.add_argument("--json", action="store_true", help="one JSON list instead of text lines")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"fail  config                 {e} — fix: correct the config file")
        return 1
    checks = run_checks(cfg)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        for c in checks:
            print(c.line())
        n = {lvl: sum(c.level == lvl for c in checks) for lvl in ("ok", "warn", "fail")}
        print(f"{n['ok']} ok, {n['warn']} warn, {n['fail']} fail")
    sys.stdout.flush()
    return 1 if any(c.level == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
