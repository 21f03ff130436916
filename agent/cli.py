# PYTHON_ARGCOMPLETE_OK
"""`nanorix-agent`: the one entry point (SPEC 8, CLI table).  Also `python -m agent.cli`.

The agent is chosen with `--socket PATH` or `$NANORIX_AGENT_SOCKET` (default
`/run/nanorix-agent/agent.sock`).

Exit codes (every command):
  0     success (`health`: the agent is healthy)
  1     a negative answer: `health` not healthy, `verify` found an invalid proof, `doctor`
        found a failing check
  2     usage error: a bad option or argument, a missing COMMAND, an unreadable input file,
        `serve` with a bad config or not as root
  125   the agent refused or failed, or could not be reached (no daemon, permission denied
        on its socket, connection lost)
  130   interrupted (Ctrl-C); `run` still destroys its session and writes the proof first
  141   stdout was closed (a pipe reader exited); `run` still destroys its session
`session exec` and `run` otherwise exit with the command's own exit code.  Errors are one
line on stderr, never a traceback.

Commands that add subcommands use the same conventions: a `cmd_*` function returns the exit
code and raises `CliError(message, code)` (or lets ApiError / OSError from the client
through); `_guarded` turns every exception into one line and its exit code.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import CLASSIFICATIONS, JURISDICTIONS
from agent.errors import ApiError

__all__ = ["EXIT_AGENT", "EXIT_USAGE", "CliError", "UsageError", "build_parser", "main"]

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_AGENT = 125  # the agent, not the command, failed (or could not be reached)
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
AGENT_ERROR_EXIT = EXIT_AGENT  # old name
DEFAULT_CUSTOMER = "local"
MAX_INPUT_READ = 64 * 1024 * 1024  # the agent's own limit (exec.max_input_bytes) is lower
DELEGATED = ("doctor", "verify", "debug")


def _delegated(name: str) -> Callable[[list[str] | None], int]:
    """The entry point of a command owned by another module (imported only when used, so
    the other commands start without it)."""
    if name == "doctor":
        from agent.doctor import main as doctor_main
        return doctor_main
    if name == "verify":
        from agent.verify_cli import main as verify_main
        return verify_main
    assert name == "debug"
    from agent.ops.debug import client_main
    return client_main


class CliError(Exception):
    """A user-facing failure: one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_AGENT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def _say(message: str) -> None:
    try:
        print(f"nanorix-agent: {message}", file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


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


def _print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    cells = [[str(c).upper() for c in columns]]
    cells += [["-" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _print_list(args, rows: list[dict], columns: tuple[str, ...]) -> None:
    if args.output == "table":
        _print_table(rows, columns)
    else:
        _print_json(rows)


def _client(args, timeout: float | None = None):
    """A connected client; connection failures become one-line CliErrors (exit 125)."""
    from agent.rpc.client import Client

    try:
        return Client(args.socket, timeout=timeout)
    except PermissionError:
        raise CliError(f"permission denied on {args.socket}: talking to the agent needs root "
                       "or membership in its socket group (rpc.socket_group, default nanorix)"
                       ) from None
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise CliError(f"cannot reach the agent at {args.socket}: {e.strerror} (is "
                       "`nanorix-agent serve` or the nanorix-agent unit running?)") from None
    except OSError as e:
        raise CliError(f"cannot reach the agent at {args.socket}: {e.strerror or e}") from None


def _command_string(argv: list[str]) -> str:
    """One argument is taken as a shell command line; several are quoted and joined."""
    if not argv:
        raise UsageError("missing COMMAND after -- (e.g. `-- python3 -c 'print(42)'`)")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _read_stdin() -> bytes:
    data = sys.stdin.buffer.read(MAX_INPUT_READ + 1)
    if len(data) > MAX_INPUT_READ:
        raise UsageError(f"standard input is larger than {MAX_INPUT_READ} bytes")
    return data


def _stdin_is_data() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def _input(args) -> bytes | None:
    """--input-file F (`-` = stdin), --input-data S, else stdin when it is not a terminal
    (and not --no-stdin); empty stdin means no input."""
    if args.input_file:
        if args.input_file == "-":
            return _read_stdin()
        try:
            with open(args.input_file, "rb") as f:
                data = f.read(MAX_INPUT_READ + 1)
        except OSError as e:
            raise UsageError(f"cannot read --input-file: {e.strerror}") from None
        if len(data) > MAX_INPUT_READ:
            raise UsageError(f"--input-file is larger than {MAX_INPUT_READ} bytes")
        return data
    if args.input_data is not None:
        return args.input_data.encode("utf-8")
    if not args.no_stdin and _stdin_is_data():
        return _read_stdin() or None
    return None


def _env(args) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out or None


def _write_proof(result: dict, path: str, fmt: str) -> None:
    doc = result["auditproof"] if fmt == "auditproof" else result["cdp"]
    data = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
    except OSError as e:
        raise CliError(f"cannot write the proof to {path}: {e.strerror}", EXIT_USAGE) from None


def _create_params(args) -> dict:
    p = {"customer_id": args.customer, "tier": args.tier,
         "data_classification": args.classification, "jurisdiction": args.jurisdiction}
    if args.ttl is not None:
        p["ttl_seconds"] = args.ttl
    if args.session_id:
        p["session_id"] = args.session_id
    return p


class _StdoutGone(Exception):
    """Our stdout reader exited while a command was streaming."""


def _stream_exec(client, session_id: str, command: str, data: bytes | None,
                 timeout: float | None, env: dict | None) -> dict:
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def on_notify(method: str, params: dict) -> None:
        if method != "exec.output":
            return
        target = out if params.get("stream") == "stdout" else err
        try:
            target.write(params.get("data") or b"")
            target.flush()
        except (BrokenPipeError, ValueError):
            raise _StdoutGone() from None  # closing the connection kills the command

    params: dict = {"session_id": session_id, "command": command, "stream": True}
    if data is not None:
        params["input_data"] = data
    if timeout is not None:
        params["timeout"] = timeout
    if env:
        params["env"] = env
    return client.call("session.exec", params, on_notify=on_notify)


def _silence_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null so the interpreter's final flush cannot
    fail again (which would print a traceback and exit 120)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


# -- commands --------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from agent.daemon import serve

    return serve(args.config, args.state_dir, args.runtime_dir)


def cmd_session_create(args) -> int:
    with _client(args) as c:
        _print_json(c.call("session.create", _create_params(args)))
    return EXIT_OK


def cmd_session_exec(args) -> int:
    command = _command_string(args.command)
    env = _env(args)
    data = _input(args)
    with _client(args) as c:
        if args.json:
            params: dict = {"session_id": args.id, "command": command}
            if data is not None:
                params["input_data"] = data
            if args.timeout is not None:
                params["timeout"] = args.timeout
            if env:
                params["env"] = env
            res = c.call("session.exec", params)
            _print_json(res)
        else:
            try:
                res = _stream_exec(c, args.id, command, data, args.timeout, env)
            except _StdoutGone:
                raise BrokenPipeError() from None
    return int(res["exit_code"]) & 0xFF


def cmd_session_get(args) -> int:
    with _client(args) as c:
        p = {"session_id": args.id}
        if args.customer:
            p["customer_id"] = args.customer
        _print_json(c.call("session.get", p))
    return EXIT_OK


SESSION_COLUMNS = ("session_id", "status", "data_classification", "ttl_seconds", "created_at",
                   "expires_at")


def cmd_session_list(args) -> int:
    with _client(args) as c:
        rows = c.call("session.list", {"customer_id": args.customer} if args.customer else {})
    _print_list(args, rows, SESSION_COLUMNS)
    return EXIT_OK


def _proof_summary(res: dict, path: str, fmt: str) -> str:
    return (f"{res.get('session_id')}: {res.get('status')}"
            + (f" (reason {res['reason']})" if res.get("reason") else "")
            + f", proof written to {path} ({fmt})")


def cmd_session_destroy(args) -> int:
    with _client(args) as c:
        p = {"session_id": args.id}
        if args.customer:
            p["customer_id"] = args.customer
        res = c.call("session.destroy", p)
    if args.out:
        _write_proof(res, args.out, args.format)
        print(_proof_summary(res, args.out, args.format))
    else:
        _print_json(res)
    return EXIT_OK


def cmd_run(args) -> int:
    from agent.cdp.verify import verify

    command = _command_string(args.command)
    env = _env(args)
    data = _input(args)
    with _client(args) as c:
        sid = c.call("session.create", _create_params(args))["session_id"]
    exit_code, stopped = EXIT_AGENT, None
    try:
        with _client(args) as c:
            res = _stream_exec(c, sid, command, data, args.timeout, env)
        exit_code = int(res["exit_code"]) & 0xFF
    except ApiError as e:
        _say(_api_error_line(e))
    except KeyboardInterrupt:
        stopped = EXIT_INTERRUPTED
        _say(f"interrupted: destroying {sid}")
    except _StdoutGone:
        stopped = EXIT_BROKEN_PIPE
        _silence_stdout()
    except OSError as e:  # the exec's connection broke: still try to destroy
        _say(f"lost the connection to the agent during the command: {e.strerror or e}")
    # a fresh connection (closing the exec's connection killed the command); no second
    # Ctrl-C may cut the destruction short: the session and its proof must not be lost
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _client(args) as c:
            result = c.call("session.destroy", {"session_id": sid})
        path = args.cdp_out or f"./{sid}.cdp.json"
        _write_proof(result, path, args.format)
    finally:
        signal.signal(signal.SIGINT, old)
    doc = result["auditproof"] if args.format == "auditproof" else result["cdp"]
    valid = verify(doc).get("valid") is True
    if stopped != EXIT_BROKEN_PIPE:
        sys.stdout.flush()
    _say_plain(f"{sid}: {result['status']}, exit code "
               f"{exit_code if stopped is None else 'none (stopped)'}")
    _say_plain(f"cdp: {path} ({args.format}), valid: {str(valid).lower()}")
    if stopped is not None:
        return stopped
    return exit_code if valid else EXIT_AGENT


def _say_plain(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def cmd_keys_get(args) -> int:
    with _client(args) as c:
        _print_json(c.call("key.get", {"key_id": args.key_id}))
    return EXIT_OK


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
    return EXIT_OK if res.get("status") == "healthy" else EXIT_NEGATIVE


def cmd_drain(args) -> int:
    with _client(args) as c:
        _print_json(c.call("agent.drain", {"drain": args.cmd == "drain"}))
    return EXIT_OK


def cmd_info(args) -> int:
    with _client(args) as c:
        _print_json(c.call("agent.info"))
    return EXIT_OK


def cmd_proof(args) -> int:
    if args.action in ("get", "ack") and not args.id:
        raise UsageError(f"proof {args.action} needs a session id")
    with _client(args) as c:
        if args.action == "pending":
            res, page = [], c.call("proof.pending")
            while page:  # pages in session-id order; the last page is empty
                res += page
                page = c.call("proof.pending", {"after": page[-1]["session_id"]})
            _print_list(args, [{"session_id": r.get("session_id"), "status": r.get("status"),
                                "reason": r.get("reason")} for r in res],
                        ("session_id", "status", "reason"))
            return EXIT_OK
        if args.action == "get":
            res = c.call("proof.get", {"session_id": args.id})
            if args.out:
                _write_proof(res, args.out, args.format)
                print(_proof_summary(res, args.out, args.format))
            else:
                _print_json(res)
        else:
            _print_json(c.call("proof.ack", {"session_id": args.id}))
    return EXIT_OK


def cmd_completion(args) -> int:
    try:
        import argcomplete
    except ImportError:
        raise CliError("shell completion needs the argcomplete package", EXIT_USAGE) from None
    sys.stdout.write(argcomplete.shellcode(["nanorix-agent"], shell=args.shell))
    return EXIT_OK


def _api_error_line(e: ApiError) -> str:
    field = f" (field {e.field})" if e.field else ""
    return f"{e.name} {e.status}: {e.message}{field}"


# -- parser --------------------------------------------------------------------------------

def _session_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("session options")
    g.add_argument("--tier", default="free", help="tier of the node's config (default: free)")
    g.add_argument("--classification", default="general", choices=CLASSIFICATIONS,
                   help="data classification: picks the seccomp profile and wipe passes "
                        "(default: general)")
    g.add_argument("--jurisdiction", default="US", choices=JURISDICTIONS,
                   help="jurisdiction recorded in the proof (default: US)")
    g.add_argument("--customer", default=DEFAULT_CUSTOMER,
                   help=f"customer id owning the session (default: {DEFAULT_CUSTOMER})")
    g.add_argument("--ttl", type=int, default=None, metavar="SECONDS",
                   help="session lifetime in seconds (default: the tier's; clamped to its max)")
    g.add_argument("--session-id", default=None, metavar="ID",
                   help="sess_ + 16 hex digits (default: random)")


def _exec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input-file", metavar="FILE",
                   help="file given to the command as /input/data; `-` reads standard input")
    g.add_argument("--input-data", metavar="TEXT", help="text given to the command as /input/data")
    g.add_argument("--no-stdin", action="store_true",
                   help="do not read standard input even when it is not a terminal")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="environment variable for the command (repeatable)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill the command after this long (default and maximum: the remaining TTL)")


def _output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("json", "table"), default="json",
                   help="output format (default: json)")


def _format_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--format", choices=("v1", "auditproof"), default="v1",
                   help=f"{what}: CDP v1.0 or the AuditProof 2.1 rendition (default: v1)")


