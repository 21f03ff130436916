"""Prometheus metrics (SPEC 9): every series renders and parses with the reference parser."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import timefmt
from agent.ops.metrics import PREFIX, Metrics


def _service():
    sessions = [{"session_id": "sess_0000000000000001", "status": "active"},
                {"session_id": "sess_0000000000000002", "status": "executing"},
                {"session_id": "sess_0000000000000003", "status": "active"}]
    return SimpleNamespace(
        list_sessions=lambda: sessions,
        spool=SimpleNamespace(depth=lambda: 4, unsaved=[]),
        key_store=SimpleNamespace(current=lambda: SimpleNamespace(
            created_at=timefmt.iso_seconds(timefmt.parse_iso("2026-01-01T00:00:00Z")))),
        capacity=lambda: {"sessions_live": 3, "sessions_max": 1000,
                          "memory_capacity_bytes": 1 << 30, "memory_committed_bytes": 1 << 28},
        health=SimpleNamespace(engines={"eee": True, "dire": False}),
        draining=False,
    )


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_render_parses_and_carries_every_required_series():
    """Sessions by status, counts, latency histograms, step failures, OOM, spool, key age and capacity parse."""
    m = Metrics()
    m.inc("creates_total")
    m.inc("creates_total")
    m.inc("execs_total")
    m.inc("destroys_total", reason="requested", status="destroyed")
    m.inc("destroy_step_failures_total", step="3")
    m.inc("oom_kills_total")
    m.observe("create_seconds", 0.004)
    m.observe("create_seconds", 0.2)
    m.observe("exec_seconds", 1.5)
    m.observe("destroy_seconds", 0.07)
    fams = _families(m.render(_service()))
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in fams.values() for s in f.samples}
    p = PREFIX
    assert val[(p + "creates_total", ())] == 2
    assert val[(p + "execs_total", ())] == 1
    assert val[(p + "destroys_total", (("reason", "requested"), ("status", "destroyed")))] == 1
    assert val[(p + "destroy_step_failures_total", (("step", "3"),))] == 1
    assert val[(p + "oom_kills_total", ())] == 1
    assert val[(p + "sessions", (("status", "active"),))] == 2
    assert val[(p + "sessions", (("status", "executing"),))] == 1
    assert val[(p + "sessions", (("status", "expired_unclean"),))] == 0
    assert val[(p + "spool_depth", ())] == 4
    assert val[(p + "attestation_key_age_seconds", ())] > 3600
    assert val[(p + "capacity_sessions_max", ())] == 1000
    assert val[(p + "health_engine_ok", (("engine", "dire"),))] == 0
    assert val[(p + "create_seconds_count", ())] == 2
    assert val[(p + "create_seconds_bucket", (("le", "0.005"),))] == 1
    assert val[(p + "create_seconds_bucket", (("le", "+Inf"),))] == 2
    assert fams[p + "create_seconds"].type == "histogram"
    assert fams[p + "exec_seconds"].type == "histogram"


def test_render_without_service_still_parses():
    """An empty registry renders zeros for unlabelled series and stays valid text format."""
    fams = _families(Metrics().render())
    assert fams[PREFIX + "creates"].samples[0].value == 0
    assert fams[PREFIX + "destroy_seconds"].type == "histogram"


def test_typos_and_wrong_labels_are_refused():
    """An undeclared name or label set raises instead of silently creating a new series."""
    m = Metrics()
    with pytest.raises(KeyError):
        m.inc("create_total")
    with pytest.raises(KeyError):
        m.inc("destroys_total", reason="requested")
    with pytest.raises(KeyError):
        m.observe("creates_total", 1.0)


def test_label_values_are_escaped():
    """Quotes and newlines in label values cannot break the exposition format."""
    m = Metrics()
    m.inc("destroys_total", reason='x"y\nz', status="destroyed")
    fams = _families(m.render())
    s = [s for s in fams[PREFIX + "destroys"].samples if s.value == 1]
    assert [x.labels["reason"] for x in s] == ['x"y\nz']
