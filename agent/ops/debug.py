"""Operator debug socket (SPEC 9): `/run/nanorix-agent/debug.sock`, mode 0600, root only.

One line command per connection, one answer, then the server closes (works with
`echo status | socat - UNIX-CONNECT:/run/nanorix-agent/debug.sock` and with
`nanorix-agent debug CMD`).  Commands: status, sessions, session ID, metrics, config, keys,
log-level [LEVEL], destroy ID, help.  Answers are JSON (metrics: Prometheus text).

Nothing customer-supplied is ever shown: session answers are built from an allow-list of
metadata keys, never from commands, input, output, file names or receipts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path

import trio

from agent import config as config_mod
from agent import log
from agent.ops import recovery
from agent.ops.metrics import Metrics
from agent.ops.view import ServiceView

SESSION_KEYS = ("session_id", "customer_id", "tier", "status", "created_at", "expires_at",
                "ttl_seconds", "data_classification", "jurisdiction", "exec_count", "reason")
HELP = ("commands: status | sessions | session ID | metrics | config | keys | "
        "log-level [debug|info|warning|error] | destroy ID | help")


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"


def _meta(m: dict | None) -> dict | None:
    return None if m is None else {k: m.get(k) for k in SESSION_KEYS if k in m}


def _error(msg: str) -> str:
    return f"error: {msg}\n"


def _by_status(service: ServiceView) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in service.list_sessions():
        out[m.get("status", "?")] = out.get(m.get("status", "?"), 0) + 1
    return out


def _status(service: ServiceView) -> dict:
    mon = service.health
    out: dict = {"log_level": log.get_level(), "draining": service.draining,
                 "node_id": service.config.node.node_id}
    if service.version:
        out["version"] = service.version
    if mon is not None:
        out.update(mon.snapshot())
        out["engine_details"] = mon.details()
        out["reasons"] = {k: v["reason"] for k, v in out["engine_details"].items() if v["reason"]}
    else:
        out["status"] = "unknown"
        out["reasons"] = {"health": "health monitor not running"}
    for name, fn in (("capacity", lambda: service.capacity()),
                     ("sessions_by_status", lambda: _by_status(service)),
                     ("spool_depth", lambda: service.spool.depth())):
        try:
            out[name] = fn()
        except Exception as e:
            out[name] = f"unavailable: {type(e).__name__}"
    rep = recovery.LAST_REPORT  # the service holds no report: the module keeps the last one
    if rep is not None:
        out["recovery"] = rep.to_dict()
    return out


def _config(service: ServiceView) -> dict:
    cfg = service.config
    d = dataclasses.asdict(cfg)
    d["derived"] = {"socket_path": str(cfg.socket_path),
                    "debug_socket_path": str(cfg.debug_socket_path),
                    "authority_id": cfg.authority_id}
    return d


def _keys(service: ServiceView) -> dict:
    ks = service.key_store
    out: dict = {"attestation": ks.records()}
    try:
        cur = ks.current()
        out["current"] = cur.key_id
        out["current_age_seconds"] = int(ks.age_seconds())
    except Exception as e:
        out["current"] = f"unavailable: {type(e).__name__}"
    return out


async def handle_command(line: str, service: ServiceView) -> str:
    """The answer to one command line (never raises)."""
    parts = line.strip().split()
    if not parts:
        return _error("empty command; " + HELP)
    cmd, args = parts[0].lower(), parts[1:]
    try:
        if cmd == "help":
            return HELP + "\n"
        if cmd == "status" and not args:
            return _json(_status(service))
        if cmd == "sessions" and not args:
            return _json([_meta(m) for m in service.list_sessions()])
        if cmd == "session" and len(args) == 1:
            m = _meta(service.get_meta(args[0]))
            return _json(m) if m is not None else _error("session not found")
        if cmd == "metrics" and not args:
            metrics = service.metrics  # the service sees a MetricsHook; rendering is ours
            return metrics.render(service) if isinstance(metrics, Metrics) else _error("metrics unavailable")
        if cmd == "config" and not args:
            return _json(_config(service))
        if cmd == "keys" and not args:
            return _json(_keys(service))
        if cmd == "log-level" and len(args) <= 1:
            if args:
                log.set_level(args[0].lower())
                log.get().info("log_level_changed", level=args[0].lower(), by="debug_socket")
            return _json({"log_level": log.get_level()})
        if cmd == "destroy" and len(args) == 1:
            if service.get_meta(args[0]) is None:
                return _error("session not found")
            with trio.move_on_after(service.config.timeouts.debug_destroy_seconds) as cs:
                res = await service.destroy(args[0], reason="operator")
            if cs.cancelled_caught:
                return _error("destroy timed out")
            cdp = res.get("cdp") or {}
            return _json({"session_id": res.get("session_id"), "status": res.get("status"),
                          "reason": "operator", "final_hash": cdp.get("final_hash")})
    except ValueError as e:
        return _error(str(e))
    except Exception as e:
        # the type only: an exception message could quote something we must not show
        log.get().warning("debug_command_failed", command=cmd, error=type(e).__name__)
        return _error(f"{cmd} failed: {type(e).__name__}")
    return _error(f"unknown command or wrong arguments: {cmd}; " + HELP)


def _peer_uid(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


async def _serve_conn(stream: trio.SocketStream, service: ServiceView) -> None:
    async with stream:
        try:
            uid = _peer_uid(stream.socket)
        except OSError:
            return
        if uid not in (0, os.geteuid()):
            log.get().warning("debug_peer_refused", uid=uid)
            return
        buf = b""
        max_line = service.config.debug.max_line_bytes
        with trio.move_on_after(service.config.timeouts.debug_read_seconds):
            while b"\n" not in buf and len(buf) <= max_line:
                chunk = await stream.receive_some(max_line)
                if not chunk:
                    break
                buf += chunk
        if len(buf) > max_line:
            answer = _error("line too long")
        else:
            try:
                line = buf.split(b"\n", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                line = None
            answer = _error("not UTF-8") if line is None else await handle_command(line, service)
        try:
            await stream.send_all(answer.encode())
            await stream.send_eof()
            # read what the client still sends (bounded) so closing does not reset the
            # connection before the client has read the answer
            with trio.move_on_after(1.0):
                drained = 0
                while drained < 1 << 20:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def bind_debug_socket(path: Path) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from birth (umask), stale socket replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(16)
    return s


async def serve_debug(path: Path, service: ServiceView, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the debug socket until cancelled (use with `await nursery.start(...)`)."""
    raw = bind_debug_socket(path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    log.get().info("debug_socket_listening", mode="0600")
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async with listener:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_serve_conn, stream, service)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- client: `nanorix-agent debug CMD` ---------------------------------------------------------

