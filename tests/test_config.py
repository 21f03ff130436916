"""Config loading and validation (SPEC 11): defaults need no file, errors name the key and
the allowed values, directories can be overridden, and the TTL policy is validated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config

ROOT = Path(__file__).resolve().parent.parent


def _load(tmp_path, text: str) -> config.Config:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return config.load(p)


def test_embedded_default_validates():
    """The embedded default is a complete, valid config (no file needed)."""
    cfg = config.Config().validate()
    assert cfg.node.ttl_policy == "clamp"
    assert cfg.rpc.max_frame_bytes == 16 * 1024 * 1024
    assert cfg.tiers["free"].max_ttl_seconds == 300


def test_dirs_are_overridable(tmp_path):
    """--state-dir and --runtime-dir override the file and the defaults."""
    p = tmp_path / "agent.toml"
    p.write_text('[paths]\nstate_dir = "/nonexistent/state"\n')
    cfg = config.load(p, state_dir=tmp_path / "s", runtime_dir=tmp_path / "r")
    assert cfg.paths.state_dir == tmp_path / "s"
    assert cfg.socket_path == tmp_path / "r" / "agent.sock"


def test_unknown_key_names_key_and_allowed(tmp_path):
    """An unknown key is refused with its full name and the allowed keys."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, "[node]\nmax_sesions = 3\n")
    assert "node.max_sesions" in str(e.value) and "max_sessions" in str(e.value)


def test_unknown_section_is_refused(tmp_path):
    """An unknown section is refused and the allowed sections are listed."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, "[nodes]\nx = 1\n")
    assert "[nodes]" in str(e.value) and "tiers" in str(e.value)


def test_bad_ttl_policy_lists_allowed_values(tmp_path):
    """node.ttl_policy accepts only clamp or refuse and says so."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, '[node]\nttl_policy = "ignore"\n')
    assert "node.ttl_policy" in str(e.value) and "clamp, refuse" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    """A value of the wrong type names its key and the expected type."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, '[tiers.free]\nmemory_bytes = "big"\n')
    assert "tiers.free.memory_bytes" in str(e.value) and "integer" in str(e.value)


def test_tmpfs_must_fit_memory(tmp_path):
    """A tier whose tmpfs is not smaller than its memory cap is refused (tmpfs is charged)."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, "[tiers.free]\nmemory_bytes = 134217728\ntmpfs_bytes = 134217728\n")
    assert "tiers.free.tmpfs_bytes" in str(e.value)


def test_invalid_toml_is_reported(tmp_path):
    """A file that is not TOML is refused with the file named."""
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, "[node\n")
    assert "not valid TOML" in str(e.value)


def test_serve_refuses_bad_config_with_exit_2(tmp_path):
    """`serve` with an invalid config exits 2 and prints the key and allowed values."""
    p = tmp_path / "agent.toml"
    p.write_text('[log]\nlevel = "loud"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--config", str(p),
                        "--state-dir", str(tmp_path / "s"), "--runtime-dir", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, timeout=60)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "log.level" in err and "debug, info, warning, error" in err
    assert not (tmp_path / "r" / "agent.sock").exists()


def test_timeouts_table_is_read_and_each_must_be_positive(tmp_path):
    """[timeouts] values are read from the file, and a value that is not > 0 is refused by name."""
    cfg = _load(tmp_path, "[timeouts]\nstop_seconds = 5.5\ncreate_seconds = 3\n")
    assert (cfg.timeouts.stop_seconds, cfg.timeouts.create_seconds) == (5.5, 3)
    with pytest.raises(config.ConfigError, match="timeouts.debug_read_seconds must be > 0"):
        _load(tmp_path, "[timeouts]\ndebug_read_seconds = 0\n")
