"""Services on temporary state dirs: `bare_service`, a real journal and spool but no
sandbox engine or key store (for tests of the session rules that need neither), and
`real_service`, the whole Service with a real engine, running (its nursery started)."""

from __future__ import annotations

import contextlib

import trio
from suite import cgroup_prefix, uid_base

from agent import config as config_mod
from agent.keys.attestation import AttestationKeyStore
from agent.sandbox.engine import SandboxEngine
from agent.service.journal import Journal
from agent.service.sessions import Service
from agent.service.spool import Spool


@contextlib.contextmanager
def bare_service(tmp_path, tweak=None):
    """Yield a Service on `tmp_path`/state; `tweak(cfg)` may adjust the config first."""
    cfg = config_mod.load(None, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    if tweak is not None:
        tweak(cfg)
    (tmp_path / "state").mkdir(exist_ok=True)
    journal = Journal(tmp_path / "state")
    try:
        yield Service(cfg, engine=None, key_store=None, journal=journal,
                      spool=Spool(tmp_path / "state"), version="test")
    finally:
        journal.close()


@contextlib.asynccontextmanager
async def real_service(state, runtime, name: str, tweak=None):
    """Yield a running Service with a real sandbox engine (cgroup prefix from `name`, this
    suite's uid range, no warm pool unless `tweak(cfg)` sets one); closed afterwards."""
    cfg = config_mod.load(None, state_dir=state, runtime_dir=runtime)
    cfg.sandbox.cgroup_prefix = cgroup_prefix(name)
    cfg.sandbox.uid_base = uid_base()
    cfg.pool.sizes = {}
    if tweak is not None:
        tweak(cfg)
    eng = SandboxEngine(cfg, cgroup_prefix=cfg.sandbox.cgroup_prefix)
    journal = Journal(state)
    svc = Service(cfg, engine=eng, key_store=AttestationKeyStore(state), journal=journal,
                  spool=Spool(state), version="test")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            yield svc
            nursery.cancel_scope.cancel()
    finally:
        await eng.aclose()
        journal.close()
