"""`nanorix-agent verify`: per-check report, --json, exit 0/1/2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from vectors.loader import load_vector, vector_path, vector_signer

from agent.cdp.auditproof import build_auditproof
from agent.cdp.envelope import destroy_result
from agent.verify_cli import main

VEC = load_vector()


def _write(tmp_path, name, obj) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(obj, ensure_ascii=False))
    return str(p)


def test_vector_file_valid(capsys):
    """The shared vector file (a wrapper with a cdp key) verifies: exit 0, seven checks
    ticked, and the signer and envelope shown as not checked rather than as passed."""
    assert main([str(vector_path())]) == 0
    out = capsys.readouterr().out
    assert "VALID as far as checked" in out and "signer was NOT checked" in out
    assert out.count("✓") == 7 and "✗" not in out and out.count("? ") == 2


def test_invalid_exit_1_with_reason(tmp_path, capsys):
    """An invalid CDP exits 1 and shows the failing check with its reason."""
    bad = VEC["invalid_variants"][0]["cdp"]
    assert main([_write(tmp_path, "bad.json", bad)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "✗ evidence: evidence[2]" in out


def test_unreadable_exit_2(tmp_path, capsys):
    """A missing file or a non-JSON file exits 2, even beside a valid one."""
    p = tmp_path / "x.json"
    p.write_text("{not json")
    assert main([str(vector_path()), str(p)]) == 2
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "UNREADABLE" in capsys.readouterr().out


def test_two_files_one_invalid(tmp_path):
    """One invalid file among valid ones makes the exit status 1."""
    bad = _write(tmp_path, "bad.json", VEC["invalid_variants"][3]["cdp"])
    assert main([str(vector_path()), bad]) == 1


def test_json_output(tmp_path, capsys):
    """--json prints one machine-readable report per file with every check."""
    assert main(["--json", str(vector_path())]) == 0
    reps = json.loads(capsys.readouterr().out)
    assert reps[0]["valid"] is True
    checks = reps[0]["results"][0]["checks"]
    assert set(checks) == {
        "chain_integrity", "final_hash", "signature", "step_count", "evidence",
        "session_binding", "destruction_complete", "signer", "envelope"}
    assert checks["step_count"] == 8 and checks["signer"] is None


def test_incomplete_proof_is_valid(tmp_path, capsys):
    """An honest incomplete proof exits 0 and shows destruction_complete unticked."""
    from agent.cdp.document import build_cdp

    ev = copy.deepcopy(VEC["cdp"]["evidence"])
    ev[1]["ok"] = False
    doc = build_cdp(session_id=VEC["cdp"]["session_id"], created_at=VEC["cdp"]["created_at"],
                    destroyed_at=VEC["cdp"]["destroyed_at"], evidence=ev, signer=vector_signer())
    assert main([_write(tmp_path, "inc.json", doc)]) == 0
    assert "✗ destruction_complete" in capsys.readouterr().out


def test_destroy_result_with_rendition(tmp_path, capsys):
    """A destroy result carrying both formats reports both; --format picks one."""
    ap = build_auditproof(cdp_v1=VEC["cdp"], customer_id="c", jurisdiction="US",
                          authority_id="a", signing_key_version=1, exec_count=2,
                          signer=vector_signer())
    res = destroy_result(signer=vector_signer(), session_id=VEC["cdp"]["session_id"],
                         status="destroyed", reason="requested", cdp=VEC["cdp"], auditproof=ap,
                         regulatory_context={}, session_context={"jurisdiction": "US",
                                                                 "data_classification": "PHI"})
    f = _write(tmp_path, "res.json", res)
    assert main([f]) == 0
    out = capsys.readouterr().out
    assert "CDP 1.0: self-consistent" in out and "AuditProof 2.1: self-consistent" in out
    assert main(["--format", "auditproof", "--json", f]) == 0
    reps = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in reps[0]["results"]] == ["auditproof-2.1"]
    apf = _write(tmp_path, "ap.json", ap)
    assert main([apf]) == 0
    assert main(["--format", "cdp", apf]) == 1


def test_deeply_nested_json_is_invalid_not_crash(tmp_path):
    """A deeply nested JSON file is reported invalid (exit 1), not a traceback."""
    p = tmp_path / "deep.json"
    p.write_text("[" * 200_000 + "]" * 200_000)
    assert main([str(p)]) == 1


def test_usage_error_exit_2():
    """No file given is a usage error: exit 2."""
    assert main([]) == 2


def test_stdin(monkeypatch, capsys):
    """`-` reads the proof from standard input."""
    import io

    data = json.dumps(VEC["cdp"]).encode()
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": io.BytesIO(data)})())
    assert main(["-"]) == 0


@pytest.mark.parametrize("entry", [["-m", "agent.verify_cli"]])
def test_runs_as_a_process(entry):
    """The module runs as a program on the vector file and exits 0."""
    out = subprocess.run([sys.executable, *entry, str(vector_path())], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "✓ signature" in out.stdout


def test_destroy_result_without_envelope_invalid(tmp_path, capsys):
    """A destroy result whose envelope was removed is INVALID, naming what is unsigned."""
    res = {"session_id": VEC["cdp"]["session_id"], "status": "destroyed", "cdp": VEC["cdp"]}
    assert main([_write(tmp_path, "res.json", res)]) == 1
    assert "✗ envelope: destroy result without envelope: status not signed" in \
        capsys.readouterr().out


def _node_keyset(tmp_path, name="keys.json", created="2026-03-01T00:00:00Z") -> str:
    from agent.cdp.trust import keyset

    att = VEC["cdp"]["attestation"]
    return _write(tmp_path, name, keyset([{"key_id": att["key_id"], "algorithm": "Ed25519",
                                           "public_key": att["public_key"],
                                           "created_at": created, "retired_at": None,
                                           "generation": 1}],
                                         node_id="n", exported_at="2026-03-02T00:00:00Z"))


def test_trust_file_and_directory(tmp_path, capsys):
    """--trust with a key set file or a directory of them: the vector is VALID at
    provenance level; --require-trust then passes."""
    (tmp_path / "d").mkdir()
    keys = _node_keyset(tmp_path / "d")
    for src in (keys, str(tmp_path / "d")):
        assert main(["--trust", src, "--require-trust", str(vector_path())]) == 0
        out = capsys.readouterr().out
        assert "VALID — signer trusted (provenance)" in out and "✓ signer" in out


def test_untrusted_signer_invalid(tmp_path, capsys):
    """A CDP re-signed with a foreign key verifies as self-consistent without trust (and
    says the signer was not checked), is INVALID with --trust, and fails
    --require-trust without a trust source."""
    from proof_forgery import foreign_signer, resign

    forged = _write(tmp_path, "forged.json", resign(VEC["cdp"], foreign_signer(),
                                                    session_id="sess_ffffffffffffffff"))
    assert main([forged]) == 0
    assert "signer was NOT checked" in capsys.readouterr().out
    assert main(["--require-trust", forged]) == 1
    assert main(["--trust", _node_keyset(tmp_path), forged]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "✗ signer: key nrx-verify-" in out


def test_stripped_proof_not_complete(tmp_path, capsys):
    """A stripped unbound CDP: evidence, session binding and completeness shown as '?',
    and the verdict says completion cannot be checked."""
    doc = {k: v for k, v in VEC["cdp"].items() if k != "evidence"}
    assert main(["--trust", _node_keyset(tmp_path), _write(tmp_path, "s.json", doc)]) == 0
    out = capsys.readouterr().out
    assert "NOT COMPLETE: completion cannot be checked" in out
    for name in ("evidence", "session_binding", "destruction_complete"):
        assert f"? {name}:" in out
    assert main(["--json", _write(tmp_path, "s.json", doc)]) == 0
    rep = json.loads(capsys.readouterr().out)[0]
    assert rep["complete"] is False and rep["results"][0]["checks"]["destruction_complete"] is None


@pytest.mark.parametrize("content", ["{not json", '{"keys": [{"key_id": "x"}]}'])
def test_bad_trust_file_exit_2(tmp_path, content, capsys):
    """An unreadable or malformed trust file is exit 2 with a reason, nothing verified."""
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["--trust", str(bad), str(vector_path())]) == 2
    assert "nanorix-agent verify:" in capsys.readouterr().err
    assert main(["--trust", str(tmp_path / "missing.json"), str(vector_path())]) == 2


def test_trust_and_agent_exclusive(tmp_path):
    """--trust and --agent together are a usage error; an unreachable agent is exit 2."""
    keys = _node_keyset(tmp_path)
    assert main(["--trust", keys, str(vector_path()), "--agent"]) == 2
    assert main([str(vector_path()), f"--agent={tmp_path / 'no.sock'}"]) == 2
