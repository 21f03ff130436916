"""`nanorix-agent verify FILE… [--trust KEYS.json|DIR]… [--agent [SOCKET]]
[--require-trust] [--json] [--format auto|cdp|auditproof]`: offline proof verification
(SPEC 6, 14; levels in docs/proofs.md).

A file may hold a bare CDP v1.0, a bare AuditProof 2.1 rendition, or anything that wraps
them under `cdp` / `auditproof` (a destroy result, `proof.get`, the shared vector file).
`--format` picks which proof of a wrapper to check (default: every one present; the
destroy result's `envelope` is checked with the CDP).

Trust: `--trust` takes key sets from `nanorix-agent keys export` (files, or directories
of `*.json`; repeatable); `--agent` asks a running agent's `key.get` instead (default
socket: `$NANORIX_AGENT_SOCKET` or /run/nanorix-agent/agent.sock; write `--agent=PATH`
or put it after the files).  With a trust source a proof whose signer is not trusted is
INVALID; without one the verdict says the signer was not checked, and `--require-trust`
makes that a failure.

Exit status: 0 every file valid (with `--require-trust`: and its signer trusted), 1 at
least one is not, 2 at least one unreadable or not JSON, an unreadable trust file or an
unreachable agent (2 wins over 1).  `-` reads standard input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from agent.cdp.checks import LEVELS, finish
from agent.cdp.trust import KeySet, LookupTrust, TrustSource, parse_keys
from agent.cdp.verify import verify

__all__ = ["load_trust", "main", "verify_file"]

MAX_BYTES = 256 * 1024 * 1024
MAX_TRUST_BYTES = 16 * 1024 * 1024
LABELS = {"cdp-1.0": "CDP 1.0", "auditproof-2.1": "AuditProof 2.1", "unknown": "unknown format",
          "receipts": "Receipts"}
MARKS = {True: "✓", False: "✗", None: "?"}


class TrustError(Exception):
    """A trust source could not be read; exit 2."""


def _load(path: str) -> tuple[object | None, str | None]:
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_BYTES + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    if len(raw) > MAX_BYTES:
        return None, f"larger than {MAX_BYTES} bytes"
    try:
        return json.loads(raw), None
    except RecursionError:
        return [], None  # JSON, but nested too deep to be a proof: reported invalid
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not JSON: {str(e)[:120]}"


def load_trust(paths: list[str]) -> KeySet:
    """One KeySet from key set files and directories of them; TrustError on anything
    unreadable or malformed (a trust file is never half-read)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.is_file())
            if not found:
                raise TrustError(f"{p}: no *.json key set in this directory")
            files.extend(found)
        else:
            files.append(p)
    records: list[dict] = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                raw = fh.read(MAX_TRUST_BYTES + 1)
            if len(raw) > MAX_TRUST_BYTES:
                raise TrustError(f"{f}: larger than {MAX_TRUST_BYTES} bytes")
            records.extend(parse_keys(json.loads(raw), str(f)))
        except OSError as e:
            raise TrustError(f"{f}: cannot read: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:
            raise TrustError(f"{f}: {str(e)[:200]}") from None
    try:
        return KeySet(records, "trusted keys from " + ", ".join(paths))
    except ValueError as e:
        raise TrustError(str(e)) from None


class AgentTrust(LookupTrust):
    """A trust source asking a running agent's `key.get` over one connection held for
    the run; TrustError when the agent cannot be reached."""

    def __init__(self, socket_path: str | None) -> None:
        from agent.errors import NotFound
        from agent.rpc.client import Client, default_socket

        path = socket_path or str(default_socket())
        try:
            self.client = Client(path, timeout=30)
        except OSError as e:
            raise TrustError(f"cannot reach the agent at {path}: {e.strerror or e}") from None

        def lookup(key_id: str) -> dict | None:
            try:
                return self.client.call("key.get", {"key_id": key_id})
            except NotFound:
                return None

        super().__init__(lookup, f"the agent at {path}")

    def close(self) -> None:
        self.client.close()


def verify_file(path: str, fmt: str = "auto", trust: TrustSource | None = None) -> dict:
    """`{"file", "readable", "valid", "level", "complete", "error"?, "results": […]}`;
    `level` is the lowest of the results' ("invalid" < "self-consistent" < "provenance")."""
    doc, err = _load(path)
    if err is not None:
        return {"file": path, "readable": False, "valid": False, "level": "invalid",
                "complete": False, "error": err, "results": []}
    wrapper = isinstance(doc, dict) and "cdp_version" not in doc \
        and ("cdp" in doc or "auditproof" in doc)
    results = []
    error = None
    if wrapper:
        assert isinstance(doc, dict)
        if fmt in ("auto", "cdp") and "cdp" in doc:
            full = verify(doc, trust)  # the envelope covers the rendition too
            sub = full.pop("auditproof", None)
            results.append(finish(full))  # the CDP's own verdict, rendition apart
            if sub is not None and fmt == "auto":
                results.append(sub)
        elif fmt in ("auto", "auditproof") and doc.get("auditproof") is not None:
            results.append(verify(doc["auditproof"], trust))
        if not results:
            error = f"no {fmt} proof in this file"
    else:
        results.append(verify(doc, trust))
        want = {"cdp": "cdp-1.0", "auditproof": "auditproof-2.1"}.get(fmt)
        if want and results[0]["format"] != want:
            error = f"not a {fmt} proof"
    valid = error is None and all(r["valid"] for r in results)
    levels = [r["level"] for r in results] or ["invalid"]
    level = "invalid" if not valid else min(levels, key=LEVELS.index)
    rep = {"file": path, "readable": True, "valid": valid, "level": level,
           "complete": valid and all(r["complete"] for r in results), "results": results}
    if error is not None:
        rep["error"] = error
    return rep


def add_receipts(rep: dict, proof_path: str, receipts_path: str,
                 trust: TrustSource | None) -> None:
    """Check the receipts in `receipts_path` against the proof (receiptkeys.
    verify_receipts) into `rep["receipts"]`; the file is valid only if they are."""
    from agent.cdp.receiptkeys import verify_receipts

    doc, _ = _load(proof_path)
    items, err = _load(receipts_path)
    if err is not None or not isinstance(items, list):
        rv = {"valid": False, "complete": False, "checks": {},
              "errors": {"receipts": err or "not a JSON list"}, "unverified": {}, "notes": {}}
    else:
        rv = verify_receipts(doc, [r.get("receipt", r) if isinstance(r, dict) else r
                                   for r in items], trust)
    rep["receipts"] = rv
    rep["valid"] = rep["valid"] and rv["valid"]
    rep["complete"] = rep["complete"] and rv["complete"]
    if not rep["valid"]:
        rep["level"] = "invalid"


def _verdict(rep: dict, trusted: bool) -> str:
    if not rep["valid"]:
        return "INVALID"
    if rep["level"] == "provenance":
        head = "VALID — signer trusted (provenance)"
    else:
        head = ("VALID as far as checked — self-consistent only: the signer was NOT checked"
                + ("" if trusted else " (no --trust or --agent given)"))
    if not rep["complete"]:
        incomplete = any(r["checks"].get("destruction_complete") is False
                         for r in rep["results"])
        head += ("; destruction INCOMPLETE" if incomplete else
                 "; NOT COMPLETE: completion cannot be checked")
    return head


def _print_human(rep: dict, out: TextIO, trusted: bool) -> None:
    if not rep["readable"]:
        print(f"{rep['file']}: UNREADABLE — {rep['error']}", file=out)
        return
    print(f"{rep['file']}: {_verdict(rep, trusted)}"
          + (f" — {rep['error']}" if rep.get("error") else ""), file=out)
    rv = rep.get("receipts")
    results = rep["results"] + ([dict(rv, format="receipts", level="complete" if rv["complete"]
                                      else "valid, not complete")] if rv else [])
    for r in results:
        print(f"  {LABELS.get(r['format'], r['format'])}: "
              f"{r['level'] if r['valid'] else 'invalid'}", file=out)
        for name, ok in r["checks"].items():
            if name == "step_count":
                ok = "step_count" not in r["errors"]
                label = f"step_count: {r['checks']['step_count']}"
            else:
                label = name
            reason = (r["errors"].get(name) or r["unverified"].get(name)
                      or r.get("notes", {}).get(name))
            note = ""
            if name == "destruction_complete" and ok is False:
                note = " (reported, does not make the proof invalid)"
            elif ok is None:
                note = " (unverifiable, not counted as passed)"
            print(f"    {MARKS[ok]} {label}" + (f": {reason}" if reason else "") + note,
                  file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanorix-agent verify",
                                description="Verify CDP / AuditProof files offline.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--format", choices=("auto", "cdp", "auditproof"), default="auto",
                   help="which proof of a wrapper to verify (default: all present)")
    p.add_argument("--trust", action="append", default=[], metavar="KEYS.json|DIR",
                   help="trusted attestation keys (`nanorix-agent keys export`); repeatable")
    p.add_argument("--agent", nargs="?", const="", default=None, metavar="SOCKET",
                   help="resolve signer keys through a running agent's key.get")
    p.add_argument("--require-trust", action="store_true",
                   help="fail (exit 1) unless every signer is trusted")
    p.add_argument("--receipts", metavar="RECEIPTS.json",
                   help="also check these exec receipts (a JSON list of receipts or of "
                        "`session exec --json` results) against the one proof FILE: "
                        "each under its epoch's receipt key (docs/proofs.md)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.trust and args.agent is not None:
        print("nanorix-agent verify: give --trust or --agent, not both", file=sys.stderr)
        return 2
    trust: TrustSource | None = None
    try:
        if args.trust:
            trust = load_trust(args.trust)
        elif args.agent is not None:
            trust = AgentTrust(args.agent or None)
    except TrustError as e:
        print(f"nanorix-agent verify: {e}", file=sys.stderr)
        return 2
    if args.receipts and (len(args.files) != 1 or "-" in (args.files[0], args.receipts)):
        print("nanorix-agent verify: --receipts goes with exactly one proof FILE (files, "
              "not stdin)",
              file=sys.stderr)
        return 2
    try:
        reports = [verify_file(f, args.format, trust) for f in args.files]
        if args.receipts and reports[0]["readable"]:
            add_receipts(reports[0], args.files[0], args.receipts, trust)
    finally:
        if isinstance(trust, AgentTrust):
            trust.close()
    if args.json:
        json.dump(reports, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        for rep in reports:
            _print_human(rep, sys.stdout, trust is not None)
            if args.require_trust and rep["valid"] and rep["level"] != "provenance":
                print("  --require-trust: the signer was not checked", file=sys.stdout)
    if any(not r["readable"] for r in reports):
        return 2
    ok = all(r["valid"] and (r["level"] == "provenance" or not args.require_trust)
             for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
