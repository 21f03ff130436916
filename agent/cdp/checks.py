"""The never-raising check machinery shared by the v1.0 and 2.1 verifiers: a check is a
function that returns, raises `Fail` (checked and false) or raises `Unverifiable` (could
not be checked: reported as null with a reason, never as passed); `run` records the
verdict and turns anything else the hostile input provokes into a failed check, never an
exception.

Result shape (docs/proofs.md): `{valid, level, complete, format, checks, errors,
unverified, notes}`; `notes` says on what a passed check rests when that is not the
obvious (a signed claim standing in for stripped evidence).  `checks` holds the seed's `chain_integrity`, `final_hash`, `signature`
(booleans) and `step_count` (the number of chain entries, an integer), then our
`evidence`, `session_binding`, `destruction_complete`, `signer` (true, false, or null
when unverifiable) and, for a destroy result, `envelope`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

CHECKS = ("chain_integrity", "final_hash", "signature", "step_count", "evidence",
          "session_binding", "destruction_complete", "signer")
TRISTATE = ("evidence", "session_binding", "destruction_complete", "signer", "envelope",
            "receipt_keys")
LEVELS = ("invalid", "self-consistent", "provenance")
MAX_REASON = 200
STEPS_EXPECTED = 8


class Fail(Exception):
    """A check failed with a short reason; `count` is what `step_count` reports with it."""

    def __init__(self, reason: str, *, count: int = 0) -> None:
        super().__init__(reason)
        self.count = count


class Unverifiable(Exception):
    """A check could not be made (evidence stripped, no trust source …); a short reason."""


def new_result(fmt: str) -> dict:
    checks: dict = dict.fromkeys(CHECKS, False)
    checks["step_count"] = 0
    return {"valid": False, "level": "invalid", "complete": False, "format": fmt,
            "checks": checks, "errors": {}, "unverified": {}, "notes": {}}


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


def run(result: dict, name: str, fn: Callable[[], object]) -> None:
    """Run one check.  `step_count`'s function returns the count it found; another
    check may return a string: it passed, and the string goes to `notes`."""
    checks, errors = result["checks"], result["errors"]
    for k in ("errors", "unverified", "notes"):
        result[k].pop(name, None)
    try:
        out = fn()
        checks[name] = out if name == "step_count" else True
        if isinstance(out, str):
            result["notes"][name] = out[:MAX_REASON]
    except Fail as e:
        checks[name] = e.count if name == "step_count" else False
        errors[name] = str(e)[:MAX_REASON]
    except Unverifiable as e:
        checks[name] = None
        result["unverified"][name] = str(e)[:MAX_REASON]
    except RecursionError:
        checks[name] = False
        errors[name] = "nesting too deep"
    except Exception as e:  # hostile input must never escape as an exception
        checks[name] = False
        errors[name] = f"malformed: {type(e).__name__}"
    if name == "step_count" and type(checks[name]) is not int:
        checks[name] = 0


def step_counter(doc: object, expected: int = STEPS_EXPECTED) -> Callable[[], int]:
    """The `step_count` check: the number of chain entries (0 without a chain list),
    with an error when it is not `expected`."""
    def count() -> int:
        chain = doc.get("chain") if isinstance(doc, dict) else None
        n = len(chain) if isinstance(chain, list) else 0
        if not isinstance(chain, list):
            raise Fail("chain is not a list", count=n)
        if n != expected:
            raise Fail(f"chain has {n} steps, expected {expected}", count=n)
        return n
    return count


def finish(result: dict) -> dict:
    """Derive `valid`, `level` and `complete` from the checks.

    valid: chain, final hash and signature check out, there are 8 steps, and no other
    check failed (`destruction_complete` false is an honest incomplete proof: still valid;
    an unverifiable check does not fail the proof but never counts as passed).
    level: "provenance" when valid and the signer is trusted; "self-consistent" when valid
    and the signer was not checked; "invalid" otherwise.
    complete: valid and `destruction_complete` is true (checked, not assumed)."""
    c = result["checks"]
    ok = (c["chain_integrity"] is True and c["final_hash"] is True and c["signature"] is True
          and "step_count" not in result["errors"]
          and all(c.get(k) is not False for k in TRISTATE if k != "destruction_complete"))
    result["valid"] = ok
    result["level"] = "invalid" if not ok else (
        "provenance" if c.get("signer") is True else "self-consistent")
    result["complete"] = ok and c.get("destruction_complete") is True
    return result


def run_all(result: dict, checks: dict[str, Callable[[], object]]) -> dict:
    """Run every check in CHECKS order, then `finish`."""
    for name in CHECKS:
        run(result, name, checks[name])
    return finish(result)


def destruction_complete(doc: object, *, signed_state: bool) -> str | None:
    """The `destruction_complete` check, the same for both formats: the document says
    complete and that claim is checked — against the evidence when present (every step
    recorded ok), else only through a signature over `destruction_state`
    (`signed_state`).  Stripped and unsigned: unverifiable, never true."""
    if not isinstance(doc, dict) or doc.get("destruction_state") != "complete":
        raise Fail("destruction_state is not complete")
    ev = doc.get("evidence")
    if isinstance(ev, list):
        bad = [i + 1 for i, o in enumerate(ev) if not (isinstance(o, dict) and o.get("ok") is True)]
        if bad:
            raise Fail(f"step {bad[0]} did not complete")
        return None
    if ev is None and not signed_state:
        raise Unverifiable("evidence stripped and destruction_state not signed: the "
                           "claim \"complete\" cannot be checked")
    if ev is None:
        return "the signed destruction_state; per-step evidence stripped"
    return None


def evidence_matches_chain(doc: dict, n_steps: int,
                           hash_fn: Callable[[dict], str]) -> list | None:
    """The `evidence` check shared by both formats: when evidence is present, each object
    hashes (`hash_fn`, SHA-256 or SHA-512 of its canonical JSON) to its chain entry's
    `evidence_hash`, and `destruction_state` agrees with the steps' `ok`.  Raises
    Unverifiable when it was stripped for sharing."""
    from agent.cdp.document import destruction_state

    ev = doc.get("evidence")
    if ev is None:
        raise Unverifiable("evidence stripped")
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
