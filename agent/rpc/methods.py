"""The RPC method table (SPEC 8) with exact field names, parameter checks and dispatch.

Each method declares its fields; an unknown field, a missing required field, a wrong type
or an out-of-range value is `BadRequest` naming the field (`field` in the error map).  A
nil value for an optional field means "absent".  An unknown method is `BadRequest` naming
`method`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from agent.config import CLASSIFICATIONS, JURISDICTIONS
from agent.errors import ApiError, BadRequest, Conflict, InternalError, NotFound
from agent.rpc.server import CallContext, Limits
from agent.sandbox.exec import CHUNK, PacedOutput
from agent.sandbox.faults import (
    ExecBusy,
    ExecFailed,
    ExecRefused,
    InputDoesNotFit,
    SandboxFault,
    SandboxGone,
)
from agent.service.sessions import SESSION_ID_RE, Service
from agent.timefmt import iso_seconds

__all__ = ["METHODS", "Api"]

MAX_ID_LEN = 256
# the command is one argv string of `/bin/sh -c COMMAND`: Linux caps a single argv or
# environment string at MAX_ARG_STRLEN (32 pages = 128 KiB, with its NUL), so a longer one
# could never start (execve E2BIG).  The same cap applies to each `NAME=value` of `env`.
MAX_COMMAND_BYTES = 128 * 1024 - 1
PENDING_PAGE_DEFAULT = 100

_log = structlog.get_logger("nanorix-agent.rpc")  # lazy: resolved after log.setup()
# customer ids appear in journal rows, proofs and logs: a safe alphabet, no NUL/newline/path
CUSTOMER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,255}$")


@dataclass(frozen=True)
class F:
    """One parameter: its type check and whether it is required."""

    kind: str  # str | id | cust | sid | int | number | bool | bytes | env | map
    required: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None


def _check(name: str, spec: F, v: Any, api: Api) -> Any:
    k = spec.kind
    if k in ("str", "id", "cust", "sid"):
        if not isinstance(v, str):
            raise BadRequest(f"{name} must be a string", field=name)
        if k == "cust" and not CUSTOMER_ID_RE.match(v):
            raise BadRequest(f"{name} must be 1..256 characters of A-Z a-z 0-9 . _ : @ - "
                             f"starting with a letter or digit", field=name)
        if k == "id" and not 0 < len(v) <= MAX_ID_LEN:
            raise BadRequest(f"{name} must be 1..{MAX_ID_LEN} characters", field=name)
        if k == "sid" and not SESSION_ID_RE.match(v):
            raise BadRequest(f"{name} must be sess_ + 16 lowercase hex", field=name)
        if spec.choices is not None and v not in spec.choices:
            raise BadRequest(f"{name} must be one of {', '.join(spec.choices)}", field=name)
        return v
    if k in ("int", "number"):
        ok = (int, float) if k == "number" else (int,)
        if isinstance(v, bool) or not isinstance(v, ok) or v != v:
            raise BadRequest(f"{name} must be {'a number' if k == 'number' else 'an integer'}",
                             field=name)
        if spec.minimum is not None and v < spec.minimum:
            raise BadRequest(f"{name} must be >= {spec.minimum:g}", field=name)
        if v > 10**9:
            raise BadRequest(f"{name} is out of range", field=name)
        return v
    if k == "bool":
        if not isinstance(v, bool):
            raise BadRequest(f"{name} must be a boolean", field=name)
        return v
    if k == "bytes":
        if isinstance(v, str):
            v = v.encode("utf-8")
        if not isinstance(v, bytes):
            raise BadRequest(f"{name} must be bytes or a string", field=name)
        cap = api.service.config.exec.max_input_bytes
        if len(v) > cap:
            raise BadRequest(f"{name} is larger than {cap} bytes", field=name)
        return v
    if k == "env":
        most = api.service.config.exec.max_env_entries
        if not isinstance(v, dict) or len(v) > most:
            raise BadRequest(f"{name} must be a map of at most {most} strings", field=name)
        for key, val in v.items():
            if (not isinstance(key, str) or not isinstance(val, str) or not key
                    or "=" in key or "\0" in key or "\0" in val):
                raise BadRequest(f"{name} must map names (no '=' or NUL) to strings",
                                 field=name)
            if len(key.encode("utf-8", "surrogatepass")) + 1 + len(
                    val.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
                raise BadRequest(f"{name}: each NAME=value must be at most "
                                 f"{MAX_COMMAND_BYTES} bytes", field=name)
        return dict(v)
    if k == "map":
        if not isinstance(v, dict):
            raise BadRequest(f"{name} must be a map", field=name)
        return v
    raise AssertionError(k)  # pragma: no cover


# The one table from the sandbox layer's domain errors to API errors (STYLE: isolate keeps
# its verdicts apart from its own death): every verdict is the customer's condition, never
# InternalError; only the sandbox failing to do its job is.
SANDBOX_ERRORS: dict[type[SandboxFault], type[ApiError]] = {
    ExecRefused: BadRequest,  # the request can never run here
    InputDoesNotFit: Conflict,  # the customer filled their session
    ExecBusy: Conflict,
    SandboxGone: Conflict,
    ExecFailed: InternalError,  # nrx-init could not start the command
}


def api_error(e: SandboxFault) -> ApiError:
    """The API error for a sandbox-layer error (SANDBOX_ERRORS; an unlisted one is internal)."""
    cls = next((api for dom, api in SANDBOX_ERRORS.items() if isinstance(e, dom)), InternalError)
    return cls(e.message, field=e.field)


Handler = Callable[["Api", dict, CallContext], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    fields: dict[str, F]
    handler: Handler


class Api:
    """Binds the method table to a Service; `dispatch` is what the RpcServer calls."""

    def __init__(self, service: Service, health=None, rpc=None) -> None:
        self.service = service
        self.health = health  # callable -> dict (agent.health); set by the daemon
        self.rpc = rpc  # the listeners' ConnectionGate (connections, accept health)

    async def dispatch(self, method: str, params: dict, ctx: CallContext) -> Any:
        m = METHODS.get(method)
        if m is None:
            raise BadRequest(f"unknown method {method!r}", field="method")
        clean = {}
        for name, value in params.items():
            spec = m.fields.get(name) if isinstance(name, str) else None
            if spec is None:
                raise BadRequest(f"unknown field {name!r} for {method}", field=str(name))
            if value is None and not spec.required:
                continue
            clean[name] = _check(name, spec, value, self)
        for name, spec in m.fields.items():
            if spec.required and name not in clean:
                raise BadRequest(f"{name} is required for {method}", field=name)
        try:
            return await m.handler(self, clean, ctx)
        except SandboxFault as e:
            raise api_error(e) from None


# -- handlers ----------------------------------------------------------------------------

async def _create(api: Api, p: dict, ctx: CallContext) -> dict:
    tier = p["tier"]
    if tier not in api.service.config.tiers:
        raise BadRequest(f"tier must be one of {', '.join(api.service.config.tiers)}",
                         field="tier")
    return await api.service.create(
        customer_id=p["customer_id"], tier=tier,
        data_classification=p.get("data_classification", "general"),
        jurisdiction=p.get("jurisdiction", "US"), ttl_seconds=p.get("ttl_seconds"),
        session_id=p.get("session_id"))


async def _get(api: Api, p: dict, ctx: CallContext) -> dict:
    return api.service.get(p["session_id"], p.get("customer_id"))


async def _list(api: Api, p: dict, ctx: CallContext) -> list:
    return api.service.list(p.get("customer_id"))


async def _exec(api: Api, p: dict, ctx: CallContext) -> dict:
    command = p["command"]
    if not command or len(command.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise BadRequest(f"command must be 1..{MAX_COMMAND_BYTES} bytes", field="command")
    if "\0" in command:
        raise BadRequest("command must not contain NUL", field="command")
    def run(on_output=None):
        return api.service.exec(
            p["session_id"], command, input_data=p.get("input_data"), timeout=p.get("timeout"),
            env=p.get("env"), on_output=on_output, customer_id=p.get("customer_id"))

    if not p.get("stream"):
        return await run()
    limits = ctx.limits or Limits()
    out = _OutputStream(ctx, api.service.config.rpc.chunk_bytes, limits.stream_queue_bytes,
                        limits.stream_stall_seconds)
    failed: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.sender)
        try:
            result = await run(out)
        except Exception as e:  # re-raised bare below, not inside the nursery's group
            failed = e
        finally:
            out.close()  # the sender delivers what is queued, then ends
    if failed is not None:
        raise failed
    result["stream_dropped"] = out.dropped
    return result


class _OutputStream(PacedOutput):
    """Streamed exec output on its way to one client, at most `cap` bytes queued.  The
    exec's reader waits for room before each read (`room`, cancellable, so the exec's
    timeout holds): a client that reads slowly paces its own command through the
    command's full pipe.  A client that takes nothing for `stall` seconds while the queue
    is full loses the rest of its stream (the exec goes on unpaced; its result carries
    the head+tail capture and says `stream_dropped`).  `put` never waits: past the cap
    (only reachable in the drain after the command ended) the stream is dropped too."""

    def __init__(self, ctx: CallContext, chunk: int, cap: int, stall: float) -> None:
        self.ctx, self.chunk, self.cap, self.stall = ctx, chunk, cap, stall
        self.queued = 0
        self.dropped = False
        self._send, self._recv = trio.open_memory_channel(math.inf)  # bounded by bytes
        self._taken = trio.Event()  # set (and replaced) whenever the sender took a chunk

    def _drop(self) -> None:
        self.dropped = True
        _log.warning("exec_stream_dropped", msgid=self.ctx.msgid, queued_bytes=self.queued)

    def _has_room(self) -> bool:
        return self.dropped or self.queued == 0 or self.queued + CHUNK <= self.cap

    async def room(self) -> None:
        with trio.move_on_after(self.stall):
            while not self._has_room():
                await self._taken.wait()
            return
        self._drop()

    async def __call__(self, stream: str, data: bytes) -> None:
        if self.dropped:
            return
        if self.queued + len(data) > self.cap:
            self._drop()
            return
        self.queued += len(data)
        self._send.send_nowait((stream, data))

    def close(self) -> None:
        self._send.close()

    async def sender(self) -> None:
        async with self._recv:
            async for stream, data in self._recv:
                for i in range(0, len(data), self.chunk):
                    await self.ctx.notify("exec.output", {
                        "msgid": self.ctx.msgid, "stream": stream,
                        "data": bytes(data[i:i + self.chunk])})
                self.queued -= len(data)
                self._taken.set()
                self._taken = trio.Event()


async def _destroy(api: Api, p: dict, ctx: CallContext) -> dict:
    return await api.service.destroy(p["session_id"], "requested",
                                     customer_id=p.get("customer_id"))


async def _proof_get(api: Api, p: dict, ctx: CallContext) -> dict:
    """The spooled destroy result as stored: the same map, in the same (canonical) key
    order as the destroy response, so the same bytes (docs/proofs.md).  With
    `customer_id`, a session another customer owns is NotFound."""
    sid = p["session_id"]
    stored = api.service.spool.get(sid)
    if stored is None or not _owns(api, sid, stored, p.get("customer_id")):
        raise NotFound(f"no pending proof for {sid}", field="session_id")
    return stored


def _owns(api: Api, session_id: str, stored: dict, customer_id: str | None) -> bool:
    """Whether `customer_id` (None: any caller) owns the session: the journal's owner,
    else (journal row lost) the customer the signed rendition names (`org_id`)."""
    if customer_id is None:
        return True
    row = api.service.journal.get(session_id)
    if row is not None:
        return row["customer_id"] == customer_id
    ap = stored.get("auditproof")
    return isinstance(ap, dict) and ap.get("org_id") == customer_id


async def _proof_pending(api: Api, p: dict, ctx: CallContext) -> list:
    """One page of unacknowledged CDPs in session-id order (`after` = the last session id
    of the previous page; a page shorter than `limit` is the last).  Read in a worker
    thread so a large spool never stalls the event loop."""
    cap = api.service.config.rpc.pending_page_max
    limit = p.get("limit", min(PENDING_PAGE_DEFAULT, cap))
    if limit > cap:
        raise BadRequest(f"limit must be between 1 and {cap}", field="limit")
    return await trio.to_thread.run_sync(api.service.spool.pending, limit, p.get("after"))


async def _proof_ack(api: Api, p: dict, ctx: CallContext) -> dict:
    acked = api.service.ack_proof(p["session_id"])
    return {"session_id": p["session_id"], "acked": acked}


async def _proof_verify(api: Api, p: dict, ctx: CallContext) -> dict:
    """Verify against this node's own key registry: a proof whose signer is not one of
    this node's attestation keys (live, or retired after its destroyed_at) is invalid."""
    from agent.cdp.trust import LookupTrust
    from agent.cdp.verify import verify

    trust = LookupTrust(api.service.key_store.get, "this node's key registry")
    return await trio.to_thread.run_sync(verify, p["cdp"], trust)