EXIT_HELP = """exit codes: 0 success; 1 negative answer (health not healthy, invalid proof,
failing doctor check); 2 usage error; 125 agent error or agent unreachable; 130 Ctrl-C;
141 stdout closed.  `run` and `session exec` exit with the command's own code."""


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="nanorix-agent", description="Node agent for ephemeral sandboxed sessions with "
        "cryptographic destruction proofs.", epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"nanorix-agent {__version__}",
                     help="print the version and exit")
    top.add_argument("--socket", default=None, metavar="PATH",
                     help="agent socket (default $NANORIX_AGENT_SOCKET or "
                          "/run/nanorix-agent/agent.sock)")
    sub = top.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground (as root)",
                       description="Run the daemon in the foreground (what systemd runs). "
                                   "SIGHUP reloads the config, SIGTERM/SIGINT drain and exit.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML config (default /etc/nanorix-agent/agent.toml when it exists)")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="journal, proof spool, keys (default /var/lib/nanorix-agent)")
    p.add_argument("--runtime-dir", type=Path, default=None, metavar="DIR",
                   help="sockets and session mounts (default /run/nanorix-agent)")
    p.set_defaults(fn=cmd_serve)

    sub.add_parser("doctor", help="check this host (see `doctor --help`)", add_help=False)
    sub.add_parser("verify", help="verify proof files offline (see `verify --help`)",
                   add_help=False)
    sub.add_parser("debug", help="send a command to the debug socket (see `debug --help`)",
                   add_help=False)

    sess = sub.add_parser("session", help="session commands: create, exec, get, list, destroy",
                          description="Session commands.").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = sess.add_parser("create", help="create a session and print it as JSON",
                        description="Create a session and print it as JSON.")
    _session_options(p)
    p.set_defaults(fn=cmd_session_create)
    p = sess.add_parser("exec", help="run a command in a session",
                        usage="nanorix-agent session exec [options] ID -- COMMAND [ARG...]",
                        description="Run COMMAND in session ID, streaming its output; exits "
                                    "with its exit code.  One COMMAND argument is a shell "
                                    "command line; several are quoted and joined.")
    p.add_argument("id", metavar="ID", help="session id (sess_…)")
    _exec_options(p)
    p.add_argument("--json", action="store_true",
                   help="print the whole result as JSON instead of streaming the output")
    p.set_defaults(fn=cmd_session_exec)
    p = sess.add_parser("get", help="print one session's metadata",
                        description="Print one session's metadata as JSON.")
    p.add_argument("id", metavar="ID", help="session id (sess_…)")
    p.add_argument("--customer", default=None, help="only if this customer owns it")
    p.set_defaults(fn=cmd_session_get)
    p = sess.add_parser("list", help="list sessions", description="List sessions.")
    p.add_argument("--customer", default=None, help="only this customer's sessions")
    _output_option(p)
    p.set_defaults(fn=cmd_session_list)
    p = sess.add_parser("destroy", help="destroy a session and get its proof",
                        description="Destroy a session; prints the destroy result as JSON, "
                                    "or with --out writes the proof and prints one line.")
    p.add_argument("id", metavar="ID", help="session id (sess_…)")
    p.add_argument("--customer", default=None, help="only if this customer owns it")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the proof to FILE and print a one-line summary")
    _format_option(p, "proof format for --out")
    p.set_defaults(fn=cmd_session_destroy)

    p = sub.add_parser("run", help="one shot: create, exec (streamed), destroy, verify",
                       usage="nanorix-agent run [options] -- COMMAND [ARG...]",
                       description="Create a session, run COMMAND in it (output streamed), "
                                   "destroy it, write and verify the proof.  Exits with the "
                                   "command's exit code.  Standard input, when it is not a "
                                   "terminal, becomes /input/data.")
    _session_options(p)
    _exec_options(p)
    p.add_argument("--cdp-out", default=None, metavar="FILE",
                   help="where to write the proof (default ./<session_id>.cdp.json)")
    _format_option(p, "proof format")
    p.set_defaults(fn=cmd_run)

    keys = sub.add_parser("keys", help="key records", description="Key records.").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = keys.add_parser("get", help="print a key record (attestation or receipt key)",
                        description="Print a key record as JSON.")
    p.add_argument("key_id", metavar="KEY_ID", help="nrx-verify-… or nrx-receipt-…")
    p.set_defaults(fn=cmd_keys_get)
    p = keys.add_parser("export", help="attestation public keys as a key set for "
                                       "`verify --trust`")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="read <DIR>/keys directly instead of asking the agent")
    p.set_defaults(fn=cmd_keys_export)

    sub.add_parser("health", help="the agent's health (exit 0 only when healthy)",
                   description="Print agent.health; exit 0 when healthy, 1 otherwise."
                   ).set_defaults(fn=cmd_health)
    sub.add_parser("info", help="version, node id, capacity, cgroup mode, tiers",
                   description="Print agent.info as JSON.").set_defaults(fn=cmd_info)
    sub.add_parser("drain", help="refuse new sessions (live ones keep working)",
                   description="agent.drain: creates answer Unavailable until undrain."
                   ).set_defaults(fn=cmd_drain)
    sub.add_parser("undrain", help="accept new sessions again",
                   description="agent.drain with drain=false.").set_defaults(fn=cmd_drain)
    p = sub.add_parser("proof", help="spooled proofs: pending | get ID | ack ID",
                       description="Proofs spooled by the agent until acknowledged.")
    p.add_argument("action", choices=("pending", "get", "ack"),
                   help="pending: list; get: print or write one; ack: let the agent drop it")
    p.add_argument("id", nargs="?", metavar="ID", help="session id (for get and ack)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="get: write the proof to FILE and print a one-line summary")
    _format_option(p, "proof format for --out")
    _output_option(p)
    p.set_defaults(fn=cmd_proof)

    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script, e.g. "
                                   "`nanorix-agent completion bash > "
                                   "/etc/bash_completion.d/nanorix-agent`.")
    p.add_argument("shell", nargs="?", default="bash", choices=("bash", "zsh", "fish", "tcsh"),
                   help="shell (default: bash)")
    p.set_defaults(fn=cmd_completion)
    return top


