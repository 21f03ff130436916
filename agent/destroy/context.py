"""What the destruction pipeline is given (DestroyContext), what it hands back
(DestroyOutcome), the test hooks (DestroyHooks) and the facts the steps pass to each other
(DestroyState).  No step keeps a file name, a command or a byte of customer data here."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from agent.keys.session import SessionKey
from agent.sandbox.engine import Sandbox

if TYPE_CHECKING:
    from agent.destroy.residue import NsHandles

__all__ = ["REASONS", "DestroyContext", "DestroyHooks", "DestroyOutcome", "DestroyState",
           "InjectedFault", "KeyOwner", "SessionFacts", "StepError", "settle"]

# sandbox_failed: the sandbox's PID 1 (nrx-init) died on its own (killed from the host,
# crashed); the agent noticed through its pidfd and ended the session
# pool_retired: a warm-pool sandbox never bound to a session (agent/service/pool.py; no CDP)
REASONS = ("requested", "ttl_expired", "oom", "operator", "agent_recovery", "sandbox_failed",
           "pool_retired")


class StepError(RuntimeError):
    """A step could not do or verify its work.  The message is a short fixed reason written
    by the step (never a path, name, command or data) and goes into evidence `error`."""


class InjectedFault(StepError):
    """Raised inside step N when DestroyHooks.fail_step == N (tests only)."""


class SessionFacts(Protocol):
    """What the pipeline reads of a session (agent.service.model.SessionRecord): never
    commands or data.  `receipts` are the signed exec receipts in seq order;
    `audit_events` the audit log `{"seq", "kind", "hash", "at"}` (kinds `created`, `exec`
    with hash = hex receipt leaf, `destroy_requested`), sealed by step 7."""

    session_id: str
    customer_id: str
    tier: str
    classification: str
    jurisdiction: str
    created_at: str
    receipts: list[dict]
    audit_events: list[dict]
    exec_count: int
    receipt_keys: list[dict]  # every receipt key, in epoch order (agent/cdp/receiptkeys.py)


@dataclass
class DestroyHooks:
    """Test-only instrumentation: `after_step(n, evidence)` is awaited after step n's
    evidence is final; `before_kill(pids)` is awaited inside step 3 after the memory wipe
    and before the kill (the wiped processes still exist, frozen); `fail_step = n` raises
    InjectedFault at the start of step n."""

    after_step: Callable[[int, dict], Awaitable[None]] | None = None
    before_kill: Callable[[list[int]], Awaitable[None]] | None = None
    fail_step: int | None = None


async def settle(fn: Callable[[], Any]) -> Any:
    """Call `fn` and await its result when it is awaitable: a sandbox method the steps
    call is plain in the daemon (agent.sandbox.engine.Sandbox) and a call back to the
    daemon in a destroy worker (agent.destroy.workers.WorkerSandbox)."""
    value = fn()
    if inspect.isawaitable(value):
        return await value
    return value


class KeyOwner(Protocol):
    """Runs step 4 where the session key lives (the daemon), for a pipeline that does not
    hold it (a destroy worker, or the daemon re-running a destruction whose worker died
    after step 4 had already zeroized the key): fills `ev` with what the daemon measured
    and raises StepError with its error when the step failed there."""

    async def key_step(self, ev: dict) -> None: ...


@dataclass
class DestroyContext:
    sandbox: Sandbox | None             # None: recovery found no sandbox to re-adopt
    session: SessionFacts
    session_key: SessionKey | None
    passes: list[str]                   # config.classes[classification].wipe_passes
    reason: str                         # one of REASONS
    node_id: str
    agent_version: str
    revoke: Callable[[], object]        # later calls on the session id answer as destroyed
                                        # (a destroy worker's returns an awaitable: settle())
    hooks: DestroyHooks | None = None
    timeout: float = 5.0                # bound for each wait (freeze, empty, memory 0)
    key_owner: KeyOwner | None = None   # set where step 4 must run elsewhere (see KeyOwner)
    attempts: int = 1                   # > 1: a worker died mid-destruction (step 8 says so)


@dataclass
class DestroyState:
    """Facts measured by one step and used by a later one (in memory, never persisted)."""

    namespaces: dict[str, int] = field(default_factory=dict)  # re-read in step 1
    uid_ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) host uids
    gid_ranges: list[tuple[int, int]] = field(default_factory=list)
    tmpfs_dev: str | None = None       # "major:minor" of the session tmpfs superblock
    tmpfs_dev_num: int | None = None    # st_dev of the same
    pin_fd: int = -1                    # O_PATH fd keeping the superblock (and so its dev
                                        # number) alive until step 6 has scanned for it
    ns_fds: list[int] = field(default_factory=list)  # pins on the 7 namespaces (steps 1-5)
    ns_handles: NsHandles | None = None  # the same 7 by nsfs handle (step 5 on; residue.py)
    deferred_fds: list[int] = field(default_factory=list)  # leased files: step 2 -> step 3
    frozen_pids: list[int] = field(default_factory=list)
    leaves_fs: list[bytes] = field(default_factory=list)   # read-back digests, step 2
    leaves_mem: list[bytes] = field(default_factory=list)  # read-back digests, step 3
    cgroup_paths: list[str] = field(default_factory=list)
    chain_at_step: dict[int, str] = field(default_factory=dict)  # h_i sealed when step i ended
    evidence: list[dict] = field(default_factory=list)
    evidence_json: list[bytes] = field(default_factory=list)  # canonical JSON of each
                                        # evidence object as sealed (serialised once)
    destroy_started: float = 0.0
    destroyed_at: str = ""              # seconds precision, set before step 8


@dataclass
class DestroyOutcome:
    session_id: str
    created_at: str
    destroyed_at: str
    reason: str
    status: str                         # destroyed | expired | expired_unclean
    destruction_state: str              # complete | incomplete
    evidence: list[dict]
    teardown_ok: bool = True            # the final best-effort teardown raised nothing
    duration_us: int = 0
    # the evidence objects in canonical JSON as the pipeline sealed them (the proof's
    # chains hash these bytes instead of serialising the evidence again; a destroy worker
    # sends its own); None when not one per object (the proof then serialises them)
    evidence_json: list[bytes] | None = None