async def _key_get(api: Api, p: dict, ctx: CallContext) -> dict:
    key_id = p["key_id"]
    rec = api.service.key_store.get(key_id)
    if rec is None:
        raise NotFound(f"key {key_id} not found", field="key_id")
    return rec


async def _key_export(api: Api, p: dict, ctx: CallContext) -> dict:
    """Every attestation key of this node, live and retired, as a trust anchor key set."""
    return api.service.key_store.export(api.service.config.node.node_id)


def _health_snapshot(api: Api) -> dict:
    if api.health is not None:
        res = dict(api.health())
    else:
        res = {"status": "unhealthy", "engines": {}, "database": False,
               "uptime_seconds": int(time.monotonic() - api.service.started_at),
               "timestamp": iso_seconds()}
    res["draining"] = api.service.draining
    res["sessions_live"] = api.service.capacity()["sessions_live"]
    if api.rpc is not None:
        rpc = api.rpc.status()
        res["rpc"] = rpc
        if rpc["accept_starved"] and res["status"] == "healthy":
            res["status"] = "degraded"  # out of fds or memory: new clients wait
    return res


async def _health(api: Api, p: dict, ctx: CallContext) -> dict:
    return _health_snapshot(api)


async def _drain(api: Api, p: dict, ctx: CallContext) -> dict:
    """Start or end draining: new creates answer Unavailable, live sessions go on."""
    s = api.service
    if s.draining != p["drain"]:
        s.draining = p["drain"]
        _log.warning("agent_draining" if s.draining else "agent_undrained",
                     sessions_live=s.capacity()["sessions_live"])
    return {"draining": s.draining, "sessions_live": s.capacity()["sessions_live"]}


