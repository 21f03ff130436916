"""The CDP spool (SPEC 8): durable write (tmp, fsync, rename, fsync dir), get/pending/ack."""

from __future__ import annotations

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


def test_put_fsyncs_file_and_directory(tmp_path, monkeypatch):
    """put() fsyncs the file and then the directory before returning."""
    s = Spool(tmp_path)
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    s.put(SID, {"session_id": SID})
    assert synced[0].endswith(f".{SID}.tmp") and synced[-1] == str(s.dir)


def test_rejects_path_like_ids(tmp_path):
    """Only sess_ ids name spool files (no traversal)."""
    s = Spool(tmp_path)
    with pytest.raises(ValueError):
        s.put("../../etc/passwd", {})
    assert s.get("../x") is None and s.ack("../x") is False
