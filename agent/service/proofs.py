"""Destroy results (SPEC 6, 14): a pipeline outcome signed into the v1.0 CDP and its 2.1
AuditProof rendition, and spooled durably.  The only place that builds proof documents."""

from __future__ import annotations

import functools

import structlog
import trio

from agent.cdp.auditproof import build_auditproof
from agent.cdp.document import build_cdp
from agent.cdp.envelope import encoded_destroy_result
from agent.config import Config
from agent.destroy.context import DestroyOutcome
from agent.regulatory import regulatory_context
from agent.service.model import SessionRecord
from agent.service.spool import Spool

__all__ = ["ProofWriter", "sign_cdp"]

_log = structlog.get_logger("nanorix-agent.proofs")


@functools.lru_cache(maxsize=64)
def _regulatory(classification: str, jurisdiction: str) -> dict:
    """regulatory_context() per (class, jurisdiction), built once: the data file is read
    once per process, and encoded_destroy_result puts a copy of it (new containers, the
    same strings) into every result, so this one is never handed out.  At most 5
    classes x 7 jurisdictions (agent/config.py)."""
    return regulatory_context(classification, jurisdiction)


def sign_cdp(outcome: DestroyOutcome, signer) -> dict:
    """The signed CDP v1.0 of a pipeline outcome (SPEC 6)."""
    return build_cdp(session_id=outcome.session_id, created_at=outcome.created_at,
                     destroyed_at=outcome.destroyed_at, evidence=outcome.evidence,
                     signer=signer, encoded=outcome.evidence_json)


class ProofWriter:
    def __init__(self, cfg: Config, key_store, spool: Spool) -> None:
        self.config = cfg
        self.key_store = key_store
        self.spool = spool

    def build(self, record: SessionRecord, outcome: DestroyOutcome) -> dict:
        """The destroy result `{session_id, status, reason, cdp, auditproof,
        regulatory_context, session_context, envelope}` (agent/cdp/envelope.py: the CDP
        gets its binding signature, the whole its envelope), signed, not yet spooled."""
        return self.build_encoded(record, outcome)[0]

    def build_encoded(self, record: SessionRecord, outcome: DestroyOutcome
                      ) -> tuple[dict, bytes]:
        """build() and the result's canonical JSON (what the spool stores).  Each evidence
        object is serialised once, by the pipeline (outcome.evidence_json): both chains
        hash those bytes, and the whole result is serialised once more here."""
        signer = self.key_store.current()
        cdp = sign_cdp(outcome, signer)
        auditproof = build_auditproof(
            signer=signer, customer_id=record.customer_id, jurisdiction=record.jurisdiction,
            authority_id=self.config.authority_id, signing_key_version=signer.generation,
            exec_count=record.exec_count, region=self.config.auditproof.region or None,
            cdp_v1=cdp, encoded=outcome.evidence_json)
        return encoded_destroy_result(
            signer=signer, session_id=record.session_id, status=outcome.status,
            reason=outcome.reason, cdp=cdp, auditproof=auditproof,
            regulatory_context=_regulatory(record.classification, record.jurisdiction),
            session_context={"jurisdiction": record.jurisdiction,
                             "data_classification": record.classification})

    async def write(self, record: SessionRecord, outcome: DestroyOutcome) -> dict:
        """build() then spool it durably (fsynced before this returns, in a worker
        thread so the fsyncs do not stall every other session on the event loop)."""
        result, data = self.build_encoded(record, outcome)
        # when the spool cannot take it the proof is kept (memory + fallback dir, retried
        # by the health monitor, rzl false meanwhile): never dropped, never a failed destroy
        if not await trio.to_thread.run_sync(self.spool.put, record.session_id, result,
                                             data):
            _log.error("proof_not_durable", session_id=record.session_id,
                       error=self.spool.last_error)
        return result
