"""Typed configuration with every default in one place (SPEC 2 and 11).

The agent needs no config file: `Config()` is the embedded default.  A TOML file
overrides any key; unknown keys and bad values are refused at start with an error that
names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

CLASSIFICATIONS = ("general", "PHI", "PII", "financial", "credentials")
JURISDICTIONS = ("US", "EU", "UK", "CA", "AU", "IN", "OTHER")
WIPE_PATTERNS = ("random", "ones", "zeros")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_CONFIG_PATH = Path("/etc/nanorix-agent/agent.toml")


ENV_ENTRIES_MAX = 200  # what nrx-init can take besides the agent's base environment


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclass
class Tier:
    """Per-tier limits the node enforces (SPEC 2). 0 means unlimited where noted."""

    max_concurrent: int = 3  # per customer on this node; 0 = unlimited
    max_ttl_seconds: int = 300  # 0 = unlimited
    default_ttl_seconds: int = 300
    memory_bytes: int = 256 * MiB
    tmpfs_bytes: int = 0  # 0 = half of memory_bytes (tmpfs pages are charged to the session)
    tmpfs_inodes: int = 16384
    pids_max: int = 128
    cpu_percent: int = 100  # CPU quota in percent of one core


def _default_tiers() -> dict[str, Tier]:
    return {
        "free": Tier(3, 300, 300, 256 * MiB),
        "starter": Tier(20, 600, 600, 1 * GiB),
        "business": Tier(100, 1800, 1800, 4 * GiB, pids_max=512, cpu_percent=200),
        "enterprise": Tier(0, 0, 3600, 4 * GiB, pids_max=1024, cpu_percent=200),
    }


@dataclass
class DataClass:
    """What a data classification selects: seccomp profile and wipe passes (SPEC 2, 5)."""

    seccomp_profile: str = "default"
    wipe_passes: list[str] = field(default_factory=lambda: ["zeros"])


def _default_classes() -> dict[str, DataClass]:
    strict = ["random", "ones", "zeros"]
    return {
        "general": DataClass("default", ["zeros"]),
        "PHI": DataClass("strict", list(strict)),
        "PII": DataClass("strict", list(strict)),
        "financial": DataClass("strict", list(strict)),
        "credentials": DataClass("strict", list(strict)),
    }


@dataclass
class NodeConfig:
    node_id: str = field(default_factory=socket.gethostname)
    max_sessions: int = 1000
    memory_capacity_bytes: int = 0  # 0 = 80% of MemTotal at start
    ttl_policy: str = "clamp"  # "clamp" a ttl above the tier max to the max, or "refuse" it
    journal_retention_seconds: int = 30 * 86400  # ended sessions' metadata kept this long


@dataclass
class PathsConfig:
    state_dir: Path = Path("/var/lib/nanorix-agent")
    runtime_dir: Path = Path("/run/nanorix-agent")
    # host-wide: one lock file per cgroup prefix, so a second agent on the same prefix or an
    # overlapping sandbox uid range refuses to start (agent/ops/instance_lock.py)
    lock_dir: Path = Path("/run/lock/nanorix-agent")


@dataclass
class RpcConfig:
    socket: Path | None = None  # default: <runtime_dir>/agent.sock
    socket_mode: int = 0o660
    socket_group: str = "nanorix"  # used when the group exists; else the socket keeps root's group
    allowed_uids: list[int] = field(default_factory=lambda: [0])
    allowed_gids: list[int] = field(default_factory=list)  # plus the socket group's gid
    max_frame_bytes: int = 16 * MiB
    chunk_bytes: int = 64 * 1024
    # limits shared by the unix socket and the [remote] TLS listener (issue 15, 17)
    max_connections: int = 512  # open RPC connections at once, both listeners together;
    #   the daemon lowers it at start to leave fd headroom (see docs/remote.md "Limits")
    fd_reserve: int = 256  # fds kept free for sessions, destruction, journal and spool
    fd_reserve_per_session: int = 8  # plus this many per node.max_sessions
    idle_timeout_seconds: float = 300.0  # a connection with no request in flight and no
    #   byte received for this long is closed
    max_inflight_requests: int = 256  # per connection; the server stops reading beyond it
    max_inflight_bytes: int = 64 * MiB  # per connection: every request from when it is read
    #   until its answer is sent (its frame or answer, at least 64 KiB); the server stops
    #   reading beyond it
    send_timeout_seconds: float = 30.0  # a frame the peer does not read within this is its
    #   connection's end (a never-reading client cannot hold anything else)
    stream_queue_bytes: int = 4 * MiB  # streamed exec output waiting for a slow client;
    #   while it is full the command waits (its pipe fills), so a slow reader paces only
    #   its own command; the exec's timeout still holds
    stream_stall_seconds: float = 5.0  # a client that takes no output for this long while
    #   its stream queue is full loses the rest of the stream (the exec goes on unpaced;
    #   its result says `stream_dropped`)
    pending_page_max: int = 1000  # proof.pending `limit` upper bound (default page 100)
    max_array_len: int = 65536  # msgpack decode limits (frames are checked while decoding)
    max_map_len: int = 4096
    max_containers: int = 100_000  # arrays + maps in one message, counted while decoding


@dataclass
class RemoteConfig:
    """The optional TCP listener with mutual TLS for remote control planes (docs/remote.md).

    Off while `listen` is "".  TLS 1.3 only; every client must present a certificate that
    chains to `client_ca`, is in its validity period and, when `allowed_clients` is not
    empty, names one of them as its subject CN or a DNS/URI SAN.  `key` is a PEM file, or
    `key_credential` names a systemd credential ($CREDENTIALS_DIRECTORY/<name>) holding it.
    SIGHUP reloads cert, key and client_ca for new connections; live ones keep theirs."""

    listen: str = ""  # HOST:PORT ("[::1]:7443" for IPv6; port 0 = any free one); "" = off
    cert: Path | None = None
    key: Path | None = None
    key_credential: str = ""  # systemd credential name; used instead of `key` when set
    client_ca: Path | None = None
    allowed_clients: list[str] = field(default_factory=list)  # empty = any cert of client_ca
    keepalive_idle_seconds: int = 60  # TCP keepalive: first probe after this much silence
    keepalive_interval_seconds: int = 10
    keepalive_probes: int = 5
    handshake_timeout_seconds: float = 10.0


@dataclass
class DebugConfig:
    socket: Path | None = None  # default: <runtime_dir>/debug.sock
    max_line_bytes: int = 4096  # one command line; a longer one is answered "line too long"


@dataclass
class SandboxConfig:
    uid_base: int = 200000
    uid_slot_size: int = 65536  # each live session owns [base + slot*size, +size)
    image_dir: Path | None = None  # None: bind the host's /usr and merged-usr links
    ro_binds: list[str] = field(default_factory=lambda: ["/usr"])
    usr_links: list[str] = field(default_factory=lambda: ["bin", "lib", "lib64", "sbin"])
    hostname_prefix: str = "nrx-"
    cgroup_prefix: str = "nanorix-agent"
    sandbox_oom_score_adj: int = 500
    rlimit_nofile: int = 1024
    rlimit_fsize_bytes: int = 0  # 0: the tier's tmpfs size
    # OOM (issue 12): the agent, not the kernel, ends a session at its memory cap, so its
    # memory is wiped before it is freed.  `oom_guard`: keep the kernel OOM killer away
    # (v1 memory.oom_control, v2 memory.high = cap with memory.max = cap + headroom);
    # `oom_headroom_bytes`: what a stalled session may get above its cap so its tasks
    # reach the freezer (v1), or the v2 margin; `oom_fallback_seconds`: a session stalled
    # at its cap whose destruction has not begun by then goes to the kernel killer
    # (reported in step 3's evidence).
    oom_guard: bool = True
    oom_headroom_bytes: int = 8 * MiB
    oom_fallback_seconds: float = 10.0
    # Sessions outlive the agent (issue 12): nrx-init keeps its sandbox this long after
    # the agent's end of the lifeline closes, waiting for a restarted agent to re-adopt it;
    # 0 = end the sandbox at once (the old behaviour).
    orphan_grace_seconds: float = 60.0
    # Under systemd the sandboxes live in a scope of their own,
    # nanorix-sandboxes-<cgroup_prefix>.scope (Delegate=yes, in the agent's slice), so a
    # crashed or killed agent does not take them with its unit (KillMode=control-group) and
    # the restarted agent re-adopts them (docs/operations.md).  "auto": use it when systemd
    # runs the agent as a service; "off": the sandboxes sit in the agent's unit cgroup and
    # end with it (recovered, `agent_recovery`).  Restart-only.
    systemd_scope: str = "auto"


@dataclass
class ExecConfig:
    max_input_bytes: int = 8 * MiB
    # environment variables one exec may set (the RPC layer refuses more with BadRequest);
    # at most ENV_ENTRIES_MAX: nrx-init takes 255 entries and the agent adds its base env
    max_env_entries: int = 200
    output_cap_bytes: int = 1 * MiB  # per stream
    kill_grace_seconds: float = 2.0


@dataclass
class KeysConfig:
    rotate_interval_seconds: int = 24 * 3600
    credential_name: str = "nanorix-attestation-key"  # looked up in $CREDENTIALS_DIRECTORY


@dataclass
class AuditProofConfig:
    """Values the AuditProof 2.1 rendition needs that the agent must not invent (SPEC 14)."""

    authority_id: str = ""  # default: "nrx-node:" + node_id
    region: str = ""  # "" = omit the region from the capsule_started event


@dataclass
class SpoolConfig:
    """The CDP spool's fault handling (docs/operations.md "State faults")."""

    reserve_bytes: int = 64 * 1024  # preallocated per session at create for its proof (~21 KiB)
    fallback_dir: Path | None = None  # proofs the spool cannot take; default <runtime_dir>/spool-fallback


