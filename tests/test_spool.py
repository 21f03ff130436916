"""The CDP spool (SPEC 8): durable write (tmp, fsync, rename, fsync dir), get/pending/ack."""

from __future__ import annotations

import json
import os

import pytest

from agent.service.spool import Spool

SID = "sess_0123456789abcdef"


def test_put_get_pending_ack(tmp_path):
    """A spooled record reads back equal, is pending until acked, and ack removes the file."""
    s = Spool(tmp_path)
    rec = {"session_id": SID, "cdp": {"a": 1, "é": "ü"}, "status": "destroyed"}
    s.put(SID, rec)
    assert s.get(SID) == rec and s.depth() == 1
    assert [p["session_id"] for p in Spool(tmp_path).pending()] == [SID]
    assert (tmp_path / "spool" / f"{SID}.json").stat().st_mode & 0o777 == 0o600
    assert not list((tmp_path / "spool").glob(".*.tmp"))
    assert s.ack(SID) is True and s.ack(SID) is False
    assert s.get(SID) is None and s.pending() == []


def _spy_fsync(monkeypatch) -> list[str]:
    """The paths os.fsync is called on from now (the real fsync still runs)."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_put_fsyncs_file_and_directory(tmp_path, monkeypatch):
    """put() fsyncs the file and then the directory before returning."""
    s = Spool(tmp_path)
    synced = _spy_fsync(monkeypatch)
    s.put(SID, {"session_id": SID})
    assert synced[0].endswith(f".{SID}.tmp") and synced[-1] == str(s.dir)


def test_reserved_put_fsyncs_once_and_a_lost_rename_is_finished_at_start(tmp_path, monkeypatch):
    """A proof written into its reservation costs one fsync (the file; the directory is
    not synced), and a crash that lost the rename leaves a reservation holding the whole
    proof, which the next start's scan() turns into the spooled proof."""
    s = Spool(tmp_path)
    s.reserve(SID, {"session_id": SID})
    real = os.fsync
    synced = _spy_fsync(monkeypatch)
    proof = {"session_id": SID, "status": "destroyed", "cdp": {"x": 1}}
    assert s.put(SID, proof)
    assert len(synced) == 1 and synced[0].endswith(f"{SID}.resv")
    monkeypatch.setattr(os, "fsync", real)
    stored = s.get_bytes(SID)
    os.replace(s.dir / f"{SID}.json", s.dir / f"{SID}.resv")  # the rename a crash lost
    again = Spool(tmp_path)
    assert again.scan() == [] and again.get_bytes(SID) == stored
    assert not (again.dir / f"{SID}.resv").exists()


def test_rejects_path_like_ids(tmp_path):
    """Only sess_ ids name spool files (no traversal)."""
    s = Spool(tmp_path)
    with pytest.raises(ValueError):
        s.put("../../etc/passwd", {})
    assert s.get("../x") is None and s.ack("../x") is False


def test_reserved_proof_is_written_without_a_new_inode_or_block(tmp_path):
    """On a tmpfs with its last inode and block taken after the reservation, put() still
    stores the proof durably (it fills the preallocated file and renames it)."""
    from faults import fill_inodes, fill_space, small_fs

    with small_fs(tmp_path / "st", size="1m", inodes=32) as fs:
        s = Spool(fs, reserve_bytes=64 * 1024)
        s.reserve(SID, {"customer_id": "c"})
        assert s.reservations() == {SID: {"nanorix_spool_reservation": 1, "session_id": SID,
                                          "customer_id": "c"}}
        fill_space(fs)
        fill_inodes(fs)
        rec = {"session_id": SID, "cdp": {"x": "y" * 30_000}}
        assert s.put(SID, rec) is True
        assert s.get(SID) == rec and not s.unsaved and s.reservations() == {}
        from agent.service.spool import SpoolUnavailable

        with pytest.raises(SpoolUnavailable):
            s.reserve("sess_1111111111111111", {})


def test_unwritable_spool_keeps_proof_in_memory_and_fallback(tmp_path):
    """A put that fails keeps the proof (served by get/pending), writes the fallback copy,
    reports the failure; retry() lands it once the spool is writable again."""
    from faults import set_immutable, small_fs

    with small_fs(tmp_path / "st", size="1m") as fs:
        s = Spool(fs, fallback_dir=tmp_path / "fb")
        seen = []
        s.on_failure = seen.append
        set_immutable(s.dir, True)
        rec = {"session_id": SID, "cdp": {}}
        assert s.put(SID, rec) is False
        assert s.get(SID) == rec and s.pending() == [rec] and s.depth() == 1
        assert (tmp_path / "fb" / f"{SID}.json").exists() and "EPERM" in seen[0]
        assert s.retry() == 1
        set_immutable(s.dir, False)
        assert s.retry() == 0 and s.last_error is None
        assert (s.dir / f"{SID}.json").exists() and not (tmp_path / "fb" / f"{SID}.json").exists()


def test_scan_quarantines_damage_and_finishes_a_written_reservation(tmp_path):
    """scan() moves truncated/garbage/misnamed proofs to quarantine and reports them,
    renames a reservation already holding a complete proof, drops staging files and
    adopts a proof left in the fallback dir."""
    s = Spool(tmp_path, fallback_dir=tmp_path / "fb")
    ids = [f"sess_{i:016x}" for i in range(5)]
    (s.dir / f"{ids[0]}.json").write_bytes(b'{"session_id": "sess_')
    (s.dir / f"{ids[1]}.json").write_bytes(b"\xff\x00garbage")
    (s.dir / f"{ids[2]}.json").write_text(json.dumps({"session_id": ids[0], "cdp": {}}))
    (s.dir / f"{ids[3]}.resv").write_text(json.dumps({"session_id": ids[3], "cdp": {}}))
    (s.dir / f".{ids[3]}.tmp").write_text("half")
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / f"{ids[4]}.json").write_text(json.dumps({"session_id": ids[4],
                                                                 "cdp": {}}))
    damage = s.scan()
    assert sorted((d.kind, d.session_id) for d in damage) == [
        ("spool_file", ids[0]), ("spool_file", ids[1]), ("spool_file", ids[2])]
    assert len(list((tmp_path / "quarantine").iterdir())) == 3
    assert sorted(p.name for p in s.dir.iterdir()) == [f"{ids[3]}.json", f"{ids[4]}.json"]
    assert not s.unsaved