# -- the shared guard ----------------------------------------------------------------------

def _guarded(fn, *args) -> int:
    """Run a command; every failure becomes one line on stderr and its exit code."""
    try:
        return int(fn(*args) or 0)
    except CliError as e:
        _say(e.message)
        return e.code
    except ApiError as e:
        _say(_api_error_line(e))
        return EXIT_AGENT
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (ConnectionError, TimeoutError) as e:
        _say(f"lost the connection to the agent: {e.strerror or e}")
        return EXIT_AGENT
    except OSError as e:
        _say(f"{e.strerror or e}")
        return EXIT_AGENT
    except Exception as e:  # a bug: still one line, never a traceback
        _say(f"internal error: {type(e).__name__}: {e}")
        return EXIT_AGENT


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion (argcomplete): answers and exits when the shell asks."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _complete(parser)
    # commands owned by other modules get their raw arguments
    rest = list(argv)
    if rest[:1] == ["--socket"] and len(rest) >= 2:
        os.environ["NANORIX_AGENT_SOCKET"] = rest[1]
        rest = rest[2:]
    if rest and rest[0] in DELEGATED:
        entry = _delegated(rest[0])
        return _guarded(lambda: entry(rest[1:]))
    command: list[str] = []
    if "--" in argv:  # everything after the first `--` is the sandbox command
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)  # usage errors: one usage line + message, exit 2
    args.command = command
    if command and args.fn not in (cmd_run, cmd_session_exec):
        parser.error(f"`-- COMMAND` is only for run and session exec, not {args.cmd}")
    if args.socket is None:
        from agent.rpc.client import default_socket

        args.socket = str(default_socket())
    return _guarded(args.fn, args)


def entry() -> None:
    """The console script: `sys.exit(main())`, with Ctrl-C during import kept quiet."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    sys.exit(code)


if __name__ == "__main__":
    entry()
