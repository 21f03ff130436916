"""Step 4 (dire_keys / key_zeroization, method `ed25519_key_destruction`).

Zeroize the session's own secret key (the exec-receipt key, SPEC 7) in its locked memory
and read it back: `SessionKey.zeroize()` reports per key `{key_id, purpose, bytes,
zeroized, readback_zero}` as measured in C.  A session without a key object (agent
recovery: the key died with the old agent process, unverified) fails this step honestly.

`agent_memory` (issue 13) records what the agent did about its own copies of the session's
data: a garbage collection, the bytes of its exec buffers it zeroed, and whether freed
memory is measured to be cleared (agent/memory_hygiene.py; docs/security.md).  It is
evidence, not a pass/fail condition of this step.
"""

from __future__ import annotations

from agent import memory_hygiene
from agent.destroy.context import DestroyContext, DestroyState, StepError

METHOD = "ed25519_key_destruction"
_FIELDS = ("key_id", "purpose", "bytes", "zeroized", "readback_zero")


def _normalise(rep) -> list[dict]:
    if isinstance(rep, dict) and "keys" in rep:
        rep = rep["keys"]
    if isinstance(rep, dict):
        rep = [rep]
    out = []
    for k in rep or []:
        out.append({"key_id": str(k.get("key_id", "")),
                    "purpose": str(k.get("purpose", "exec_receipts")),
                    "bytes": int(k.get("bytes", 0)),
                    "zeroized": k.get("zeroized") is True,
                    "readback_zero": k.get("readback_zero") is True})
    return out


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    ev["keys"] = []
    zeroed = ctx.sandbox.buffers_zeroed if ctx.sandbox is not None else 0
    ev["agent_memory"] = memory_hygiene.measure(zeroed)
    if ctx.session_key is None:
        raise StepError("no session key in this agent to zeroize")
    keys = _normalise(ctx.session_key.zeroize())
    ev["keys"] = keys
    if not keys:
        raise StepError("key reported nothing zeroized")
    if not all(k["zeroized"] and k["readback_zero"] and k["bytes"] > 0 for k in keys):
        raise StepError("key read-back not zero")
