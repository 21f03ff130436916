"""A Service with a real journal and spool in a temporary state dir but no sandbox engine
or key store: for tests of the session rules that need neither."""

from __future__ import annotations

import contextlib

from agent import config as config_mod
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
