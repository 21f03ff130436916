"""agent/log.py on real pipes: a broken stream never raises, journald priority prefixes."""

from __future__ import annotations

import json
import os

from agent import log


def test_broken_pipe_is_retired_to_dev_null_and_counted():
    """Writing to a pipe whose reader closed raises nothing: the fd becomes /dev/null and
    the lost lines are counted."""
    r, w = os.pipe()
    os.close(r)
    try:
        wr = log.SafeWriter(w, journal=False)
        wr.write_line('{"event": "a"}')
        wr.write_line('{"event": "b"}')
        assert wr.broken and wr.dropped == 2
        assert os.readlink(f"/proc/self/fd/{w}") == "/dev/null"
        os.write(w, b"still writable\n")  # anything else writing to the fd is safe too
    finally:
        os.close(w)


def test_journal_stream_match_and_priority_prefixes():
    """$JOURNAL_STREAM naming the pipe turns on `<N>` prefixes by level; another inode does not."""
    r, w = os.pipe()
    try:
        st = os.fstat(w)
        assert log.journal_stream_matches(w, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not log.journal_stream_matches(w, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not log.journal_stream_matches(w, {})
        wr = log.SafeWriter(w, journal=True)
        for level in ("debug", "info", "warning", "error"):
            wr.write_line("x", level)
        assert os.read(r, 4096) == b"<7>x\n<6>x\n<4>x\n<3>x\n"
    finally:
        os.close(r)
        os.close(w)


def test_level_gate_writes_only_lines_at_or_above_the_level():
    """A bound logger writes the lines at or above the configured level (with its bound
    context) to the fd and nothing for the ones below, whatever the method."""
    r, w = os.pipe()
    before = log.get_level()
    try:
        log.setup("warning", fd=w, journal=False)
        lg = log.get(session_id="s1")
        assert lg.info("below", n=1) is None
        lg.debug("below")
        lg.warning("kept", n=2)
        lg.error("kept_too")
        lg.exception("kept_three")
        log.set_level("debug")
        lg.debug("now_kept")
        os.close(w)
        w = -1
        lines = [json.loads(x) for x in os.read(r, 65536).decode().splitlines()]
        assert [(x["event"], x["level"]) for x in lines] == [
            ("kept", "warning"), ("kept_too", "error"), ("kept_three", "error"),
            ("now_kept", "debug")]
        assert all(x["session_id"] == "s1" for x in lines) and lines[0]["n"] == 2
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        log.setup(before)
