"""Destruction (SPEC 5): one module per step, in order, and the pipeline that runs them.

    outcome = await run_pipeline(DestroyContext(...))

(the signed documents are built from the outcome by agent.service.proofs)

1 environment_isolation   2 filesystem_destruction   3 multipass_overwrite
4 key_zeroization         5 credential_incineration  6 merkle_zero_verification
7 chain_integrity_seal    8 lifecycle_completion
`residue` holds the procfs/mountinfo scans, `wipe` the overwrite passes.
"""

from agent.destroy.context import (
    REASONS,
    DestroyContext,
    DestroyHooks,
    DestroyOutcome,
    SessionFacts,
)
from agent.destroy.pipeline import run_pipeline

__all__ = ["REASONS", "DestroyContext", "DestroyHooks", "DestroyOutcome", "SessionFacts",
           "run_pipeline"]
