"""Run a REAL agent daemon in a subprocess for tests (reusable by every part).

    from helpers_daemon import AgentDaemon, agent_daemon   # fixture: a started daemon

    def test_x(agent_daemon):
        res = agent_daemon.call("session.create", {"customer_id": "c", "tier": "free"})

    def test_y(tmp_path):
        with AgentDaemon(tmp_path, config={"tiers": {"free": {"max_concurrent": 1}}}) as d:
            d.call("agent.info")
            d.kill()            # SIGKILL (crash); d.start() again on the same dirs
            d.start()

What it does: writes a TOML config (the test defaults below merged with `config`), runs
`python -m agent.cli serve --config F --state-dir D --runtime-dir D` with stderr captured
to `<tmp>/agent-N.log`, waits until `agent.info` answers on the socket, and on stop sends
SIGTERM (graceful drain) and waits; if the daemon does not exit in time it is SIGKILLed.
Every daemon gets its own cgroup prefix (`suite.cgroup_prefix()`) and its own uid range,
so several can run side by side on one machine.  `d.logs()` returns the JSON log lines.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from suite import cgroup_prefix

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

# small and fast: 128 MiB sessions, short default TTLs, a node sized for tests
TEST_DEFAULTS: dict[str, Any] = {
    "node": {"node_id": "test-node", "max_sessions": 32},
    "log": {"level": "debug"},
    # the warm pool (issue 18) is off unless a test asks for it (tests/test_pool.py): a
    # module-scoped daemon would otherwise refill between tests, and the per-test leftover
    # check would count its new sandboxes
    "pool": {"sizes": {"free": 0}},
    "tiers": {
        "free": {"memory_bytes": 128 * MiB, "max_concurrent": 3, "max_ttl_seconds": 300,
                 "default_ttl_seconds": 300},
        "starter": {"memory_bytes": 128 * MiB, "max_concurrent": 25, "max_ttl_seconds": 600,
                    "default_ttl_seconds": 600},
    },
}


def wait_until(pred, timeout: float = 30.0, what: str = "condition"):
    """Poll `pred` until it returns something true (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict) -> str:
    """Minimal TOML writer for the config shape (sections of scalars, nested tables)."""
    lines: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if scalars and prefix:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", cfg)
    return "\n".join(lines) + "\n"


class AgentDaemon:
    """One daemon subprocess on private state/runtime dirs under `base`."""

    def __init__(self, base: Path, *, config: dict | None = None, allowed_uids=None,
                 start_timeout: float = 30.0) -> None:
        self.base = Path(base)
        self.state_dir = self.base / "state"
        self.runtime_dir = self.base / "run"
        self.socket = self.runtime_dir / "agent.sock"
        self.config_path = self.base / "agent.toml"
        self.start_timeout = start_timeout
        uid_base = (1 << 21) * (2 + secrets.randbelow(1800))  # 2 Mi uids per daemon
        cfg = _merge(TEST_DEFAULTS, {
            "sandbox": {"cgroup_prefix": cgroup_prefix(), "uid_base": uid_base},
            "rpc": {"allowed_uids": list(allowed_uids) if allowed_uids is not None else [0]},
        })
        self.config = _merge(cfg, config or {})
        self.proc: subprocess.Popen | None = None
        self._runs = 0
        self.log_path: Path | None = None
        self.extra_env: dict[str, str] = {}  # e.g. NOTIFY_SOCKET, as systemd would set it
        self.cgroup: Path | None = None  # start inside this (v2) cgroup, as systemd would

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> AgentDaemon:
        for _ in range(4):
            try:
                return self._start()
            except RuntimeError as e:
                # another suite's daemon drew an overlapping random uid range: draw again
                if "overlap ours" not in str(e):
                    raise
                self.config["sandbox"]["uid_base"] = (1 << 21) * (2 + secrets.randbelow(1800))
        return self._start()

    def _start(self) -> AgentDaemon:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        self._runs += 1
        self.log_path = self.base / f"agent-{self._runs}.log"
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        argv = [sys.executable, "-m", "agent.cli", "serve", "--config", str(self.config_path),
                "--state-dir", str(self.state_dir), "--runtime-dir", str(self.runtime_dir)]
        if self.cgroup is not None:  # join it before exec: the daemon starts there
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup),
                    *argv]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode} during start:\n"
                                   + self.log_text()[-4000:])
            # ready = the daemon logged agent_ready (after recovery and the first health
            # self-test, when it also tells systemd READY=1) and answers on the socket
            if self.socket.exists() and '"agent_ready"' in self.log_text():
                try:
                    self.call("agent.info", timeout=5)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("agent did not become ready:\n" + self.log_text()[-4000:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful: live sessions are destroyed and spooled), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash would (leaves sandboxes for the next start to reclaim)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> AgentDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- talking to it ---------------------------------------------------------------
    def client(self, timeout: float | None = 60):
        from agent.rpc.client import Client

        return Client(self.socket, timeout=timeout)

    def call(self, method: str, params: dict | None = None, *, timeout: float | None = 60,
             on_notify=None) -> Any:
        """One request on a fresh connection; API errors raise agent.errors classes."""
        with self.client(timeout) as c:
            return c.call(method, params or {}, on_notify=on_notify)

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run `python -m agent.cli --socket SOCK ARGS…` and capture its output."""
        # no input: stdin is /dev/null (run/exec read a non-terminal stdin as the input)
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run([sys.executable, "-m", "agent.cli", "--socket", str(self.socket),
                               *args], **stdin, capture_output=True, timeout=timeout,
                              cwd=cwd or self.base, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def raw_connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(self.socket))
        return s

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict]:
        """Every JSON log line of the current run, parsed."""
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@pytest.fixture
def agent_daemon(tmp_path):
    """A started daemon with the test defaults; stopped (SIGTERM, drain) after the test."""
    d = AgentDaemon(tmp_path / "agent")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def start_long_exec(d: AgentDaemon, sid: str, command: str = "sleep 300") -> threading.Thread:
    """Run `command` in session `sid` from a thread (the agent may die under it on purpose:
    its errors are swallowed) and return once the session is `executing`."""

    def run() -> None:
        try:
            d.call("session.exec", {"session_id": sid, "command": command}, timeout=120)
        except Exception:  # noqa: S110 - the call is expected to be cut off
            pass

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 20
    while d.call("session.get", {"session_id": sid})["status"] != "executing":
        assert time.monotonic() < deadline, "the exec did not start"
        time.sleep(0.02)
    return t


def wait_ended(d: AgentDaemon, sid: str, timeout: float = 30.0) -> dict:
    """Poll session.get until the session is no longer active/executing; its proof."""
    deadline = time.monotonic() + timeout
    while d.call("session.get", {"session_id": sid})["status"] in ("active", "executing"):
        assert time.monotonic() < deadline, "the session was not ended"
        time.sleep(0.05)
    return d.call("proof.get", {"session_id": sid})
