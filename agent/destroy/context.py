"""What the destruction pipeline is given (DestroyContext), what it hands back
(DestroyOutcome), the test hooks (DestroyHooks) and the facts the steps pass to each other
(DestroyState).  No step keeps a file name, a command or a byte of customer data here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REASONS", "DestroyContext", "DestroyHooks", "DestroyOutcome", "DestroyState",
           "InjectedFault", "SessionRecord", "StepError"]

# sandbox_failed: the sandbox's PID 1 (nrx-init) died on its own (killed from the host,
# crashed); the agent noticed through its pidfd and ended the session
REASONS = ("requested", "ttl_expired", "oom", "operator", "agent_recovery", "sandbox_failed")


class StepError(RuntimeError):
    """A step could not do or verify its work.  The message is a short fixed reason written
    by the step (never a path, name, command or data) and goes into evidence `error`."""


class InjectedFault(StepError):
    """Raised inside step N when DestroyHooks.fail_step == N (tests only)."""


@dataclass
class SessionRecord:
    """The session's metadata as the daemon knows it (SPEC 2): never commands or data.

    `receipts` are the signed exec receipts (SPEC 4) in seq order.  `audit_events` are the
    audit log entries `{"seq": int, "kind": str, "hash": str, "at": str}` with kinds
    `created`, `exec` (hash = hex of receipt_leaf(receipt)) and `destroy_requested`; see
    chain_integrity_seal for the hash chain over them.
    """

    session_id: str
    customer_id: str = ""
    tier: str = "free"
    classification: str = "general"
    jurisdiction: str = "US"
    created_at: str = ""
    receipts: list[dict] = field(default_factory=list)
    audit_events: list[dict] = field(default_factory=list)
    exec_count: int = 0


@dataclass
class DestroyHooks:
    """Test-only instrumentation: `after_step(n, evidence)` is awaited after step n's
    evidence is final; `before_kill(pids)` is awaited inside step 3 after the memory wipe
    and before the kill (the wiped processes still exist, frozen); `fail_step = n` raises
    InjectedFault at the start of step n."""

    after_step: Callable[[int, dict], Awaitable[None]] | None = None
    before_kill: Callable[[list[int]], Awaitable[None]] | None = None
    fail_step: int | None = None


@dataclass
class DestroyContext:
    sandbox: Any | None                 # agent.sandbox.engine.Sandbox; None/partial on recovery
    session: SessionRecord
    session_key: Any | None             # agent.keys.session.SessionKey
    passes: list[str]                   # config.classes[classification].wipe_passes
    reason: str                         # one of REASONS
    node_id: str
    agent_version: str
    revoke: Callable[[], None]          # later calls on the session id answer as destroyed
    hooks: DestroyHooks | None = None
    timeout: float = 5.0                # bound for each wait (freeze, empty, memory 0)


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
    ns_fds: list[int] = field(default_factory=list)  # pins on the 7 namespaces (steps 1-6)
    deferred_fds: list[int] = field(default_factory=list)  # leased files: step 2 -> step 3
    frozen_pids: list[int] = field(default_factory=list)
    leaves_fs: list[bytes] = field(default_factory=list)   # read-back digests, step 2
    leaves_mem: list[bytes] = field(default_factory=list)  # read-back digests, step 3
    cgroup_paths: list[str] = field(default_factory=list)
    chain_at_step: dict[int, str] = field(default_factory=dict)  # h_i sealed when step i ended
    evidence: list[dict] = field(default_factory=list)
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

    def build_cdp(self, signer) -> dict:
        """The signed CDP v1.0 of this outcome (SPEC 6)."""
        from agent.cdp.document import build_cdp

        return build_cdp(session_id=self.session_id, created_at=self.created_at,
                         destroyed_at=self.destroyed_at, evidence=self.evidence, signer=signer)
