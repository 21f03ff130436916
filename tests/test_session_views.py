"""What session.get says while a session is being destroyed (issue 15)."""

from __future__ import annotations

import math

from agent.service import views
from agent.service.model import Session, SessionRecord


def _session(status: str, ending: bool) -> Session:
    rec = SessionRecord(session_id="sess_0123456789abcdef", customer_id="c", tier="free",
                        classification="general", jurisdiction="US",
                        created_at="2026-01-01T00:00:00Z")
    return Session(record=rec, ttl_seconds=60, created_ts=0.0, deadline=math.inf,
                   status=status, ending=ending)


def test_a_session_being_destroyed_says_so():
    """While its destruction runs, a session still shows its last live status (the end
    status only follows the proof) with `destroying: true`; before and after, no flag."""
    assert views.view(_session("executing", True))["destroying"] is True
    assert views.view(_session("active", True))["destroying"] is True
    assert "destroying" not in views.view(_session("active", False))
    assert "destroying" not in views.view(_session("destroyed", True))
