"""CLI conventions (agent/cli.py docstring): help for everything, --version, documented exit
codes with and without a daemon, as non-root and on Ctrl-C, one-line errors, stdin and --env
for commands, --out summaries, table output, shell completion."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_daemon import ROOT, AgentDaemon

from agent import __version__
from agent.cdp.verify import verify
from agent.cli import build_parser

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str, socket: Path | None = None, input: bytes | None = None,
        prefix: tuple[str, ...] = (), **kw) -> subprocess.CompletedProcess:
    sock = ("--socket", str(socket)) if socket is not None else ()
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([*prefix, sys.executable, "-m", "agent.cli", *sock, *args], **stdin,
                          capture_output=True, timeout=120, cwd=kw.get("cwd", ROOT), env=ENV)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _subcommands(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommands(sub, (*path, name))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with AgentDaemon(tmp_path_factory.mktemp("cli") / "agent") as d:
        yield d


def test_every_option_has_help_text():
    """Every option and positional of every subcommand the parser builds has help text."""
    parser = build_parser()
    missing = []
    for path, sub in [((), parser), *_subcommands(parser)]:
        for a in sub._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if sub.add_help is False:
                continue  # delegated commands (doctor, verify, debug) own their parsers
            if not a.help:
                missing.append((path, a.dest))
    assert missing == []


def test_every_subcommand_prints_help_and_exits_0():
    """`--help` works for the top level and every subcommand, delegated ones included; exec
    and run show `-- COMMAND` in their usage."""
    parser = build_parser()
    paths = [()] + [p for p, _ in _subcommands(parser)]
    for path in paths:
        r = cli(*path, "--help")
        assert r.returncode == 0, (path, r.stderr)
        assert r.stdout.startswith(b"usage:"), path
    assert b"-- COMMAND" in cli("run", "--help").stdout
    assert b"ID -- COMMAND" in cli("session", "exec", "--help").stdout
    assert b"125" in cli("--help").stdout  # the exit codes are documented in the help


def test_version():
    """`--version` prints the package version."""
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.decode().strip() == f"nanorix-agent {__version__}"


def test_exit_codes_without_a_daemon(tmp_path):
    """No daemon: 125 with one line; usage errors and a missing COMMAND: 2; no traceback."""
    none = tmp_path / "none.sock"
    for args in (("run", "--", "true"), ("health",), ("session", "list"),
                 ("session", "exec", "sess_0000000000000001", "--", "true")):
        r = cli(*args, socket=none)
        assert r.returncode == 125, (args, r.stderr)
        assert "cannot reach the agent" in _one_line_error(r)
    r = cli("run", socket=none)
    assert r.returncode == 2 and "missing COMMAND" in _one_line_error(r)
    r = cli("session", "list", "--bogus", socket=none)
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"usage:" in r.stderr
    r = cli("run", "--env", "NOEQUALS", "--", "true", socket=none)
    assert r.returncode == 2 and "KEY=VALUE" in _one_line_error(r)
    r = cli("run", "--input-file", str(tmp_path / "missing"), "--", "true", socket=none)
    assert r.returncode == 2 and "cannot read --input-file" in _one_line_error(r)


def test_agent_errors_exit_125_with_one_line(daemon):
    """An API error (NotFound) exits 125 with the error's name, status and message."""
    r = daemon.cli("session", "get", "sess_0000000000000001")
    assert r.returncode == 125 and "NotFound 404" in _one_line_error(r)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_non_root_gets_needs_root_explanations(daemon, tmp_path):
    """As uid 65534: client commands say the socket needs root or the group (125), `serve`
    says it needs root (2), `doctor` starts with a failing `root` check."""
    nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
    r = cli("health", socket=daemon.socket, prefix=nobody)
    assert r.returncode == 125 and "needs root" in _one_line_error(r)
    r = cli("serve", "--state-dir", str(tmp_path / "s"), "--runtime-dir", str(tmp_path / "r"),
            prefix=nobody)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"serve needs root" in r.stderr
    assert not (tmp_path / "s").exists()
    r = cli("doctor", prefix=nobody)
    assert r.returncode == 1 and r.stdout.decode().startswith("fail  root ")
    assert b"Traceback" not in r.stderr


