"""Faults of the state directory on a real daemon (issue 15): a full or inode-less state
file system, an immutable spool, damaged spool files, a damaged or deleted journal, a
read-only state directory.  Each test checks that no proof is lost (every session ends
with exactly one verifying proof, possibly after a restart), that the session's data is
gone from the host within its TTL, and that errors and health say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from faults import fill_inodes, fill_space, free, mounted, set_immutable, small_fs, verifies
from helpers_daemon import ROOT, AgentDaemon, agent_daemon  # noqa: F401 (fixture)
from helpers_daemon import wait_until as _wait

from agent.errors import Conflict, Unavailable

FAST_TTL = 3  # seconds; the TTL session of the full-disk test


def _create(d: AgentDaemon, **kw) -> str:
    return d.call("session.create", {"customer_id": "c", "tier": "starter", **kw})["session_id"]


def _root(d: AgentDaemon, sid: str):
    return d.runtime_dir / "sessions" / sid / "root"


def _every_proof_once(d: AgentDaemon, sids: list[str]) -> None:
    """Each session has exactly one pending proof and it verifies."""
    pending = d.call("proof.pending")
    pending = pending if isinstance(pending, list) else pending["proofs"]
    by_sid: dict[str, int] = {}
    for p in pending:
        by_sid[p["session_id"]] = by_sid.get(p["session_id"], 0) + 1
    for sid in sids:
        assert by_sid.get(sid) == 1, (sid, by_sid)
        assert verifies(d.call("proof.get", {"session_id": sid})), sid


def test_full_state_disk_destroys_proves_and_refuses_creates(tmp_path):
    """On a full state file system sessions are still destroyed on request and at their
    TTL with verifying proofs, creates are Unavailable with a clear message, health flips
    at once, and everything heals when space is freed; no proof lost across a restart."""
    base = tmp_path / "a"
    with small_fs(base / "state", size="4m") as fs, AgentDaemon(base) as d:
        sids = [_create(d) for _ in range(3)]
        ttl_sid = _create(d, ttl_seconds=FAST_TTL)
        created = time.monotonic()
        for sid in [*sids, ttl_sid]:
            d.call("session.exec", {"session_id": sid, "command": "echo secret > /work/f"})
        filler = fill_space(fs)
        # the journal's WAL must grow for these: the first failed write flips health
        d.call("session.exec", {"session_id": sids[0], "command": "true"})
        h = d.call("agent.health")
        assert h["database"] is False and h["engines"]["rzl"] is False, h
        with pytest.raises(Unavailable) as e:
            _create(d)
        assert "state directory" in e.value.message
        for sid in sids:
            res = d.call("session.destroy", {"session_id": sid})
            assert res["status"] == "destroyed" and verifies(res)
            assert not mounted(_root(d, sid))
        got = _wait(lambda: d.call("session.get", {"session_id": ttl_sid})["status"] != "active"
                    and d.call("session.get", {"session_id": ttl_sid}), FAST_TTL + 20,
                    "the TTL session ended")
        assert got["status"] == "expired"
        assert not mounted(_root(d, ttl_sid))
        assert time.monotonic() - created < FAST_TTL + 20
        free(filler)
        _wait(lambda: d.call("agent.health")["database"], 15, "health healed")
        assert d.call("agent.health")["engines"]["rzl"] is True
        extra = _create(d)
        d.call("session.destroy", {"session_id": extra})
        d.stop()
        d.start()
        _every_proof_once(d, [*sids, ttl_sid, extra])
        for sid in sids:
            assert d.call("session.get", {"session_id": sid})["status"] == "destroyed"


def test_state_out_of_inodes_refuses_creates_and_keeps_proofs(tmp_path):
    """With no inode left, a create is Unavailable (its proof could not be reserved; the
    sandbox built alongside is undone: no session directory, mount or process of it is
    left) and every live session is still destroyed with a verifying proof kept across a
    restart."""
    base = tmp_path / "a"
    with small_fs(base / "state", size="16m", inodes=256) as fs, AgentDaemon(base) as d:
        sids = [_create(d) for _ in range(4)]
        inodes = fill_inodes(fs)
        with pytest.raises(Unavailable) as e:
            _create(d)
        assert "proof reservation" in e.value.message
        assert sorted(p.name for p in (d.runtime_dir / "sessions").iterdir()) == sorted(sids)
        for sid in sids:
            res = d.call("session.destroy", {"session_id": sid})
            assert verifies(res) and not mounted(_root(d, sid))
        d.stop()
        free(inodes)
        d.start()
        _every_proof_once(d, sids)


def test_immutable_spool_keeps_the_proof_and_never_claims_an_ack(tmp_path):
    """When the spool directory is immutable the proof is kept (memory + fallback dir),
    served by proof.get/pending and destroy, rzl is false at once; across a restart it is
    still there, and once the flag is gone it lands in the spool and health heals."""
    base = tmp_path / "a"
    with small_fs(base / "state", size="8m"), AgentDaemon(base) as d:
        sid = _create(d)
        spool = d.state_dir / "spool"
        set_immutable(spool, True)
        res = d.call("session.destroy", {"session_id": sid})
        assert verifies(res)
        assert d.call("agent.health")["engines"]["rzl"] is False
        assert d.call("proof.get", {"session_id": sid}) == res
        assert d.call("session.destroy", {"session_id": sid}) == res
        assert (d.runtime_dir / "spool-fallback" / f"{sid}.json").exists()
        d.stop()
        d.start()
        assert d.call("session.destroy", {"session_id": sid}) == res
        _every_proof_once(d, [sid])
        set_immutable(spool, False)
        _wait(lambda: d.call("agent.health")["engines"]["rzl"], 15, "rzl healed")
        assert (spool / f"{sid}.json").exists()
        assert not (d.runtime_dir / "spool-fallback" / f"{sid}.json").exists()


def test_damaged_spool_files_are_quarantined_and_proven_again(tmp_path):
    """A truncated, a garbage and a deleted spool file are found at start, logged at error,
    quarantined (never deleted), counted in health, and each session gets a verifying proof
    again; destroy then answers that proof, never "acknowledged"."""
    base = tmp_path / "a"
    with AgentDaemon(base) as d:
        sids = [_create(d) for _ in range(4)]
        for sid in sids:
            d.call("session.destroy", {"session_id": sid})
        d.stop()
        spool = d.state_dir / "spool"
        p0 = spool / f"{sids[0]}.json"
        p0.write_bytes(p0.read_bytes()[:100])
        (spool / f"{sids[1]}.json").write_bytes(os.urandom(2000))
        (spool / f"{sids[2]}.json").unlink()
        d.start()
        errors = [r for r in d.logs() if r.get("event") == "state_damaged"]
        assert {(r["kind"], r["session_id"]) for r in errors} == {
            ("spool_file", sids[0]), ("spool_file", sids[1]), ("proof_missing", sids[0]),
            ("proof_missing", sids[1]), ("proof_missing", sids[2])}
        assert all(r["level"] == "error" for r in errors)
        assert len(list((d.state_dir / "quarantine").iterdir())) == 2
        assert d.call("agent.health")["state_damage"] == {"spool_file": 2, "proof_missing": 3}
        metrics = d.cli("debug", "metrics").stdout.decode()
        assert 'nanorix_agent_state_damage_total{kind="spool_file"} 2' in metrics
        assert 'nanorix_agent_state_damage_total{kind="proof_missing"} 3' in metrics
        _every_proof_once(d, sids)
        for sid in sids[:3]:
            assert d.call("session.destroy", {"session_id": sid}) == \
                d.call("proof.get", {"session_id": sid})


@pytest.mark.parametrize("damage", ["wal_truncated", "wal_garbage", "journal_deleted"])
def test_lost_journal_rows_are_rebuilt_and_proven(tmp_path, damage):
    """After a crash with a damaged WAL tail or a deleted journal, live sessions whose rows
    are gone are found through their spool reservations (logged at error, counted), their
    sandboxes are reclaimed and each gets a verifying proof with its customer."""
    base = tmp_path / "a"
    d = AgentDaemon(base).start()
    try:
        sids = [d.call("session.create", {"customer_id": f"cust-{i}", "tier": "starter"})
                ["session_id"] for i in range(3)]
        d.kill()
        journal = d.state_dir / "journal.sqlite3"
        wal = journal.with_name(journal.name + "-wal")
        if damage == "journal_deleted":
            for p in (journal, wal, journal.with_name(journal.name + "-shm")):
                p.unlink(missing_ok=True)
        else:
            data = wal.read_bytes()
            assert len(data) > 8192, "the rows must still be in the WAL for this test"
            cut = len(data) * 2 // 3
            tail = b"" if damage == "wal_truncated" else os.urandom(len(data) - cut)
            wal.write_bytes(data[:cut] + tail)
        d.start()
        rebuilt = {r["session_id"] for r in d.logs()
                   if r.get("event") == "state_damaged" and r["kind"] == "journal_row"}
        assert rebuilt, "the damage must have lost at least one row"
        assert rebuilt <= set(sids)
        for sid in set(sids) - rebuilt:  # rows that survived may be re-adopted (SPEC 12)
            if d.call("session.get", {"session_id": sid})["status"] == "active":
                d.call("session.destroy", {"session_id": sid})
        _every_proof_once(d, sids)
        for i, sid in enumerate(sids):
            assert d.call("proof.get", {"session_id": sid})["auditproof"]["org_id"] == f"cust-{i}"
            assert not mounted(_root(d, sid))
    finally:
        d.stop()


def test_destroy_after_ack_answers_the_same_before_and_after_a_restart(agent_daemon):  # noqa: F811
    """After proof.ack, destroy is Conflict "acknowledged" in the same run and after a
    restart alike; before the ack it returns the stored proof."""
    d = agent_daemon
    sid = _create(d)
    res = d.call("session.destroy", {"session_id": sid})
    assert d.call("session.destroy", {"session_id": sid}) == res
    assert d.call("proof.ack", {"session_id": sid})["acked"] is True
    with pytest.raises(Conflict) as before:
        d.call("session.destroy", {"session_id": sid})
    d.stop()
    d.start()
    with pytest.raises(Conflict) as after:
        d.call("session.destroy", {"session_id": sid})
    assert before.value.message == after.value.message
    assert "acknowledged" in after.value.message


def test_read_only_state_dir_is_one_clear_line(tmp_path):
    """Starting on a read-only state directory exits 1 with one line naming the directory,
    no traceback."""
    base = tmp_path / "a"
    with small_fs(base / "state", ro=True):
        d = AgentDaemon(base)
        d.base.mkdir(parents=True, exist_ok=True)
        from helpers_daemon import to_toml

        d.config_path.write_text(to_toml(d.config))
        r = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--config",
                            str(d.config_path), "--state-dir", str(d.state_dir),
                            "--runtime-dir", str(d.runtime_dir)], cwd=ROOT,
                           capture_output=True, timeout=60)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith("{")]
    assert len(lines) == 1 and str(d.state_dir) in lines[0] and "Read-only" in lines[0], err
    assert any(json.loads(ln).get("event") == "state_dir_unusable"
               for ln in err.splitlines() if ln.startswith("{"))


def test_killed_nrx_init_ends_the_session_with_a_proof(agent_daemon):  # noqa: F811
    """kill -9 of a session's nrx-init is noticed through its pidfd: the session ends
    (reason sandbox_failed) with a verifying proof and its file system is gone."""
    d = agent_daemon
    sid = _create(d)
    d.call("session.exec", {"session_id": sid, "command": "echo secret > /work/f"})
    pid = _init_pid(d, sid)
    os.kill(pid, 9)
    got = _wait(lambda: (g := d.call("session.get", {"session_id": sid}))["status"]
                not in ("active", "executing") and "destroying" not in g and g, 10,
                "the session ended after its init died")
    assert got["status"] in ("expired", "expired_unclean")
    proof = d.call("proof.get", {"session_id": sid})
    assert proof["reason"] == "sandbox_failed" and verifies(proof)
    assert not mounted(_root(d, sid))
    assert any(r.get("event") == "sandbox_init_died" and r["level"] == "error"
               for r in d.logs())


def _init_pid(d: AgentDaemon, sid: str) -> int:
    """The host pid of the session's nrx-init, from the journal (metadata only)."""
    import sqlite3

    db = sqlite3.connect(f"file:{d.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT init_pid FROM sessions WHERE session_id = ?",
                          (sid,)).fetchone()[0]
    finally:
        db.close()


def test_sandbox_known_only_to_the_host_is_destroyed_and_proven(tmp_path):
    """A crashed agent's session with neither journal row nor spool reservation is found
    through what the host still shows (its cgroup, its mount), logged at error, reclaimed
    and given a verifying proof (customer unknown)."""
    base = tmp_path / "a"
    d = AgentDaemon(base).start()
    try:
        sid = _create(d)
        d.kill()
        journal = d.state_dir / "journal.sqlite3"
        for p in (journal, journal.with_name(journal.name + "-wal"),
                  journal.with_name(journal.name + "-shm"),
                  d.state_dir / "spool" / f"{sid}.resv"):
            p.unlink(missing_ok=True)
        d.start()
        lost = [r for r in d.logs() if r.get("event") == "state_damaged"]
        assert [(r["kind"], r["session_id"]) for r in lost] == [("journal_row", sid)]
        assert "host" in lost[0]["lost"]
        _every_proof_once(d, [sid])
        assert d.call("proof.get", {"session_id": sid})["auditproof"]["org_id"] == "unknown"
        assert not mounted(_root(d, sid))
    finally:
        d.stop()