@dataclass
class HealthConfig:
    interval_seconds: int = 60
    recheck_seconds: float = 1.0  # an engine that failed is re-tested this often until it passes


@dataclass
class LogConfig:
    level: str = "info"


@dataclass
class MetricsConfig:
    """Prometheus exposition over HTTP (GET /metrics), off by default; the debug socket's
    `metrics` command serves the same text either way."""

    listen: str = ""  # "HOST:PORT", e.g. "127.0.0.1:9464" (port 0: any free port, logged); "" = off
    max_connections: int = 8  # concurrent scrapes; more wait in the listen backlog
    max_request_head_bytes: int = 8192  # a longer request head is answered 400


@dataclass
class TimeoutsConfig:
    """[timeouts]: how long the agent waits for its own work, in seconds (each > 0).  One
    table instead of module constants (issue 11); the values are the former constants.
    Read when used, but a change still needs a restart (agent/ops/reload.py LIVE)."""

    create_seconds: float = 10.0  # a new sandbox's nrx-init must report READY within this
    attach_seconds: float = 5.0  # re-attaching to a surviving nrx-init at a restart
    stop_seconds: float = 60.0  # the drain at SIGTERM; then every sandbox is killed outright
    close_out_seconds: float = 15.0  # an interrupted exec: freeze + reading what it produced
    health_canary_seconds: float = 30.0  # one self-test (eee runs a canary session)
    debug_read_seconds: float = 10.0  # a debug-socket command line must arrive within this
    debug_destroy_seconds: float = 120.0  # `destroy ID` on the debug socket
    metrics_request_seconds: float = 5.0  # one GET /metrics request head, then the answer
    status_interval_seconds: float = 5.0  # READY=1 retries / STATUS= refreshes (systemd)
    systemd_extend_every_seconds: float = 10.0  # recovery: EXTEND_TIMEOUT_USEC this often
    systemd_extend_by_seconds: float = 60.0  # ... asking for this much more start time
    systemd_scope_seconds: float = 30.0  # systemd-run: the sandbox scope must exist within this