async def _info(api: Api, p: dict, ctx: CallContext) -> dict:
    s = api.service
    cfg = s.config
    mode = s.engine.cgroups.mode
    cap = dict(s.capacity())
    sessions_free = max(0, cap["sessions_max"] - cap["sessions_live"])
    memory_free = max(0, cap["memory_capacity_bytes"] - cap["memory_committed_bytes"])
    cap["sessions_free"] = sessions_free
    cap["memory_free_bytes"] = memory_free
    live_by_tier: dict[str, int] = {}
    for sess in s.live():
        live_by_tier[sess.record.tier] = live_by_tier.get(sess.record.tier, 0) + 1
    tiers = {}
    for name, t in cfg.tiers.items():
        # how many more sessions of this tier the node would admit now (the per-customer
        # max_concurrent still applies on top)
        free = 0 if s.draining else min(sessions_free, memory_free // t.memory_bytes)
        tiers[name] = {"max_concurrent": t.max_concurrent, "max_ttl_seconds": t.max_ttl_seconds,
                       "default_ttl_seconds": t.default_ttl_seconds,
                       "memory_bytes": t.memory_bytes, "sessions_live": live_by_tier.get(name, 0),
                       "free_slots": free}
    health = _health_snapshot(api)
    return {"version": s.version, "node_id": cfg.node.node_id, "capacity": cap,
            "cgroup_mode": mode, "ttl_policy": cfg.node.ttl_policy, "draining": s.draining,
            "health": health["status"], "tiers": tiers}


_SID = F("sid", required=True)
_CUST = F("cust")

METHODS: dict[str, Method] = {
    "session.create": Method({
        "customer_id": F("cust", required=True), "tier": F("str", required=True),
        "data_classification": F("str", choices=CLASSIFICATIONS),
        "jurisdiction": F("str", choices=JURISDICTIONS),
        "ttl_seconds": F("int", minimum=0), "session_id": F("sid")}, _create),
    "session.get": Method({"session_id": _SID, "customer_id": _CUST}, _get),
    "session.list": Method({"customer_id": _CUST}, _list),
    "session.exec": Method({
        "session_id": _SID, "command": F("str", required=True), "input_data": F("bytes"),
        "timeout": F("number", minimum=0.001), "env": F("env"), "stream": F("bool"),
        "customer_id": _CUST}, _exec),
    "session.destroy": Method({"session_id": _SID, "customer_id": _CUST}, _destroy),
    "proof.get": Method({"session_id": _SID, "customer_id": _CUST}, _proof_get),
    "proof.pending": Method({"limit": F("int", minimum=1), "after": F("sid")}, _proof_pending),
    "proof.ack": Method({"session_id": _SID}, _proof_ack),
    "proof.verify": Method({"cdp": F("map", required=True)}, _proof_verify),
    "key.get": Method({"key_id": F("id", required=True)}, _key_get),
    "key.export": Method({}, _key_export),
    "agent.health": Method({}, _health),
    "agent.info": Method({}, _info),
    "agent.drain": Method({"drain": F("bool", required=True)}, _drain),
}
