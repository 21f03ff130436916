"""Step 5 (dire_identity / credential_incineration, method `credential_incineration`).

Scan every thread in /proc for a real/effective/saved/fs uid or gid inside the session's
host ranges (read from /proc/<init>/uid_map and gid_map in step 1; the slot's host uid/gid
when those were not readable), each thread's ids read through a thread pidfd
(PIDFD_GET_INFO) where the kernel has it: no process count per uid is kept by the kernel
where it could be read, so this walk stays.  Holders that are only exiting (zombies) are waited for,
bounded, until reaped; the evidence then says how many were exiting, alive in the
session's PID namespace, or alive outside it (another workload with the same ids), and
how long it waited.  Release the uid slot only when none is left.  Retire the
hostname: it lived only in the session's UTS namespace, so it is retired when no process
is left in that namespace (and the engine forgets it, where it keeps a registry): the
kernel says so when the namespace no longer exists (its nsfs handle is stale: no task,
fd or bind mount holds it), else the threads of /proc are walked for it.  Then
`ctx.revoke()` makes every later call on the session id answer as destroyed.
"""

from __future__ import annotations

import os
import time

import trio

from agent.destroy import residue, shared_walk
from agent.destroy.context import DestroyContext, DestroyState, StepError, settle

METHOD = "credential_incineration"


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    sb = ctx.sandbox
    errors: list[str] = []
    host_uid = sb.host_uid if sb is not None else None
    host_gid = sb.host_gid if sb is not None else None
    if not st.uid_ranges and host_uid is not None:
        st.uid_ranges = [(host_uid, host_uid + 1)]
    if not st.gid_ranges and host_gid is not None:
        st.gid_ranges = [(host_gid, host_gid + 1)]
    ev.update({"host_uid": int(host_uid if host_uid is not None else -1),
               "host_gid": int(host_gid if host_gid is not None else -1),
               "uid_range_size": sum(hi - lo for lo, hi in st.uid_ranges),
               "processes_with_ids": 0, "slot_released": False, "hostname_retired": False,
               "session_revoked": False})
    if not st.uid_ranges:
        errors.append("session uid range unknown")
    uts = st.namespaces.get("uts")
    n = await _settled_scan(ctx, st, ev)
    in_uts = await trio.to_thread.run_sync(_in_uts, st, ev, uts) if uts else 0
    if n:
        errors.append("processes still run with session ids")
    elif sb is not None:
        try:
            await settle(sb.release_slot)
            ev["slot_released"] = True
        except Exception:
            errors.append("slot release failed")
    else:
        errors.append("no slot to release")

    if uts:
        if in_uts == 0 and sb is not None:
            try:
                await settle(sb.retire_hostname)
            except Exception:
                in_uts = -1
        ev["hostname_retired"] = in_uts == 0
    if not ev["hostname_retired"]:
        errors.append("hostname not retired")

    try:
        await settle(ctx.revoke)
        ev["session_revoked"] = True
    except Exception:
        errors.append("revoke failed")
    if errors:
        raise StepError("; ".join(errors))


# how long step 5 waits for exiting holders to be reaped before it records them as unreaped
EXIT_WAIT_SECONDS = 2.0


async def _settled_scan(ctx: DestroyContext, st: DestroyState, ev: dict) -> int:
    """Processes with the session's ids, from one walk of every thread on the host
    (shared with the destructions in flight: shared_walk; `host_walk_sessions` says how
    many sessions it answered; `ids_read_via` how each thread's ids were read).  When the
    walk finds id holders, they are classified (residue.ids_holders); if every one is
    exiting (a zombie, or past releasing its namespaces) the walk is repeated, bounded by
    the context's timeout, until the kernel has reaped them: a dying task is not reported
    as a live one, and a live one (in the session's PID namespace or outside it) fails the
    step at once.  The evidence keeps the first classification and the time waited."""
    query = (tuple(st.uid_ranges), tuple(st.gid_ranges))
    (n, ev["ids_read_via"]), ev["host_walk_sessions"] = await shared_walk.IDS.ask(query)
    if n:
        n = await trio.to_thread.run_sync(_settle, st, ev, min(ctx.timeout, EXIT_WAIT_SECONDS))
    ev["processes_with_ids"] = n
    return n


def _settle(st: DestroyState, ev: dict, timeout: float) -> int:
    """In a worker thread (its waits are real time, whatever clock the event loop runs
    on): classify the holders, and while they are all exiting, look again with a short
    backoff until none is left or `timeout` passed."""
    t0 = time.monotonic()
    pid_ns = st.namespaces.get("pid")
    holders = residue.ids_holders(st.uid_ranges, st.gid_ranges, pid_ns)
    ev.update({f"processes_with_ids_{k}": v for k, v in holders.items()})
    n = 1
    delay = 0.001
    while True:
        n, _ = residue.processes_with_ids_fast(st.uid_ranges, st.gid_ranges)
        if not n or holders["in_session"] or holders["outside"]:
            break
        if residue.zombies_not_ours(st.uid_ranges, st.gid_ranges) == n:
            break  # only zombies another program must reap: recorded as unreaped below
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
        holders = residue.ids_holders(st.uid_ranges, st.gid_ranges, pid_ns)
    ev["exit_wait_us"] = int((time.monotonic() - t0) * 1_000_000)
    if n and not holders["in_session"] and not holders["outside"]:
        # only exited tasks nobody reaped (a re-adopted PID 1 is the host init's child):
        # they run no code and hold no memory; said in the evidence, not counted as running
        ev["processes_with_ids_unreaped"] = n
        return 0
    return n


def namespace_handles(st: DestroyState) -> residue.NsHandles | None:
    """Trade step 1's seven namespace pins for nsfs handles (once; step 6 asks too): from
    here on the namespaces are named by ids the kernel never reuses, and a namespace whose
    last task is gone can be freed, which is what steps 5 and 6 ask the kernel about.
    Without handles (a kernel before 6.18) the pins stay and the walks answer."""
    if st.ns_handles is None:
        st.ns_handles = residue.NsHandles.from_pins(st.ns_fds)
        if st.ns_handles is not None:
            while st.ns_fds:  # (closing the mnt pin may free the mount tree: not on the loop)
                os.close(st.ns_fds.pop())
    return st.ns_handles


def _in_uts(st: DestroyState, ev: dict, uts: int) -> int:
    """In a worker thread: processes in the session's UTS namespace.  When the kernel says
    the namespace no longer exists (its nsfs handle is stale), that is 0 without a walk
    (`uts_namespace_released`); else the threads of /proc are walked for its inode."""
    handles = namespace_handles(st)
    ev["uts_namespace_released"] = False
    if handles is None:
        return residue.processes_in_namespaces([uts], ("uts",))[0]
    alive, fds = handles.reopen(("uts",))
    try:
        if "uts" not in alive:
            ev["uts_namespace_released"] = True
            return 0
        return residue.processes_in_namespaces([alive["uts"]], ("uts",))[0]
    finally:
        for fd in fds.values():
            os.close(fd)
