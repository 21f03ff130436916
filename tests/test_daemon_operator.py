"""The daemon as an operator runs it: stderr that breaks, journald priorities, SIGHUP reloads,
the Prometheus endpoint (agent/log.py, agent/ops/reload.py, agent/ops/metrics.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from helpers_daemon import ROOT, AgentDaemon, to_toml
from prometheus_client.parser import text_string_to_metric_families

from agent.cdp.verify import verify
from agent.errors import RateLimited


class PipedDaemon(AgentDaemon):
    """The helper's daemon with stdout+stderr on a pipe the test controls (`serve 2>&1 | x`)."""

    def __init__(self, base, *, journal: bool = False, **kw):
        super().__init__(base, **kw)
        self.journal = journal
        self.read_fd: int | None = None

    def _start(self):
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        r, w = os.pipe()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        if self.journal:
            st = os.fstat(w)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(self.config_path),
             "--state-dir", str(self.state_dir), "--runtime-dir", str(self.runtime_dir)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=w, stderr=w, env=env)
        os.close(w)
        self.read_fd = r
        return self

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited with {self.proc.returncode}"
            try:
                self.call("agent.info", timeout=5)
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("agent did not start serving")


def _lifecycle(d: AgentDaemon, n: int) -> None:
    sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
    r = d.call("session.exec", {"session_id": sid, "command": f"echo {n}"})
    assert r["exit_code"] == 0 and r["output"] == f"{n}\n".encode()
    out = d.call("session.destroy", {"session_id": sid})
    assert out["status"] == "destroyed" and verify(out["cdp"])["valid"]


def test_broken_stderr_pipe_does_not_kill_the_daemon(tmp_path):
    """`serve 2>&1 | head -1`: after the reader exits, 5 lifecycles still work, the log fd
    is /dev/null, and SIGTERM still drains a live session and exits 0."""
    d = PipedDaemon(tmp_path / "agent")
    d._start()
    try:
        with os.fdopen(d.read_fd, "rb") as reader:
            first = reader.readline()  # `head -1`
        assert first.startswith(b"{")
        d.wait_serving()
        for n in range(5):
            _lifecycle(d, n)
        assert os.readlink(f"/proc/{d.proc.pid}/fd/2") == "/dev/null"
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    finally:
        d.stop()
    from agent.service.spool import Spool

    pending = {p["session_id"]: p for p in Spool(d.state_dir).pending()}
    assert pending[sid]["reason"] == "operator" and verify(pending[sid]["cdp"])["valid"]


def _collect(fd: int, sink: bytearray) -> threading.Thread:
    def run():
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read1(65536):
                sink.extend(chunk)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for(pred, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_journald_priority_prefixes_and_sighup_reload(tmp_path):
    """With $JOURNAL_STREAM naming our stderr every line carries its sd-daemon priority
    (<7> debug, <6> info, <3> error); SIGHUP applies a changed tier limit and log level,
    rejects an invalid file and a restart-only key and keeps the old config."""
    d = PipedDaemon(tmp_path / "agent", journal=True)
    d._start()
    buf = bytearray()
    reader = _collect(d.read_fd, buf)
    try:
        d.wait_serving()

        def lines():
            return bytes(buf).decode(errors="replace").splitlines()

        _wait_for(lambda: any('"agent_ready"' in ln for ln in lines()), "agent_ready")
        for ln in lines():
            m = re.match(r"<(\d)>(\{.*)", ln)
            assert m, ln
            level = json.loads(m.group(2))["level"]
            assert int(m.group(1)) == {"debug": 7, "info": 6, "warning": 4, "error": 3}[level]
        assert any(ln.startswith("<6>") for ln in lines())

        # a changed, valid config: tier limit and log level apply live
        cfg = json.loads(json.dumps(d.config))
        cfg["tiers"]["free"]["max_concurrent"] = 1
        cfg["log"]["level"] = "info"
        d.config_path.write_text(to_toml(cfg))
        d.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: any('"config_reloaded"' in ln for ln in lines()), "config_reloaded")
        d.call("session.create", {"customer_id": "r", "tier": "free"})
        try:
            d.call("session.create", {"customer_id": "r", "tier": "free"})
            raise AssertionError("the reloaded max_concurrent = 1 was not applied")
        except RateLimited:
            pass
        status = json.loads(d.cli("debug", "status").stdout)
        assert status["log_level"] == "info"

        # an invalid file and a restart-only key: rejected at error, old config kept
        d.config_path.write_text("this is [not toml\n")
        d.proc.send_signal(signal.SIGHUP)
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["tiers"]["free"]["max_concurrent"] = 5
        cfg2["sandbox"]["uid_slot_size"] = 70000
        _wait_for(lambda: sum('"config_reload_rejected"' in ln for ln in lines()) == 1,
                  "first rejection")
        d.config_path.write_text(to_toml(cfg2))
        d.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: sum('"config_reload_rejected"' in ln for ln in lines()) == 2,
                  "second rejection")
        rejected = [ln for ln in lines() if '"config_reload_rejected"' in ln]
        assert all(ln.startswith("<3>") for ln in rejected)
        assert "not valid TOML" in rejected[0] and "sandbox.uid_slot_size" in rejected[1]
        try:
            d.call("session.create", {"customer_id": "r", "tier": "free"})
            raise AssertionError("a rejected reload changed max_concurrent")
        except RateLimited:
            pass
        reloads = {tuple(s.labels.values()): s.value for f in text_string_to_metric_families(
            d.cli("debug", "metrics").stdout.decode()) for s in f.samples
            if s.name == "nanorix_agent_config_reloads_total"}
        assert reloads == {("applied",): 1, ("rejected",): 2}
        assert d.stop() == 0
    finally:
        d.stop()
        reader.join(10)


def test_metrics_endpoint_parses_with_prometheus_client(tmp_path):
    """`[metrics] listen` serves GET /metrics: build info, process metrics, zero-initialised
    labelled series and real counts parse with prometheus_client; the debug socket's
    `metrics` has the same families; other paths are 404."""
    d = AgentDaemon(tmp_path / "agent", config={"metrics": {"listen": "127.0.0.1:0"}})
    with d:
        addr = next(e["address"][0] for e in d.logs() if e.get("event") == "metrics_http_listening")
        _lifecycle(d, 1)
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in fams.values() for s in f.samples}
        from agent import __version__

        assert samples[("nanorix_agent_build_info", (("version", __version__),))] == 1
        assert samples[("process_resident_memory_bytes", ())] > 0
        assert ("process_cpu_seconds_total", ()) in samples
        destroys = {k[1]: v for k, v in samples.items() if k[0] == "nanorix_agent_destroys_total"}
        assert len(destroys) == 15  # 5 reasons x 3 final statuses, from the start
        assert destroys[(("reason", "requested"), ("status", "destroyed"))] == 1
        assert destroys[(("reason", "oom"), ("status", "expired"))] == 0
        steps = [k for k in samples if k[0] == "nanorix_agent_destroy_step_failures_total"]
        assert len(steps) == 8
        assert samples[("nanorix_agent_creates_total", ())] >= 1
        assert samples[("nanorix_agent_health_engine_ok", (("engine", "eee"),))] == 1
        debug_text = d.cli("debug", "metrics").stdout.decode()
        assert {f.name for f in text_string_to_metric_families(debug_text)} == set(fams)
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 404")
