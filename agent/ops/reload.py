"""SIGHUP: re-read the config file and apply what can change while sessions run.

The new file is loaded and validated like at start; then it is compared key by key with the
running config.  Keys in `LIVE` are copied into the running `Config` object (every part of
the agent reads them from there when it uses them); a change to any other key (paths, socket,
sandbox uid range, cgroup prefix, classes, a tier's memory, …) rejects the whole reload with
the names of those keys, because applying it would break live sessions or the locks.  An
invalid file is rejected too.  Either way the old config stays in force and the result is
logged (`config_reloaded` at info, `config_reload_rejected` at error).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from agent import config as config_mod
from agent import log

# dotted keys (fnmatch patterns) that take effect without a restart
LIVE = (
    "log.level",
    "node.ttl_policy",
    "node.journal_retention_seconds",
    "health.interval_seconds",
    "exec.max_input_bytes", "exec.output_cap_bytes", "exec.kill_grace_seconds",
    "exec.max_env_entries",
    "tiers.*.max_concurrent", "tiers.*.max_ttl_seconds", "tiers.*.default_ttl_seconds",
)


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def diff(old: config_mod.Config, new: config_mod.Config) -> tuple[list[str], list[str]]:
    """(changed keys that can apply live, changed keys that need a restart)."""
    a, b = _flatten(old), _flatten(new)
    live: list[str] = []
    restart: list[str] = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, _MISSING) == b.get(key, _MISSING):
            continue
        new_tier = key.startswith("tiers.") and key.split(".")[1] not in old.tiers
        (live if new_tier or any(fnmatch.fnmatchcase(key, p) for p in LIVE)
         else restart).append(key)
    return live, restart


_MISSING = object()


def apply(cfg: config_mod.Config, new: config_mod.Config, keys: list[str]) -> None:
    """Copy the `keys` (from `diff`) from `new` into the running `cfg`, in place."""
    for key in keys:
        parts = key.split(".")
        if parts[0] == "tiers":
            name = parts[1]
            if name not in cfg.tiers:
                cfg.tiers[name] = new.tiers[name]
                continue
            setattr(cfg.tiers[name], parts[2], getattr(new.tiers[name], parts[2]))
            continue
        section, field = parts
        setattr(getattr(cfg, section), field, getattr(getattr(new, section), field))
    if "log.level" in keys:
        log.set_level(cfg.log.level)


def reload(cfg: config_mod.Config, path: Path | None, *, state_dir: Path | None = None,
           runtime_dir: Path | None = None) -> dict:
    """Reload from `path` (None: the default file, as at start).  Never raises; returns
    {"ok": bool, "applied": [...], "error": str|None}."""
    lg = log.get().bind(component="reload")
    try:
        new = config_mod.load(path, state_dir=state_dir, runtime_dir=runtime_dir)
    except config_mod.ConfigError as e:
        lg.error("config_reload_rejected", error=str(e), kept="old config")
        return {"ok": False, "applied": [], "error": str(e)}
    live, restart = diff(cfg, new)
    if restart:
        msg = f"these keys need a restart: {', '.join(restart)}"
        lg.error("config_reload_rejected", error=msg, kept="old config")
        return {"ok": False, "applied": [], "error": msg}
    lg.info("config_reloaded", applied=live)  # before a new log level may hide it
    apply(cfg, new, live)
    return {"ok": True, "applied": live, "error": None}
