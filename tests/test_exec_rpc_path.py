"""The exec answer's way back (issue 18): a reply is written straight to the socket when no
other frame is being sent, the rest of a frame that does not fit goes through the locked,
timed path, and frames never interleave; the journal row stays `active` while a command
runs, its exec_count and the receipt's audit hash are written before the answer."""

from __future__ import annotations

import sqlite3
import time

import msgpack
from helpers_daemon import AgentDaemon, start_long_exec, wait_until

from agent.cdp.receipt import receipt_leaf
from agent.rpc import framing

MiB = 1024 * 1024


def _journal(d: AgentDaemon) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{d.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def test_big_pipelined_answers_arrive_whole_and_in_one_piece_each(tmp_path):
    """Two execs on one connection answer 1 MiB each while the client reads nothing: the
    first answer fills the socket (part written at once, the rest waits), the second waits
    its turn; read afterwards, both frames decode whole, each with its own output."""
    with AgentDaemon(tmp_path) as d:
        sids = [d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
                for _ in range(2)]
        s = d.raw_connect()
        try:
            for i, (sid, ch) in enumerate(zip(sids, "ab", strict=True)):
                s.sendall(framing.request(i + 1, "session.exec", {
                    "session_id": sid, "command": f"head -c {MiB} /dev/zero | tr '\\0' {ch}"}))
            # both execs are over (exec_count journaled) before a byte of an answer is read
            def both_done() -> bool:
                with _journal(d) as db:
                    return all(db.execute("SELECT exec_count FROM sessions WHERE session_id "
                                          "= ?", (x,)).fetchone()[0] == 1 for x in sids)
            wait_until(both_done, what="both execs done")
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * MiB)
            answers = {}
            while len(answers) < 2:
                data = s.recv(1 << 20)
                assert data, "the daemon closed the connection"
                unpacker.feed(data)
                for msg in unpacker:
                    assert msg[0] == 1 and msg[2] is None, msg[:3]
                    answers[msg[1]] = msg[3]
        finally:
            s.close()
        for i, ch in enumerate(b"ab"):
            out = answers[i + 1]["output"]
            assert len(out) == MiB and out == bytes([ch]) * MiB
            assert not answers[i + 1]["output_truncated"]
        for sid in sids:
            d.call("session.destroy", {"session_id": sid})


def test_journal_row_stays_active_while_a_command_runs(tmp_path):
    """While a command runs, session.get says `executing` and the journal row says `active`
    (no commit for the in-memory status); after an exec its exec_count and the `exec`
    audit event (the receipt's Merkle leaf) are in the journal when the answer arrives."""
    with AgentDaemon(tmp_path) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        res = d.call("session.exec", {"session_id": sid, "command": "true"})
        with _journal(d) as db:
            row = db.execute("SELECT status, exec_count FROM sessions WHERE session_id = ?",
                             (sid,)).fetchone()
            assert (row["status"], row["exec_count"]) == ("active", 1)
            ev = db.execute("SELECT kind, hash FROM events WHERE session_id = ? ORDER BY seq "
                            "DESC LIMIT 1", (sid,)).fetchone()
            assert (ev["kind"], ev["hash"]) == ("exec", receipt_leaf(res["receipt"]).hex())
        t = start_long_exec(d, sid, "sleep 300")
        assert d.call("session.get", {"session_id": sid})["status"] == "executing"
        with _journal(d) as db:
            assert db.execute("SELECT status FROM sessions WHERE session_id = ?",
                              (sid,)).fetchone()["status"] == "active"
        proof = d.call("session.destroy", {"session_id": sid})
        t.join(30)
        assert proof["status"] == "destroyed"
        deadline = time.monotonic() + 30
        with _journal(d) as db:
            while db.execute("SELECT exec_count FROM sessions WHERE session_id = ?",
                             (sid,)).fetchone()["exec_count"] != 2:
                assert time.monotonic() < deadline  # the interrupted exec's receipt counts
                time.sleep(0.05)
