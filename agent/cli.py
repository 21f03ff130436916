"""`nanorix-agent`: the one entry point (SPEC 8, CLI table).  Also `python -m agent.cli`.

The agent is chosen with `--socket PATH` or `$NANORIX_AGENT_SOCKET` (default
`/run/nanorix-agent/agent.sock`).  Exit codes: `session exec` and `run` exit with the
command's exit code, or 125 when the agent refused or failed; other commands exit 0 on
success, 1 on an agent error, 2 on a usage error or an unreachable agent.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from agent.config import CLASSIFICATIONS, JURISDICTIONS
from agent.errors import ApiError

__all__ = ["main"]

AGENT_ERROR_EXIT = 125  # exec/run: the agent, not the command, failed
DEFAULT_CUSTOMER = "local"


def _jsonable(x: Any) -> Any:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(x).decode("ascii")}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _print_json(x: Any) -> None:
    print(json.dumps(_jsonable(x), indent=2, sort_keys=True, ensure_ascii=False))


def _client(args):
    from agent.rpc.client import Client

    return Client(args.socket)


def _command_string(argv: list[str]) -> str:
    """One argument is taken as a shell command line; several are quoted and joined."""
    if not argv:
        raise SystemExit("nanorix-agent: missing COMMAND after --")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _input(args) -> bytes | None:
    if getattr(args, "input_file", None):
        try:
            return Path(args.input_file).read_bytes()
        except OSError as e:
            raise SystemExit(f"nanorix-agent: cannot read --input-file: {e.strerror}") from None
    if getattr(args, "input_data", None) is not None:
        return args.input_data.encode("utf-8")
    return None


def _write_proof(result: dict, path: str, fmt: str) -> None:
    doc = result["auditproof"] if fmt == "auditproof" else result["cdp"]
    data = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)


def _create_params(args) -> dict:
    p = {"customer_id": args.customer, "tier": args.tier,
         "data_classification": args.classification, "jurisdiction": args.jurisdiction}
    if args.ttl is not None:
        p["ttl_seconds"] = args.ttl
    if getattr(args, "session_id", None):
        p["session_id"] = args.session_id
    return p


def _stream_exec(client, session_id: str, command: str, data: bytes | None,
                 timeout: float | None) -> dict:
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def on_notify(method: str, params: dict) -> None:
        if method != "exec.output":
            return
        target = out if params.get("stream") == "stdout" else err
        target.write(params.get("data") or b"")
        target.flush()

    params: dict = {"session_id": session_id, "command": command, "stream": True}
    if data is not None:
        params["input_data"] = data
    if timeout is not None:
        params["timeout"] = timeout
    return client.call("session.exec", params, on_notify=on_notify)


# -- commands --------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from agent.daemon import serve

    return serve(args.config, args.state_dir, args.runtime_dir)


def cmd_session_create(args) -> int:
    with _client(args) as c:
        _print_json(c.call("session.create", _create_params(args)))
    return 0


def cmd_session_exec(args) -> int:
    command = _command_string(args.command)
    data = _input(args)
    with _client(args) as c:
        try:
            if args.json:
                params: dict = {"session_id": args.id, "command": command}
                if data is not None:
                    params["input_data"] = data
                if args.timeout is not None:
                    params["timeout"] = args.timeout
                res = c.call("session.exec", params)
                _print_json(res)
            else:
                res = _stream_exec(c, args.id, command, data, args.timeout)
        except ApiError as e:
            _error(e)
            return AGENT_ERROR_EXIT
    return int(res["exit_code"]) & 0xFF


def cmd_session_get(args) -> int:
    with _client(args) as c:
        p = {"session_id": args.id}
        if args.customer:
            p["customer_id"] = args.customer
        _print_json(c.call("session.get", p))
    return 0


def cmd_session_list(args) -> int:
    with _client(args) as c:
        _print_json(c.call("session.list", {"customer_id": args.customer} if args.customer
                           else {}))
    return 0


def cmd_session_destroy(args) -> int:
    with _client(args) as c:
        p = {"session_id": args.id}
        if args.customer:
            p["customer_id"] = args.customer
        res = c.call("session.destroy", p)
    if args.out:
        _write_proof(res, args.out, args.format)
    _print_json(res)
    return 0


def cmd_run(args) -> int:
    from agent.cdp.verify import verify
    from agent.rpc.client import Client

    command = _command_string(args.command)
    data = _input(args)
    try:
        with _client(args) as c:
            sid = c.call("session.create", _create_params(args))["session_id"]
    except ApiError as e:
        _error(e)
        return AGENT_ERROR_EXIT
    exit_code = AGENT_ERROR_EXIT
    try:
        with _client(args) as c:
            res = _stream_exec(c, sid, command, data, args.timeout)
        exit_code = int(res["exit_code"]) & 0xFF
    except ApiError as e:
        _error(e)
    finally:
        # a fresh connection: if the exec was interrupted, closing its connection killed it
        with Client(args.socket) as c:
            result = c.call("session.destroy", {"session_id": sid})
    path = args.cdp_out or f"./{sid}.cdp.json"
    _write_proof(result, path, args.format)
    doc = result["auditproof"] if args.format == "auditproof" else result["cdp"]
    valid = verify(doc).get("valid") is True
    sys.stdout.flush()
    print(f"{sid}: {result['status']}, exit code {exit_code}", file=sys.stderr)
    print(f"cdp: {path} ({args.format}), valid: {str(valid).lower()}", file=sys.stderr)
    return exit_code if valid else AGENT_ERROR_EXIT


def cmd_keys_get(args) -> int:
    with _client(args) as c:
        _print_json(c.call("key.get", {"key_id": args.key_id}))
    return 0


def cmd_keys_export(args) -> int:
    """The node's attestation public keys (live and retired) as a trust anchor key set
    for `verify --trust`: from the running agent (`key.export`), or with `--state-dir`
    read straight from `<state-dir>/keys/` (root; works while no agent runs)."""
    if args.state_dir is not None:
        from agent.keys.attestation import read_keyset

        try:
            res = read_keyset(args.state_dir)
        except OSError as e:
            print(f"nanorix-agent: cannot read keys in {args.state_dir}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    else:
        with _client(args) as c:
            res = c.call("key.export")
    _print_json(res)
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        res = c.call("agent.health")
    _print_json(res)
    return 0 if res.get("status") == "healthy" else 1


def cmd_info(args) -> int:
    with _client(args) as c:
        _print_json(c.call("agent.info"))
    return 0


def cmd_proof(args) -> int:
    with _client(args) as c:
        if args.action == "pending":
            res = c.call("proof.pending")
            _print_json([{"session_id": r.get("session_id"), "status": r.get("status")}
                         for r in res])
            return 0
        if not args.id:
            raise SystemExit("nanorix-agent: proof get/ack needs a session id")
        if args.action == "get":
            res = c.call("proof.get", {"session_id": args.id})
            if args.out:
                _write_proof(res, args.out, args.format)
            _print_json(res)
        else:
            _print_json(c.call("proof.ack", {"session_id": args.id}))
    return 0


def _error(e: ApiError) -> None:
    field = f" (field {e.field})" if getattr(e, "field", None) else ""
    print(f"nanorix-agent: {e.name} {e.status}: {e.message}{field}", file=sys.stderr)


# -- parser --------------------------------------------------------------------------------

def _session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", default="free")
    p.add_argument("--classification", default="general", choices=CLASSIFICATIONS)
    p.add_argument("--jurisdiction", default="US", choices=JURISDICTIONS)
    p.add_argument("--customer", default=DEFAULT_CUSTOMER)
    p.add_argument("--ttl", type=int, default=None, help="seconds (clamped to the tier max)")
    p.add_argument("--session-id", default=None, help="sess_ + 16 hex (default: random)")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="nanorix-agent", description=__doc__.splitlines()[0])
    top.add_argument("--socket", default=None,
                     help="agent socket (default $NANORIX_AGENT_SOCKET or "
                          "/run/nanorix-agent/agent.sock)")
    sub = top.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--runtime-dir", type=Path, default=None)
    p.set_defaults(fn=cmd_serve)

    sub.add_parser("doctor", help="check this host", add_help=False)
    sub.add_parser("verify", help="verify CDP files offline", add_help=False)
    sub.add_parser("debug", help="send a command to the debug socket", add_help=False)

    sess = sub.add_parser("session", help="session commands (exec: ... -- COMMAND…)").add_subparsers(
        dest="action", required=True)
    p = sess.add_parser("create")
    _session_options(p)
    p.set_defaults(fn=cmd_session_create)
    p = sess.add_parser("exec")
    p.add_argument("id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input-file")
    g.add_argument("--input-data")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the result instead of streaming")
    p.set_defaults(fn=cmd_session_exec)
    p = sess.add_parser("get")
    p.add_argument("id")
    p.add_argument("--customer", default=None)
    p.set_defaults(fn=cmd_session_get)
    p = sess.add_parser("list")
    p.add_argument("--customer", default=None)
    p.set_defaults(fn=cmd_session_list)
    p = sess.add_parser("destroy")
    p.add_argument("id")
    p.add_argument("--customer", default=None)
    p.add_argument("--out", default=None, help="write the proof to this file")
    p.add_argument("--format", choices=("v1", "auditproof"), default="v1")
    p.set_defaults(fn=cmd_session_destroy)

    p = sub.add_parser("run", help="create, exec (streamed), destroy, verify")
    _session_options(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input-file")
    g.add_argument("--input-data")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--cdp-out", default=None, help="default ./<session_id>.cdp.json")
    p.add_argument("--format", choices=("v1", "auditproof"), default="v1")
    p.set_defaults(fn=cmd_run)

    keys = sub.add_parser("keys", help="key records").add_subparsers(dest="action",
                                                                     required=True)
    p = keys.add_parser("get")
    p.add_argument("key_id")
    p.set_defaults(fn=cmd_keys_get)
    p = keys.add_parser("export", help="attestation public keys as a key set for "
                                       "`verify --trust`")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="read <DIR>/keys directly instead of asking the agent")
    p.set_defaults(fn=cmd_keys_export)

    sub.add_parser("health", help="agent.health").set_defaults(fn=cmd_health)
    sub.add_parser("info", help="agent.info").set_defaults(fn=cmd_info)
    p = sub.add_parser("proof", help="spooled proofs: pending | get ID | ack ID")
    p.add_argument("action", choices=("pending", "get", "ack"))
    p.add_argument("id", nargs="?")
    p.add_argument("--out", default=None)
    p.add_argument("--format", choices=("v1", "auditproof"), default="v1")
    p.set_defaults(fn=cmd_proof)
    return top


def _delegate(module: str, func: str, argv: list[str]) -> int:
    import importlib

    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # commands owned by other modules get their raw arguments
    rest = list(argv)
    if rest[:1] == ["--socket"] and len(rest) >= 2:
        os.environ["NANORIX_AGENT_SOCKET"] = rest[1]
        rest = rest[2:]
    if rest and rest[0] in ("doctor", "verify", "debug"):
        target = {"doctor": ("agent.doctor", "main"), "verify": ("agent.verify_cli", "main"),
                  "debug": ("agent.ops.debug", "client_main")}[rest[0]]
        return _delegate(*target, rest[1:])
    command: list[str] = []
    if "--" in argv:  # everything after the first `--` is the sandbox command
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.command = command
    if args.socket is None:
        from agent.rpc.client import default_socket

        args.socket = str(default_socket())
    try:
        return args.fn(args)
    except ApiError as e:
        _error(e)
        return 1
    except (FileNotFoundError, ConnectionRefusedError) as e:
        if args.cmd == "serve":
            raise
        print(f"nanorix-agent: cannot reach the agent at {args.socket}: {e.strerror}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
