"""agent/log.py on real pipes: a broken stream never raises, journald priority prefixes."""

from __future__ import annotations

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