def test_run_with_env_and_piped_stdin(daemon, tmp_path):
    """`run --env` sets variables; piped stdin becomes /input/data (also `--input-file -`)."""
    r = daemon.cli("run", "--env", "A=1", "--env", "B=two words", "--",
                   'echo "$A $B"; cat /input/data', input=b"piped\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"1 two words\npiped\n"
    r = daemon.cli("run", "--input-file", "-", "--", "wc -c < /input/data", input=b"x" * 1000,
                   cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == b"1000"
    r = daemon.cli("run", "--no-stdin", "--", "test -e /input/data; echo $?", input=b"ignored",
                   cwd=tmp_path)
    assert r.stdout.strip() == b"1"


def test_session_exec_stdin_env_out_summary_and_table(daemon, tmp_path):
    """session exec reads piped stdin and --env; list -o table; destroy --out prints one line."""
    sid = json.loads(daemon.cli("session", "create", "--customer", "tbl").stdout)["session_id"]
    r = daemon.cli("session", "exec", sid, "--env", "K=v", "--", "echo $K; cat /input/data",
                   input=b"in")
    assert r.returncode == 0 and r.stdout == b"v\nin"
    r = daemon.cli("session", "list", "--customer", "tbl", "-o", "table")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["SESSION_ID", "STATUS"]
    assert lines[1].split()[:2] == [sid, "active"] and len(lines) == 2
    out = tmp_path / "p.json"
    r = daemon.cli("session", "destroy", sid, "--out", str(out))
    assert r.returncode == 0
    assert r.stdout.decode().splitlines() == [
        f"{sid}: destroyed (reason requested), proof written to {out} (v1)"]
    assert verify(json.loads(out.read_text()))["valid"]
    r = daemon.cli("proof", "pending", "-o", "table")
    assert r.returncode == 0 and r.stdout.decode().split()[:3] == ["SESSION_ID", "STATUS",
                                                                    "REASON"]


def test_ctrl_c_during_run_destroys_the_session_and_exits_130(daemon, tmp_path):
    """SIGINT to `run -- sleep 300`: one line, the session is destroyed, its proof written
    and valid, exit 130, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "--socket", str(daemon.socket),
                          "run", "--customer", "ctrlc", "--", "sleep 300"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            live = daemon.call("session.list", {"customer_id": "ctrlc"})
            if live and live[0]["status"] == "executing":
                break
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        sid = live[0]["session_id"]
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert b"Traceback" not in err
    assert f"interrupted: destroying {sid}".encode() in err
    assert daemon.call("session.get", {"session_id": sid})["status"] != "active"
    assert verify(json.loads((tmp_path / f"{sid}.cdp.json").read_text()))["valid"]


def test_closed_stdout_is_quiet(daemon):
    """A reader that closed our stdout before we print: exit 141, no traceback."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        p = subprocess.run([sys.executable, "-m", "agent.cli", "--socket", str(daemon.socket),
                            "info"], stdin=subprocess.DEVNULL, stdout=w_fd,
                           stderr=subprocess.PIPE, timeout=60, env=ENV, cwd=ROOT)
    finally:
        os.close(w_fd)
    assert p.returncode == 141 and p.stderr == b""


def test_shell_completion(tmp_path):
    """`completion bash` prints a script; argcomplete completes subcommand names."""
    r = cli("completion", "bash")
    assert r.returncode == 0 and b"complete" in r.stdout
    out = tmp_path / "completions"
    line = "nanorix-agent ses"
    env = {**ENV, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"}
    subprocess.run([sys.executable, "-m", "agent.cli"], env=env, cwd=ROOT, timeout=60,
                   stdin=subprocess.DEVNULL, capture_output=True)
    assert out.read_text().split() == ["session"]
