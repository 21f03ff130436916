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
    n, in_uts = await _settled_scan(ctx, st, ev, uts)
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


async def _settled_scan(ctx: DestroyContext, st: DestroyState, ev: dict,
                        uts: int | None) -> tuple[int, int]:
    """(processes with the session's ids, processes in its UTS namespace), from one walk
    of every thread on the host (shared with the destructions in flight: shared_walk;
    `host_walk_sessions` says how many sessions it answered).  When the walk finds id
    holders, they are classified (residue.ids_holders); if every one is exiting (a zombie,
    or past releasing its namespaces) the walk is repeated, bounded by the context's
    timeout, until the kernel has reaped them: a dying task is not reported as a live
    one, and a live one (in the session's PID namespace or outside it) fails the step at
    once.  The evidence keeps the first classification and the time waited."""
    query = (tuple(st.uid_ranges), tuple(st.gid_ranges), (uts,) if uts else ())
    (n, in_uts, _), ev["host_walk_sessions"] = await shared_walk.IDS_AND_UTS.ask(query)
    if n:
        n, in_uts = await trio.to_thread.run_sync(_settle, st, ev, uts,
                                                  min(ctx.timeout, EXIT_WAIT_SECONDS))
    ev["processes_with_ids"] = n
    return n, in_uts


def _settle(st: DestroyState, ev: dict, uts: int | None, timeout: float) -> tuple[int, int]:
    """In a worker thread (its waits are real time, whatever clock the event loop runs
    on): classify the holders, and while they are all exiting, look again with a short
    backoff until none is left or `timeout` passed."""
    t0 = time.monotonic()
    pid_ns = st.namespaces.get("pid")
    holders = residue.ids_holders(st.uid_ranges, st.gid_ranges, pid_ns)
    ev.update({f"processes_with_ids_{k}": v for k, v in holders.items()})
    n = in_uts = 1
    delay = 0.001
    while True:
        n, in_uts, _ = residue.processes_with_ids_and_in_namespaces(
            st.uid_ranges, st.gid_ranges, [uts] if uts else [], ("uts",))
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
        return 0, in_uts
    return n, in_uts
