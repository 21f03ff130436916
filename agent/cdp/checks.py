"""The never-raising check machinery shared by the v1.0 and 2.1 verifiers: a check is a
function that returns or raises `Fail` with a short reason; `run` records the verdict and
turns anything else the hostile input provokes into a failed check, never an exception."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

CHECKS = ("chain_integrity", "final_hash", "signature", "step_count", "evidence",
          "session_binding", "destruction_complete")
MAX_REASON = 200


class Fail(Exception):
    """A check failed with a short reason."""


def new_result(fmt: str) -> dict:
    return {"valid": False, "format": fmt, "checks": dict.fromkeys(CHECKS, False), "errors": {}}


def decode_b64(value: object, nbytes: int, what: str) -> bytes:
    """Raw bytes of a `base64:…` string of exactly `nbytes`; raises Fail otherwise."""
    if not isinstance(value, str):
        raise Fail(f"{what} is not a string")
    if not value.startswith("base64:"):
        raise Fail(f"{what} lacks the base64: prefix")
    if len(value) > 4 * nbytes + 16:
        raise Fail(f"{what} is too long")
    try:
        raw = base64.b64decode(value[7:], validate=True)
    except (binascii.Error, ValueError):
        raise Fail(f"{what} is not valid base64") from None
    if len(raw) != nbytes:
        raise Fail(f"{what} is {len(raw)} bytes, expected {nbytes}")
    return raw


def run(result: dict, name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
        result["checks"][name] = True
    except Fail as e:
        result["checks"][name] = False
        result["errors"][name] = str(e)[:MAX_REASON]
    except RecursionError:
        result["checks"][name] = False
        result["errors"][name] = "nesting too deep"
    except Exception as e:  # hostile input must never escape as an exception
        result["checks"][name] = False
        result["errors"][name] = f"malformed: {type(e).__name__}"


def destruction_complete(doc: object) -> None:
    """The `destruction_complete` check, the same for both formats: the document says
    complete and, when evidence is present, every step recorded ok."""
    if not isinstance(doc, dict) or doc.get("destruction_state") != "complete":
        raise Fail("destruction_state is not complete")
    ev = doc.get("evidence")
    if isinstance(ev, list):
        bad = [i + 1 for i, o in enumerate(ev) if not (isinstance(o, dict) and o.get("ok") is True)]
        if bad:
            raise Fail(f"step {bad[0]} did not complete")


def run_all(result: dict, checks: dict[str, Callable[[], None]]) -> dict:
    """Run every check in CHECKS order; `valid` needs all but `destruction_complete`
    (an honest record of an incomplete destruction is a valid proof)."""
    for name in CHECKS:
        run(result, name, checks[name])
    result["valid"] = all(v for k, v in result["checks"].items() if k != "destruction_complete")
    return result


def evidence_matches_chain(doc: dict, n_steps: int,
                           hash_fn: Callable[[dict], str]) -> list | None:
    """The `evidence` check shared by both formats: when evidence is present, each object
    hashes (`hash_fn`, SHA-256 or SHA-512 of its canonical JSON) to its chain entry's
    `evidence_hash`, and `destruction_state` agrees with the steps' `ok`.  Returns the
    evidence list, or None when it was stripped for sharing."""
    from agent.cdp.document import destruction_state

    ev = doc.get("evidence")
    if ev is None:
        return None
    if not isinstance(ev, list):
        raise Fail("evidence is not a list")
    if len(ev) != n_steps:
        raise Fail(f"evidence has {len(ev)} objects, expected {n_steps}")
    chain = doc.get("chain")
    if not isinstance(chain, list) or len(chain) != n_steps:
        raise Fail(f"no {n_steps}-step chain to compare with")
    for i, (obj, entry) in enumerate(zip(ev, chain, strict=True)):
        if not isinstance(obj, dict):
            raise Fail(f"evidence[{i}] is not an object")
        try:
            h = hash_fn(obj)
        except ValueError as e:  # CanonicalError
            raise Fail(f"evidence[{i}]: {e}") from None
        if not isinstance(entry, dict) or entry.get("evidence_hash") != h:
            raise Fail(f"evidence[{i}] does not match chain[{i}].evidence_hash")
    derived = destruction_state(ev)
    if doc.get("destruction_state") != derived:
        raise Fail(f"destruction_state disagrees with the evidence ({derived})")
    return ev
