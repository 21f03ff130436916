"""Step 1 (eee_namespace / environment_isolation, method `procfs_verification`).

Freeze every process of the session through its cgroup (v1 freezer, v2 cgroup.freeze),
wait (bounded) until the kernel reports the cgroup frozen, count the frozen processes,
re-read the seven namespace inodes from /proc/<init_pid>/ns/* and check that they are the
ones recorded at creation and that none of them is the agent's own (a namespace shared
with the host would make the later residue scans meaningless).  Also records the host
uid/gid ranges from /proc/<init_pid>/{uid,gid}_map for step 5.  The namespaces are
pinned by fds until step 6 has scanned for them (see pin_namespaces).
"""

from __future__ import annotations

import os

import trio

from agent.destroy import residue
from agent.destroy.context import DestroyContext, DestroyState, StepError
from agent.sandbox.cgroups import CgroupHandle

METHOD = "procfs_verification"


def _freezer_name(cgroup: CgroupHandle) -> str:
    return "cgroup_v2" if cgroup.mode == "v2" else "cgroup_v1"


def pin_namespaces(pid: int, inodes: dict[str, int], st: DestroyState) -> None:
    """Hold an fd on each namespace until step 6 has scanned for it: a freed namespace's
    inode number is reused at once by the next namespace created on the host, which would
    make another session's processes look like this session's residue."""
    for n in residue.NAMESPACES:
        fd = os.open(f"/proc/{pid}/ns/{n}", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != inodes[n]:
            os.close(fd)
            raise StepError("namespace changed while pinning")
        st.ns_fds.append(fd)


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    sb = ctx.sandbox
    ev.update({"namespaces": {}, "processes_frozen": 0, "freezer": "none"})
    if sb is None:
        raise StepError("no sandbox to isolate")
    recorded = dict(sb.namespaces)
    st.namespaces = {k: v for k, v in recorded.items() if k in residue.NAMESPACES}
    errors = []

    cgroup = sb.cgroup
    ev["freezer"] = _freezer_name(cgroup)
    try:
        await trio.to_thread.run_sync(cgroup.freeze, ctx.timeout)
    except Exception:
        errors.append("freeze did not complete")
    frozen = False
    try:
        frozen = bool(cgroup.frozen())
        st.frozen_pids = list(cgroup.pids())
    except OSError:
        errors.append("cgroup unreadable")
    ev["processes_frozen"] = len(st.frozen_pids) if frozen else 0
    ev["frozen"] = frozen
    if not frozen:
        errors.append("cgroup not frozen")

    init_pid = sb.init_pid
    live: dict[str, int] = {}
    try:
        live = residue.ns_inodes(init_pid)
        in_cgroup = init_pid in st.frozen_pids
        same = bool(recorded) and all(live[n] == recorded.get(n) for n in residue.NAMESPACES)
        if not in_cgroup:
            errors.append("init not in session cgroup")
        if in_cgroup or same:  # after a crash the pid may name another host process
            pin_namespaces(init_pid, live, st)
            st.uid_ranges = residue.id_map(init_pid, "uid_map")
            st.gid_ranges = residue.id_map(init_pid, "gid_map")
        else:
            live = {}
    except (OSError, TypeError):
        errors.append("init process not readable")
    if not st.uid_ranges:
        st.uid_ranges = [(sb.host_uid, sb.host_uid + 1)]
        st.gid_ranges = [(sb.host_gid, sb.host_gid + 1)]
    # evidence keeps the inodes recorded at creation when they are all there, else the live ones
    ns = {n: int(recorded.get(n) or live.get(n) or 0) for n in residue.NAMESPACES}
    own = residue.ns_inodes("self")
    st.namespaces = {n: i for n, i in ns.items() if i and i != own[n]}
    ev["namespaces"] = ns
    if live and any(live[n] != ns[n] for n in residue.NAMESPACES):
        errors.append("namespace inodes differ from creation")
    if any(ns[n] == own[n] or ns[n] == 0 for n in residue.NAMESPACES):
        errors.append("namespace not isolated from host")
    if errors:
        raise StepError("; ".join(errors))
