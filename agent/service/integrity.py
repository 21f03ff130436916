"""State damage found at start (docs/operations.md "State faults"), before crash recovery.

The journal, the spool and the host are three records of the same sessions; each can
lose something (a garbage or truncated WAL tail silently drops committed rows, a deleted
journal drops all of them, a spool file can be truncated, overwritten or deleted).  At
start they are cross-checked, every loss is logged at error level with what was lost,
counted (metrics `state_damage_total{kind}`, health `state_damage`), and repaired as far
as the evidence allows:

* damaged spool files and an unusable journal are quarantined (`Spool.scan`, `Journal`);
* a live session known only from its spool reservation or from what the host shows (a
  session cgroup or mount the reclaimers will find) gets its journal row rebuilt, so
  recovery destroys it like any other and proves it from what the host shows;
* a spooled proof with no journal row gets its (ended) row back from the proof;
* an ended session whose proof was never acknowledged and is no longer in the spool is
  listed in `reprove`: the caller runs the destruction pipeline for it again (nothing of
  the sandbox is left, so that proof says honestly what can still be verified).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from agent.service.journal import LIVE_STATUSES, Journal, JournalUnwritable
from agent.service.spool import Damage, Spool
from agent.timefmt import iso_seconds

__all__ = ["IntegrityReport", "check_state"]

_log = structlog.get_logger("nanorix-agent.integrity")
UNKNOWN_CUSTOMER = "unknown"


@dataclass
class IntegrityReport:
    damage: list[Damage] = field(default_factory=list)
    reprove: list[dict] = field(default_factory=list)  # ended journal rows missing a proof

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.damage:
            out[d.kind] = out.get(d.kind, 0) + 1
        return out


def check_state(journal: Journal, spool: Spool, *, host_sessions: Iterable[str] = (),
                default_tier: str = "free") -> IntegrityReport:
    """Cross-check journal, spool and host (session ids the host still shows); see the
    module docstring.  Logs and returns what was found."""
    report = IntegrityReport()
    report.damage += [Damage(**d) for d in journal.damage]
    report.damage += spool.scan()
    reservations = spool.reservations()
    for sid in sorted(set(reservations) | set(host_sessions)):
        if journal.get(sid) is not None:
            continue
        header = reservations.get(sid) or {}
        source = "spool reservation" if header else "the host (no reservation: metadata unknown)"
        try:
            _row_from_reservation(journal, sid, header, default_tier)
        except JournalUnwritable as e:
            report.damage.append(Damage("journal_row", sid, f"live session missing from the "
                                        f"journal; its row could not be rebuilt ({e})"))
            continue
        report.damage.append(Damage("journal_row", sid, f"live session missing from the "
                                    f"journal; row rebuilt from {source}"))
    for proof in spool.pending():
        sid = str(proof.get("session_id"))
        if journal.get(sid) is None:
            try:
                _row_from_proof(journal, proof)
            except JournalUnwritable as e:
                report.damage.append(Damage("journal_row", sid, f"ended session missing "
                                            f"from the journal; not rebuilt ({e})"))
                continue
            report.damage.append(Damage("journal_row", sid, "ended session missing from the "
                                        "journal; row rebuilt from its spooled proof"))
    for row in journal.ended_unacked():
        sid = row["session_id"]
        if spool.get(sid) is None:
            report.damage.append(Damage("proof_missing", sid, f"ended ({row['status']}) and "
                                        "its unacknowledged proof is not in the spool; "
                                        "proving it again from what is left"))
            report.reprove.append(row)
    for d in report.damage:
        _log.error("state_damaged", kind=d.kind, session_id=d.session_id, lost=d.error,
                   quarantined_to=d.quarantined_to)
    return report


def _row_from_reservation(journal: Journal, sid: str, header: dict, default_tier: str) -> None:
    journal.insert_session(
        session_id=sid, customer_id=header.get("customer_id", UNKNOWN_CUSTOMER),
        tier=header.get("tier", default_tier),
        classification=header.get("classification", "general"),
        jurisdiction=header.get("jurisdiction", "OTHER"),
        created_at=header.get("created_at", iso_seconds()),
        ttl_seconds=int(header.get("ttl_seconds", 0)), status="active")


def _row_from_proof(journal: Journal, proof: dict) -> None:
    cdp = proof.get("cdp") or {}
    ctx = proof.get("session_context") or {}
    ap = proof.get("auditproof") or {}
    journal.insert_session(
        session_id=proof["session_id"], customer_id=str(ap.get("org_id") or UNKNOWN_CUSTOMER),
        tier="unknown", classification=ctx.get("data_classification", "general"),
        jurisdiction=ctx.get("jurisdiction", "OTHER"),
        created_at=cdp.get("created_at") or iso_seconds(), ttl_seconds=0,
        status=proof.get("status") if proof.get("status") not in LIVE_STATUSES
        else "expired_unclean", reason=proof.get("reason"))
