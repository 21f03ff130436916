"""`nanorix-agent verify FILE… [--json] [--format auto|cdp|auditproof]`: offline proof
verification, no agent needed (SPEC 6, 14).

A file may hold a bare CDP v1.0, a bare AuditProof 2.1 rendition, or anything that wraps
them under `cdp` / `auditproof` (a destroy result, `proof.get`, the shared vector file).
`--format` picks which proof of a wrapper to check (default: every one present).
Exit status: 0 every file valid, 1 at least one invalid, 2 at least one unreadable or
not JSON (2 wins over 1).  `-` reads standard input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from agent.cdp.verify import CHECKS, verify

__all__ = ["main", "verify_file"]

MAX_BYTES = 256 * 1024 * 1024
LABELS = {"cdp-1.0": "CDP 1.0", "auditproof-2.1": "AuditProof 2.1", "unknown": "unknown format"}


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


def verify_file(path: str, fmt: str = "auto") -> dict:
    """`{"file", "readable", "valid", "error"?, "results": [verification results]}`."""
    doc, err = _load(path)
    if err is not None:
        return {"file": path, "readable": False, "valid": False, "error": err, "results": []}
    wrapper = isinstance(doc, dict) and "cdp_version" not in doc \
        and ("cdp" in doc or "auditproof" in doc)
    results = []
    if wrapper:
        assert isinstance(doc, dict)
        if fmt in ("auto", "cdp") and "cdp" in doc:
            results.append(verify({k: v for k, v in doc.items() if k != "auditproof"}))
        if fmt in ("auto", "auditproof") and doc.get("auditproof") is not None:
            results.append(verify(doc["auditproof"]))
        if not results:
            return {"file": path, "readable": True, "valid": False,
                    "error": f"no {fmt} proof in this file", "results": []}
    else:
        results.append(verify(doc))
        want = {"cdp": "cdp-1.0", "auditproof": "auditproof-2.1"}.get(fmt)
        if want and results[0]["format"] != want:
            return {"file": path, "readable": True, "valid": False,
                    "error": f"not a {fmt} proof", "results": results}
    return {"file": path, "readable": True, "valid": all(r["valid"] for r in results),
            "results": results}


def _print_human(rep: dict, out: TextIO) -> None:
    if not rep["readable"]:
        print(f"{rep['file']}: UNREADABLE — {rep['error']}", file=out)
        return
    print(f"{rep['file']}: {'VALID' if rep['valid'] else 'INVALID'}"
          + (f" — {rep['error']}" if rep.get("error") else ""), file=out)
    for r in rep["results"]:
        print(f"  {LABELS.get(r['format'], r['format'])}: {'valid' if r['valid'] else 'invalid'}",
              file=out)
        for name in CHECKS:
            ok = r["checks"].get(name)
            reason = r["errors"].get(name)
            mark = "✓" if ok else "✗"
            note = ""
            if name == "destruction_complete" and not ok:
                note = " (reported, does not make the proof invalid)"
            print(f"    {mark} {name}" + (f": {reason}" if reason else "") + note, file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanorix-agent verify",
                                description="Verify CDP / AuditProof files offline.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--format", choices=("auto", "cdp", "auditproof"), default="auto",
                   help="which proof of a wrapper to verify (default: all present)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    reports = [verify_file(f, args.format) for f in args.files]
    if args.json:
        json.dump(reports, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        for rep in reports:
            _print_human(rep, sys.stdout)
    if any(not r["readable"] for r in reports):
        return 2
    return 0 if all(r["valid"] for r in reports) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