@dataclass
class PoolConfig:
    """[pool]: the warm pool (issue 18, docs/operations.md "Warm pool").  Ready sandboxes
    made off the request path — namespaces, cgroups with the tier's limits, tmpfs, uid slot,
    seccomp, nrx-init serving — that `session.create` binds to a new session (hostname,
    session key, journal row, TTL) instead of building one.  Members count against node
    capacity (sessions and committed memory); one that ages out, or is left at drain or
    stop, is destroyed by the destruction pipeline (logged and counted; no CDP: it never
    belonged to a customer)."""

    # ready sandboxes kept per tier, for each seccomp profile in `profiles`; a tier not
    # listed (or 0) has no pool: its creates take the normal path.  {} = pool off.
    sizes: dict[str, int] = field(default_factory=lambda: {"free": 2})
    profiles: list[str] = field(default_factory=lambda: ["default"])  # seccomp profiles pooled
    max_age_seconds: float = 3600.0  # a member older than this is destroyed and replaced
    refill_concurrency: int = 1  # pool sandboxes made at once (off the request path)
    refill_backoff_seconds: float = 1.0  # after a failed refill; doubles up to 60 s


@dataclass
class DestroyConfig:
    """[destroy]: where the destruction pipeline runs (issue 18).

    `workers` = N > 0 runs the kernel work of each destruction (steps 1-3 and 5-8: freeze,
    wipe, kill, release, the host-wide scans, the chain) in a bounded pool of N worker
    processes (agent/destroy/workers.py), so destructions use more than the daemon's one
    core; the session key (step 4) and the signing of the proof never leave the daemon.  A
    worker that dies is restarted; a destruction it had in flight is run again in the
    daemon and its proof says so (step 8 `pipeline_attempts`).  0 = every destruction runs
    in the daemon process, as before.  Default 0: on the 2-core machine it was built on
    the pool halved the daemon's CPU per lifecycle but not the total, so throughput did
    not rise (bench/README.md "Destroy workers"); set it to the cores a larger node can
    give destruction.  A change needs a restart.
    `max_jobs_per_worker` bounds the destructions one worker runs at once (more wait for a
    free slot; with every worker full or dead they run in the daemon)."""

    workers: int = 0
    max_jobs_per_worker: int = 32


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    auditproof: AuditProofConfig = field(default_factory=AuditProofConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    destroy: DestroyConfig = field(default_factory=DestroyConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    tiers: dict[str, Tier] = field(default_factory=_default_tiers)
    classes: dict[str, DataClass] = field(default_factory=_default_classes)

    # -- derived paths -------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.rpc.socket or self.paths.runtime_dir / "agent.sock"

    @property
    def debug_socket_path(self) -> Path:
        return self.debug.socket or self.paths.runtime_dir / "debug.sock"

    @property
    def spool_fallback_dir(self) -> Path:
        return self.spool.fallback_dir or self.paths.runtime_dir / "spool-fallback"

    @property
    def authority_id(self) -> str:
        return self.auditproof.authority_id or f"nrx-node:{self.node.node_id}"

    def tmpfs_bytes(self, tier: str) -> int:
        t = self.tiers[tier]
        return t.tmpfs_bytes or t.memory_bytes // 2

    def validate(self) -> Config:
        _validate(self)
        return self


# ---------------------------------------------------------------------------------
# loading


def load(path: Path | None = None, *, state_dir: Path | None = None,
         runtime_dir: Path | None = None) -> Config:
    """Load and validate config.  `path=None` uses the default file if it exists."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    elif DEFAULT_CONFIG_PATH.exists():
        return load(DEFAULT_CONFIG_PATH, state_dir=state_dir, runtime_dir=runtime_dir)
    cfg = from_dict(raw)
    if state_dir is not None:
        cfg.paths.state_dir = Path(state_dir)
    if runtime_dir is not None:
        cfg.paths.runtime_dir = Path(runtime_dir)
    return cfg.validate()


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in raw.items():
        if key == "tiers":
            cfg.tiers = _merge_map(value, cfg.tiers, Tier, "tiers")
        elif key == "classes":
            cfg.classes = _merge_map(value, cfg.classes, DataClass, "classes")
        elif key in {f.name for f in dataclasses.fields(Config)}:
            setattr(cfg, key, _build(getattr(cfg, key), value, key))
        else:
            raise ConfigError(f"unknown config section [{key}]; allowed: {_names(Config)}")
    return cfg


def _names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _merge_map(value, defaults, cls, section):
    if not isinstance(value, dict):
        raise ConfigError(f"[{section}] must be a table of tables")
    out = dict(defaults)
    for name, sub in value.items():
        out[name] = _build(defaults.get(name, cls()), sub, f"{section}.{name}")
    return out


def _build(default, value, where: str):
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}] must be a table")
    cls = type(default)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in value.items():
        if k not in fields:
            raise ConfigError(f"unknown key {where}.{k}; allowed: {_names(cls)}")
        kwargs[k] = _coerce(getattr(default, k), v, f"{where}.{k}")
    return dataclasses.replace(default, **kwargs)


def _coerce(default, v, key: str):
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, got {v!r}")
        return v
    if isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        return v
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        return float(v)
    if isinstance(default, Path) or (default is None and key.endswith(
            ("socket", "_dir", ".cert", ".key", ".client_ca"))):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{key} must be a non-empty path string, got {v!r}")
        return Path(v)
    if isinstance(default, str):
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return v
    if isinstance(default, list):
        if not isinstance(v, list):
            raise ConfigError(f"{key} must be a list, got {v!r}")
        return list(v)
    if isinstance(default, dict):  # {name = integer} tables (pool.sizes)
        if not isinstance(v, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in v.values()):
            raise ConfigError(f"{key} must be a table of integers, got {v!r}")
        return dict(v)
    raise ConfigError(f"{key}: unsupported value {v!r}")


def _listen_ok(listen: str) -> bool:
    try:
        parse_listen(listen)
    except ValueError:
        return False
    return True


def _validate(cfg: Config) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.node.max_sessions >= 1, "node.max_sessions must be >= 1")
    need(0 <= cfg.destroy.workers <= 256, "destroy.workers must be between 0 and 256")
    need(1 <= cfg.destroy.max_jobs_per_worker <= 4096,
         "destroy.max_jobs_per_worker must be between 1 and 4096")
    for key, seconds in dataclasses.asdict(cfg.timeouts).items():
        need(seconds > 0, f"timeouts.{key} must be > 0")
    need(cfg.node.journal_retention_seconds >= 60,
         "node.journal_retention_seconds must be >= 60")
    need(cfg.node.ttl_policy in ("clamp", "refuse"),
         f"node.ttl_policy must be one of clamp, refuse; got {cfg.node.ttl_policy!r}")
    need(cfg.log.level in LOG_LEVELS,
         f"log.level must be one of {', '.join(LOG_LEVELS)}; got {cfg.log.level!r}")
    need(0 <= cfg.rpc.socket_mode <= 0o777, "rpc.socket_mode must be a permission mode (0..0o777)")
    need(1024 <= cfg.rpc.max_frame_bytes <= 1024 * MiB,
         "rpc.max_frame_bytes must be between 1024 and 1 GiB")
    need(1024 <= cfg.rpc.chunk_bytes <= 64 * 1024, "rpc.chunk_bytes must be between 1024 and 65536")
    r = cfg.rpc
    need(r.max_connections >= 1, "rpc.max_connections must be >= 1")
    need(r.fd_reserve >= 16 and r.fd_reserve_per_session >= 0,
         "rpc.fd_reserve must be >= 16 and rpc.fd_reserve_per_session >= 0")
    need(r.idle_timeout_seconds > 0, "rpc.idle_timeout_seconds must be > 0")
    need(r.max_inflight_requests >= 1, "rpc.max_inflight_requests must be >= 1")
    need(r.max_inflight_bytes >= r.max_frame_bytes,
         "rpc.max_inflight_bytes must be >= rpc.max_frame_bytes")
    need(r.send_timeout_seconds > 0, "rpc.send_timeout_seconds must be > 0")
    need(r.stream_queue_bytes >= r.chunk_bytes, "rpc.stream_queue_bytes must be >= rpc.chunk_bytes")
    need(r.stream_stall_seconds > 0, "rpc.stream_stall_seconds must be > 0")
    need(1 <= r.pending_page_max <= 100000, "rpc.pending_page_max must be between 1 and 100000")
    need(r.max_array_len >= 16 and r.max_map_len >= 16 and r.max_containers >= 16,
         "rpc.max_array_len, rpc.max_map_len and rpc.max_containers must be >= 16")
    _validate_remote(cfg.remote, need)
    need(cfg.sandbox.uid_base >= 65536, "sandbox.uid_base must be >= 65536 (above host users)")
    need(cfg.sandbox.uid_slot_size >= 1001,
         "sandbox.uid_slot_size must be >= 1001 (uid 1000 inside must map)")
    need(cfg.sandbox.uid_base + cfg.sandbox.uid_slot_size * cfg.node.max_sessions < 2**32 - 1,
         "sandbox.uid_base + uid_slot_size * node.max_sessions must stay below 2^32-1")
    need(-1000 <= cfg.sandbox.sandbox_oom_score_adj <= 1000,
         "sandbox.sandbox_oom_score_adj must be between -1000 and 1000")
    need(0 <= cfg.sandbox.oom_headroom_bytes <= 1024 * MiB,
         "sandbox.oom_headroom_bytes must be between 0 and 1 GiB")
    need(cfg.sandbox.oom_fallback_seconds > 0, "sandbox.oom_fallback_seconds must be > 0")
    need(0 <= cfg.sandbox.orphan_grace_seconds <= 24 * 3600,
         "sandbox.orphan_grace_seconds must be between 0 and 86400")
    need(cfg.sandbox.systemd_scope in ("auto", "off"),
         'sandbox.systemd_scope must be "auto" or "off"')
    need(cfg.exec.max_input_bytes >= 0, "exec.max_input_bytes must be >= 0")
    need(0 <= cfg.exec.max_env_entries <= ENV_ENTRIES_MAX,
         f"exec.max_env_entries must be 0..{ENV_ENTRIES_MAX}")
    need(cfg.exec.output_cap_bytes >= 1024, "exec.output_cap_bytes must be >= 1024")
    need(cfg.exec.kill_grace_seconds > 0, "exec.kill_grace_seconds must be > 0")
    need(cfg.keys.rotate_interval_seconds >= 60, "keys.rotate_interval_seconds must be >= 60")
    need(cfg.health.interval_seconds >= 1, "health.interval_seconds must be >= 1")
    need(cfg.health.recheck_seconds > 0, "health.recheck_seconds must be > 0")
    need(cfg.debug.max_line_bytes >= 64, "debug.max_line_bytes must be >= 64")
    need(cfg.metrics.max_request_head_bytes >= 1024,
         "metrics.max_request_head_bytes must be >= 1024")
    if cfg.metrics.listen:
        need(_listen_ok(cfg.metrics.listen),
             f"metrics.listen must be HOST:PORT (e.g. 127.0.0.1:9464), got {cfg.metrics.listen!r}")
    need(1 <= cfg.metrics.max_connections <= 256, "metrics.max_connections must be 1..256")
    need(4096 <= cfg.spool.reserve_bytes <= 64 * MiB,
         "spool.reserve_bytes must be between 4096 and 64 MiB")
    _validate_pool(cfg, need)
    need(bool(cfg.tiers), "at least one tier must be configured")
    for name, t in cfg.tiers.items():
        for k in ("max_concurrent", "max_ttl_seconds", "tmpfs_bytes"):
            need(getattr(t, k) >= 0, f"tiers.{name}.{k} must be >= 0")
        need(t.default_ttl_seconds >= 1, f"tiers.{name}.default_ttl_seconds must be >= 1")
        need(t.memory_bytes >= 16 * MiB, f"tiers.{name}.memory_bytes must be >= 16 MiB")
        need(t.tmpfs_bytes < t.memory_bytes,
             f"tiers.{name}.tmpfs_bytes must be smaller than memory_bytes (tmpfs is charged to it)")
        need(t.tmpfs_inodes >= 64, f"tiers.{name}.tmpfs_inodes must be >= 64")
        need(t.pids_max >= 8, f"tiers.{name}.pids_max must be >= 8")
        need(1 <= t.cpu_percent <= 100 * (os.cpu_count() or 1) * 4,
             f"tiers.{name}.cpu_percent must be between 1 and {100 * (os.cpu_count() or 1) * 4}")
    for name in CLASSIFICATIONS:
        need(name in cfg.classes, f"classes.{name} must be configured (allowed classes: "
             f"{', '.join(CLASSIFICATIONS)})")
    for name, c in cfg.classes.items():
        need(name in CLASSIFICATIONS,
             f"unknown classification classes.{name}; allowed: {', '.join(CLASSIFICATIONS)}")
        need(bool(c.wipe_passes) and all(p in WIPE_PATTERNS for p in c.wipe_passes),
             f"classes.{name}.wipe_passes must be a non-empty list of {', '.join(WIPE_PATTERNS)}")
        need(c.wipe_passes[-1] == "zeros",
             f"classes.{name}.wipe_passes must end with zeros (the read-back is checked against zero)")


def _validate_pool(cfg: Config, need) -> None:
    p = cfg.pool
    for tier, n in p.sizes.items():
        need(tier in cfg.tiers, f"pool.sizes.{tier}: unknown tier; allowed: "
             f"{', '.join(cfg.tiers)}")
        need(0 <= n <= cfg.node.max_sessions,
             f"pool.sizes.{tier} must be between 0 and node.max_sessions")
    profiles = {c.seccomp_profile for c in cfg.classes.values()}
    for prof in p.profiles:
        need(prof in profiles, f"pool.profiles: {prof!r} is the profile of no data class; "
             f"allowed: {', '.join(sorted(profiles))}")
    need(p.max_age_seconds > 0, "pool.max_age_seconds must be > 0")
    need(1 <= p.refill_concurrency <= 16, "pool.refill_concurrency must be 1..16")
    need(p.refill_backoff_seconds > 0, "pool.refill_backoff_seconds must be > 0")


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); ValueError when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(listen)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(listen)
        host = host[1:-1]
    return host, int(port)


def _validate_remote(rm: RemoteConfig, need) -> None:
    if not rm.listen:
        return
    try:
        parse_listen(rm.listen)
    except ValueError:
        need(False, f"remote.listen must be HOST:PORT (\"[::1]:7443\" for IPv6); got {rm.listen!r}")
    need(rm.cert is not None, "remote.cert is required when remote.listen is set")
    need(rm.key is not None or bool(rm.key_credential),
         "remote.key or remote.key_credential is required when remote.listen is set")
    need(rm.client_ca is not None,
         "remote.client_ca is required when remote.listen is set (client certificates are "
         "mandatory)")
    need(all(isinstance(c, str) and c for c in rm.allowed_clients),
         "remote.allowed_clients must be a list of non-empty names")
    need(rm.keepalive_idle_seconds >= 1 and rm.keepalive_interval_seconds >= 1
         and rm.keepalive_probes >= 1, "remote.keepalive_* must be >= 1")
    need(rm.handshake_timeout_seconds > 0, "remote.handshake_timeout_seconds must be > 0")
