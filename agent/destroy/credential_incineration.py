"""Step 5 (dire_identity / credential_incineration, method `credential_incineration`).

Scan every thread in /proc for a real/effective/saved/fs uid or gid inside the session's
host ranges (read from /proc/<init>/uid_map and gid_map in step 1; the slot's host uid/gid
when those were not readable).  Holders that are only exiting (zombies) are waited for,
bounded, until reaped; the evidence then says how many were exiting, alive in the
session's PID namespace, or alive outside it (another workload with the same ids), and
how long it waited.  Release the uid slot only when none is left.  Retire the
hostname: it lived only in the session's UTS namespace, so it is retired when no process
is left in that namespace (and the engine forgets it, where it keeps a registry).  Then
`ctx.revoke()` makes every later call on the session id answer as destroyed.
"""

from __future__ import annotations

import time

import trio

from agent.destroy import residue, shared_walk
from agent.destroy.context import DestroyContext, DestroyState, StepError

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
    n, in_uts = await _settled_scan(ctx, st, ev, uts)
    if n:
        errors.append("processes still run with session ids")
    elif sb is not None:
        try:
            sb.release_slot()
            ev["slot_released"] = True
        except Exception:
            errors.append("slot release failed")
    else:
        errors.append("no slot to release")

    if uts:
        if in_uts == 0 and sb is not None:
            try:
                sb.retire_hostname()
            except Exception:
                in_uts = -1
        ev["hostname_retired"] = in_uts == 0
    if not ev["hostname_retired"]:
        errors.append("hostname not retired")

    try:
        ctx.revoke()
        ev["session_revoked"] = True
    except Exception:
        errors.append("revoke failed")
    if errors:
        raise StepError("; ".join(errors))


async def _settled_scan(ctx: DestroyContext, st: DestroyState, ev: dict,
                        uts: int | None) -> tuple[int, int]:
    """(processes with the session's ids, processes in its UTS namespace), from one walk
    of every thread on the host (shared with the destructions in flight: shared_walk;
    `host_walk_sessions` says how many sessions it answered).  When the walk finds id holders, they are classified
    (residue.ids_holders); if every one is exiting (a zombie, or past releasing its
    namespaces) the walk is repeated, bounded by the context's timeout, until the kernel
    has reaped them: a dying task is not reported as a live one, and a live one (in the
    session's PID namespace or outside it) fails the step at once.  The evidence keeps the
    first classification and the time waited."""
    query = (tuple(st.uid_ranges), tuple(st.gid_ranges), (uts,) if uts else ())

    async def scan() -> tuple[int, int]:
        (n, in_uts, _), served = await shared_walk.IDS_AND_UTS.ask(query)
        ev["host_walk_sessions"] = served
        return n, in_uts

    n, in_uts = await scan()
    if n:
        t0 = time.perf_counter_ns()
        holders = await trio.to_thread.run_sync(
            residue.ids_holders, st.uid_ranges, st.gid_ranges, st.namespaces.get("pid"))
        ev.update({f"processes_with_ids_{k}": v for k, v in holders.items()})
        delay = 0.001
        with trio.move_on_after(ctx.timeout):
            while n and not holders["in_session"] and not holders["outside"]:
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
                n, in_uts = await scan()
                if n:
                    holders = await trio.to_thread.run_sync(
                        residue.ids_holders, st.uid_ranges, st.gid_ranges,
                        st.namespaces.get("pid"))
        ev["exit_wait_us"] = (time.perf_counter_ns() - t0) // 1000
    ev["processes_with_ids"] = n
    return n, in_uts
