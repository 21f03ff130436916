"""Fixtures for tests that need real sandboxes (import them into a test module):

    import test_sandbox_fixtures as fx
    sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox

`sandbox_cfg` has temporary state/runtime dirs and a small `tiny` tier (64 MiB memory,
16 MiB tmpfs, 32 pids); `engine` uses a unique cgroup prefix
(`nanorix-agent-test-<random>`), so tests never touch the real agent's tree; `sandbox`
is a live `tiny` sandbox, torn down after the test.
"""

from __future__ import annotations

import secrets

import pytest
from suite import cgroup_prefix, uid_base

from agent.config import Config, MiB, Tier
from agent.sandbox import SandboxEngine


def make_cfg(state, runtime) -> Config:
    cfg = Config()
    cfg.paths.state_dir, cfg.paths.runtime_dir = state, runtime
    cfg.sandbox.cgroup_prefix = cgroup_prefix()
    cfg.sandbox.uid_base = uid_base()
    cfg.tiers["tiny"] = Tier(memory_bytes=64 * MiB, tmpfs_bytes=16 * MiB, tmpfs_inodes=1024,
                             pids_max=32, cpu_percent=100)
    cfg.exec.kill_grace_seconds = 0.3
    return cfg.validate()


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(8)


@pytest.fixture
def sandbox_cfg(agent_dirs) -> Config:
    """A validated Config with temporary dirs, a unique cgroup prefix and a `tiny` tier."""
    return make_cfg(*agent_dirs)


@pytest.fixture
async def engine(sandbox_cfg):
    """A SandboxEngine whose sandboxes and cgroup tree are gone after the test."""
    eng = SandboxEngine(sandbox_cfg)
    try:
        yield eng
    finally:
        await eng.aclose()


@pytest.fixture
async def sandbox(engine):
    """A live sandbox of the `tiny` tier."""
    sb = await engine.create(new_session_id(), tier="tiny", classification="general")
    try:
        yield sb
    finally:
        await sb.teardown()


async def test_fixture_sandbox_smoke(sandbox):
    """A command in the fixture sandbox runs as uid 1000 in /work."""
    r = await sandbox.exec("id -u; pwd", timeout=10)
    assert r.stdout == b"1000\n/work\n" and r.exit_code == 0