# the client has no agent config: the default [timeouts] debug_destroy_seconds, plus 10 s
CLIENT_TIMEOUT = 130.0


def request(path: Path, command: str, timeout: float = CLIENT_TIMEOUT) -> str:
    """Send one command line and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.strip().encode() + b"\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks).decode("utf-8", "replace")


UNREACHABLE_EXIT = 125  # the CLI's "agent error or unreachable" code (agent/cli.py)


def client_main(argv: list[str] | None = None) -> int:
    """`nanorix-agent debug [--socket P | --config F --runtime-dir D] CMD [ARG]`; exit 1 when
    the answer is an error, 125 when the socket cannot be reached."""
    ap = argparse.ArgumentParser(prog="nanorix-agent debug", description=HELP)
    ap.add_argument("--socket", type=Path, default=None, metavar="PATH",
                    help="debug socket (default: $NANORIX_AGENT_DEBUG_SOCKET, beside the "
                         "agent's --socket, or from the config)")
    ap.add_argument("--config", type=Path, default=None, metavar="FILE",
                    help="config whose runtime dir holds the debug socket")
    ap.add_argument("--runtime-dir", type=Path, default=None, metavar="DIR",
                    help="runtime dir holding debug.sock")
    ap.add_argument("command", nargs="+", metavar="CMD", help="a debug command and its argument")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    path = args.socket or (Path(os.environ["NANORIX_AGENT_DEBUG_SOCKET"])
                           if os.environ.get("NANORIX_AGENT_DEBUG_SOCKET") else None)
    if path is None and os.environ.get("NANORIX_AGENT_SOCKET") and args.config is None:
        # `nanorix-agent --socket RUN/agent.sock debug ...`: the debug socket sits beside it
        path = Path(os.environ["NANORIX_AGENT_SOCKET"]).parent / "debug.sock"
    if path is None:
        try:
            cfg = config_mod.load(args.config, runtime_dir=args.runtime_dir)
        except config_mod.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        path = cfg.debug_socket_path
    try:
        answer = request(path, " ".join(args.command))
    except PermissionError:
        print(f"error: permission denied on the debug socket {path}: it is root only (0600); "
              "run as root", file=sys.stderr)
        return UNREACHABLE_EXIT
    except OSError as e:
        print(f"error: cannot reach the debug socket {path}: {e.strerror or e} (is the agent "
              "running?)", file=sys.stderr)
        return UNREACHABLE_EXIT
    sys.stdout.write(answer)
    sys.stdout.flush()
    return 1 if answer.startswith("error:") else 0
