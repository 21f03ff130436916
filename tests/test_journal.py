"""The session journal (SPEC 11, 12): WAL SQLite with metadata only, what recovery reads."""

from __future__ import annotations

import sqlite3

import pytest

from agent.service.journal import Journal


def _row(**kw):
    base = dict(session_id="sess_0123456789abcdef", customer_id="c", tier="free",
                classification="general", jurisdiction="US", created_at="2026-01-01T00:00:00Z",
                ttl_seconds=60, status="active", slot=3, host_uid=200000, init_pid=42,
                init_starttime=99, cgroup_paths=["/sys/fs/cgroup/memory/x"],
                mount_path="/run/x/root", namespaces={"mnt": 1})
    base.update(kw)
    return base


def test_wal_mode_and_live_rows(tmp_path):
    """The journal is in WAL mode; live_sessions returns active/executing rows, JSON decoded."""
    j = Journal(tmp_path)
    j.insert_session(**_row())
    j.insert_session(**_row(session_id="sess_1111111111111111", status="executing"))
    j.insert_session(**_row(session_id="sess_2222222222222222", status="destroyed"))
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    live = j.live_sessions()
    assert [r["session_id"] for r in live] == ["sess_0123456789abcdef", "sess_1111111111111111"]
    assert live[0]["cgroup_paths"] == ["/sys/fs/cgroup/memory/x"]
    assert live[0]["namespaces"] == {"mnt": 1}
    j.update_session("sess_0123456789abcdef", status="expired", reason="ttl_expired")
    assert [r["session_id"] for r in j.live()] == ["sess_1111111111111111"]
    j.close()
    # persisted across a reopen
    j2 = Journal(tmp_path)
    assert j2.get("sess_0123456789abcdef")["reason"] == "ttl_expired"
    assert (tmp_path / "journal.sqlite3").stat().st_mode & 0o777 == 0o600


def test_events_keep_hashes_only(tmp_path):
    """Audit events are stored as (seq, kind, hash, at) in order; the schema has no data column."""
    j = Journal(tmp_path)
    j.insert_session(**_row())
    j.add_event("sess_0123456789abcdef", 1, "created", "ab" * 32, "2026-01-01T00:00:00Z")
    j.add_event("sess_0123456789abcdef", 2, "exec", "cd" * 32, "2026-01-01T00:00:01Z")
    assert [e["kind"] for e in j.events("sess_0123456789abcdef")] == ["created", "exec"]
    cols = {r[1] for r in j.db.execute("PRAGMA table_info(sessions)")}
    cols |= {r[1] for r in j.db.execute("PRAGMA table_info(events)")}
    assert not cols & {"command", "input", "input_data", "output", "stdout", "stderr", "env"}
    with pytest.raises(sqlite3.IntegrityError):
        j.add_event("sess_0123456789abcdef", 2, "exec", "ef" * 32, "2026-01-01T00:00:02Z")


def test_unknown_columns_are_refused(tmp_path):
    """Only schema columns can be written (names are never taken from outside)."""
    j = Journal(tmp_path)
    with pytest.raises(ValueError):
        j.insert_session(**_row(command="rm -rf /"))


def test_check_round_trip(tmp_path):
    """check() writes and reads back (health: database)."""
    j = Journal(tmp_path)
    j.check()
    assert j.check_writable() is True
    j.close()
    assert j.check_writable() is False


def test_prune_forgets_only_old_ended_unkept_sessions(tmp_path):
    """prune() deletes ended rows older than the cutoff, keeping live rows and kept ids."""
    j = Journal(tmp_path)
    j.insert_session(**_row(session_id="sess_000000000000000a", status="destroyed",
                            updated_at="2020-01-01T00:00:00Z"))
    j.insert_session(**_row(session_id="sess_000000000000000b", status="expired",
                            updated_at="2020-01-01T00:00:00Z"))
    j.insert_session(**_row(session_id="sess_000000000000000c", status="active",
                            updated_at="2020-01-01T00:00:00Z"))
    j.insert_session(**_row(session_id="sess_000000000000000d", status="destroyed"))
    j.add_event("sess_000000000000000a", 1, "created", "ab" * 32, "2020-01-01T00:00:00Z")
    assert j.prune("2021-01-01T00:00:00Z", keep={"sess_000000000000000b"}) == 1
    left = {r["session_id"] for r in j.all()}
    assert left == {"sess_000000000000000b", "sess_000000000000000c", "sess_000000000000000d"}
    assert j.events("sess_000000000000000a") == []


def test_unopenable_journal_is_quarantined_and_replaced(tmp_path):
    """A journal file that is not a database is moved to quarantine, a fresh journal
    starts, and `damage` says what happened."""
    garbage = b"garbage " * 1000
    (tmp_path / "journal.sqlite3").write_bytes(garbage)
    j = Journal(tmp_path)
    assert j.live() == [] and j.damage[0]["kind"] == "journal"
    assert "not a database" in j.damage[0]["error"]
    [q] = (tmp_path / "quarantine").iterdir()
    assert q.read_bytes() == garbage and q.name.startswith("journal.sqlite3.")
    j.insert_session(**_row())
    assert j.get("sess_0123456789abcdef")["status"] == "active"
    j.close()


def test_failed_writes_are_kept_and_replayed(tmp_path):
    """On a full file system an update and an event are kept (no exception), `writable`
    turns false and the failure is reported; once space is back `check()` replays both."""
    from faults import fill_space, free, small_fs

    with small_fs(tmp_path / "st", size="1m") as fs:
        j = Journal(fs)
        reports = []
        j.on_failure = reports.append
        j.insert_session(**_row())
        filler = fill_space(fs)
        wrote = [j.update_session("sess_0123456789abcdef", status="expired", reason="oom")
                 for _ in range(200)]
        assert wrote[-1] is False and not j.writable and reports[0]
        assert j.add_event("sess_0123456789abcdef", 1, "created", "ab" * 32, "t") is False
        with pytest.raises(Exception, match="cannot be written"):
            j.insert_session(**_row(session_id="sess_1111111111111111"))
        free(filler)
        j.check()
        assert j.writable and reports[-1] is None
        assert j.get("sess_0123456789abcdef")["status"] == "expired"
        assert [e["kind"] for e in j.events("sess_0123456789abcdef")] == ["created"]
        j.close()
