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


@dataclass
class DebugConfig:
    socket: Path | None = None  # default: <runtime_dir>/debug.sock


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


@dataclass
class ExecConfig:
    max_input_bytes: int = 8 * MiB
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
class HealthConfig:
    interval_seconds: int = 60


@dataclass
class LogConfig:
    level: str = "info"


@dataclass
class MetricsConfig:
    """Prometheus exposition over HTTP (GET /metrics), off by default; the debug socket's
    `metrics` command serves the same text either way."""

    listen: str = ""  # "HOST:PORT", e.g. "127.0.0.1:9464" (port 0: any free port, logged); "" = off
    max_connections: int = 8  # concurrent scrapes; more wait in the listen backlog


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    auditproof: AuditProofConfig = field(default_factory=AuditProofConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
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
    if isinstance(default, Path) or (default is None and key.endswith(("socket", "_dir"))):
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
    raise ConfigError(f"{key}: unsupported value {v!r}")


def parse_listen(value: str) -> tuple[str, int] | None:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); None when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _validate(cfg: Config) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.node.max_sessions >= 1, "node.max_sessions must be >= 1")
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
    need(cfg.sandbox.uid_base >= 65536, "sandbox.uid_base must be >= 65536 (above host users)")
    need(cfg.sandbox.uid_slot_size >= 1001,
         "sandbox.uid_slot_size must be >= 1001 (uid 1000 inside must map)")
    need(cfg.sandbox.uid_base + cfg.sandbox.uid_slot_size * cfg.node.max_sessions < 2**32 - 1,
         "sandbox.uid_base + uid_slot_size * node.max_sessions must stay below 2^32-1")
    need(-1000 <= cfg.sandbox.sandbox_oom_score_adj <= 1000,
         "sandbox.sandbox_oom_score_adj must be between -1000 and 1000")
    need(cfg.exec.max_input_bytes >= 0, "exec.max_input_bytes must be >= 0")
    need(cfg.exec.output_cap_bytes >= 1024, "exec.output_cap_bytes must be >= 1024")
    need(cfg.exec.kill_grace_seconds > 0, "exec.kill_grace_seconds must be > 0")
    need(cfg.keys.rotate_interval_seconds >= 60, "keys.rotate_interval_seconds must be >= 60")
    need(cfg.health.interval_seconds >= 1, "health.interval_seconds must be >= 1")
    if cfg.metrics.listen:
        need(parse_listen(cfg.metrics.listen) is not None,
             f"metrics.listen must be HOST:PORT (e.g. 127.0.0.1:9464), got {cfg.metrics.listen!r}")
    need(1 <= cfg.metrics.max_connections <= 256, "metrics.max_connections must be 1..256")
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
