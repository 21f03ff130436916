"""The warm pool (issue 18): ready sandboxes made off the request path and bound to a
session at `session.create` — real daemon, real sandboxes, real destruction pipeline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import test_sandbox_fixtures as fx
from helpers_daemon import AgentDaemon
from helpers_daemon import wait_until as _wait

from agent.sandbox.engine import BindFailed
from agent.sandbox.faults import ExecFailed

sandbox_cfg, engine = fx.sandbox_cfg, fx.engine  # fixtures

POOL2 = {"pool": {"sizes": {"free": 2}}}


def _pool(d: AgentDaemon, tier: str = "free") -> int:
    return d.call("agent.info")["capacity"]["pool_by_tier"].get(tier, 0)


def _events(d: AgentDaemon, name: str) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == name]


def _pooled_ids(d: AgentDaemon) -> list[str]:
    return [e["session_id"] for e in _events(d, "sandbox_created") if e.get("pooled")]


def _host_leftovers(d: AgentDaemon, ids: list[str]) -> list[str]:
    """What of these sandboxes is still on the host: cgroups under the daemon's prefix,
    session directories, mounts."""
    prefix = d.config["sandbox"]["cgroup_prefix"]
    out = []
    for root in Path("/sys/fs/cgroup").iterdir():
        for sid in ids:
            if (root / prefix / sid).exists():
                out.append(f"cgroup {root.name}/{sid}")
    for sid in ids:
        if (d.runtime_dir / "sessions" / sid).exists():
            out.append(f"dir {sid}")
    mounts = Path("/proc/self/mountinfo").read_text()
    out += [f"mount {sid}" for sid in ids if f"/{sid}/" in mounts]
    return out


def test_pool_fills_to_its_size_and_counts_against_capacity(tmp_path):
    """With [pool] sizes.free = 2 the daemon makes two unbound sandboxes off the request
    path; agent.info counts them (pool_members, committed memory) but not as sessions,
    and the pool_members gauge shows them per tier."""
    with AgentDaemon(tmp_path, config=POOL2) as d:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        cap = d.call("agent.info")["capacity"]
        assert cap["pool_members"] == 2 and cap["sessions_live"] == 0
        assert cap["memory_committed_bytes"] == 2 * 128 * 1024 * 1024
        assert len(_pooled_ids(d)) == 2
        time.sleep(0.5)  # it stops at its size
        assert len(_pooled_ids(d)) == 2 and _pool(d) == 2
        from agent.ops import debug

        text = debug.request(d.runtime_dir / "debug.sock", "metrics")
        assert 'nanorix_agent_pool_members{tier="free"} 2.0' in text


def test_create_takes_a_pooled_sandbox_with_its_own_identity_and_refills(tmp_path):
    """A create takes a ready member: the session's sandbox is the pooled one, yet its
    hostname is fresh and unique (UTS name, /etc/hostname, /etc/hosts, journal), exec and
    /work work, and the pool is refilled behind it."""
    with AgentDaemon(tmp_path, config=POOL2) as d:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        pooled = set(_pooled_ids(d))
        sids, names = [], []
        for _ in range(2):
            sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
            assert sid in pooled  # the session's sandbox was made before the create
            res = d.call("session.exec", {"session_id": sid, "command":
                         "hostname; cat /etc/hostname; echo; grep 127.0.1.1 /etc/hosts; "
                         "echo data > /work/f; cat /work/f"})
            assert res["exit_code"] == 0, res
            host, etc_host, hosts_line, data = res["output"].decode().split("\n")[:4]
            assert host == etc_host and hosts_line.split() == ["127.0.1.1", host]
            assert host.startswith("nrx-") and host != "nrx-unbound" and data == "data"
            names.append(host)
            sids.append(sid)
        assert len(set(names)) == 2
        # the journal row records the bound hostname (what re-adoption checks against)
        import sqlite3
        db = sqlite3.connect(d.state_dir / "journal.sqlite3")
        rows = dict(db.execute("SELECT session_id, hostname FROM sessions").fetchall())
        db.close()
        assert [rows[s] for s in sids] == names
        _wait(lambda: _pool(d) == 2 and len(_pooled_ids(d)) == 4, what="refill to 2")
        for sid in sids:
            assert d.call("session.destroy", {"session_id": sid})["status"] == "destroyed"


def test_aged_out_member_is_destroyed_through_the_pipeline_without_a_proof(tmp_path):
    """A member older than max_age_seconds is destroyed by the eight-step pipeline (reason
    pool_retired; every step but the key step verified, and step 4 says there was no
    key), gets no CDP and no journal row, leaves nothing on the host, and is replaced."""
    cfg = {"pool": {"sizes": {"free": 1}, "max_age_seconds": 1.5}}
    with AgentDaemon(tmp_path, config=cfg) as d:
        retired = _wait(lambda: [e for e in _events(d, "pool_member_retired")
                                 if e.get("why") == "aged_out"], what="an age-out")
        e = retired[0]
        sid = e["session_id"]
        assert e["never_bound"] is True and e["steps_unverified"] == []
        assert e["pipeline_status"] == "expired_unclean"  # step 4 found no key to zeroize
        steps = [s for s in _events(d, "destroy.step") if s.get("session_id") == sid]
        assert [s["step"] for s in steps] == list(range(1, 9))
        assert all(s["reason"] == "pool_retired" for s in steps)
        assert [s["step"] for s in steps if not s["ok"]] == [4]  # there never was a key
        assert "no session key" in next(s["error"] for s in steps if s["step"] == 4)
        assert not [p for p in (d.state_dir / "spool").iterdir() if sid in p.name]
        assert d.call("proof.pending", {}) == []
        import sqlite3
        db = sqlite3.connect(d.state_dir / "journal.sqlite3")
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
        db.close()
        assert _host_leftovers(d, [sid]) == []
        _wait(lambda: len(_pooled_ids(d)) >= 2, what="a replacement")


def test_drain_destroys_pool_members_through_the_pipeline(tmp_path):
    """SIGTERM (drain) destroys every pool member through the pipeline (why=closed, all
    but the key step verified) and the daemon leaves none of them on the host."""
    d = AgentDaemon(tmp_path, config=POOL2).start()
    try:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        ids = _pooled_ids(d)
    finally:
        assert d.stop() == 0
    retired = [e for e in _events(d, "pool_member_retired") if e.get("why") == "closed"]
    assert sorted(e["session_id"] for e in retired) == sorted(ids)
    assert all(e["steps_unverified"] == [] for e in retired)
    assert _host_leftovers(d, ids) == []


def test_pool_size_zero_is_the_old_cold_path(tmp_path):
    """With every size 0 no sandbox is made ahead: a create builds its own (cold) and
    agent.info shows no pool members."""
    with AgentDaemon(tmp_path, config={"pool": {"sizes": {"free": 0}}}) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        assert d.call("session.exec", {"session_id": sid, "command": "true"})["exit_code"] == 0
        made = [(e["session_id"], e.get("pooled")) for e in _events(d, "sandbox_created")
                if e["session_id"].startswith("sess_")]
        assert made == [(sid, False)]
        cap = d.call("agent.info")["capacity"]
        assert cap["pool_members"] == 0 and cap["pool_by_tier"] == {"free": 0}
        d.call("session.destroy", {"session_id": sid})


def test_a_create_naming_its_session_id_takes_the_cold_path(tmp_path):
    """A create that brings its own session_id cannot take a member (its id was drawn
    when it was made): it is built cold and the pool keeps its members."""
    with AgentDaemon(tmp_path, config=POOL2) as d:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        sid = "sess_00112233aabbccdd"
        d.call("session.create", {"customer_id": "c", "tier": "free", "session_id": sid})
        assert sid not in _pooled_ids(d) and _pool(d) == 2
        d.call("session.destroy", {"session_id": sid})


@pytest.mark.allow_leftovers  # the crashed daemon's sandboxes die with it; checked below
def test_crash_with_pooled_sandboxes_leaves_nothing_after_the_next_start(tmp_path):
    """SIGKILL with a full pool: the unbound nrx-inits end with their lifeline (no orphan
    grace), and the next start's recovery reclaims their cgroups and directories without
    taking them for sessions (no journal row, no proof); after its own stop nothing of
    them is left on the host."""
    d = AgentDaemon(tmp_path, config=POOL2).start()
    try:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        ids = _pooled_ids(d)
        pids = [e["init_pid"] for e in _events(d, "sandbox_created") if e.get("pooled")]
        d.kill()
        _wait(lambda: not any(os.path.exists(f"/proc/{p}") and
                              "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                              for p in pids), timeout=10, what="pool inits to end")
        d.config["pool"] = {"sizes": {"free": 0}}
        d.start()
        assert _host_leftovers(d, ids) == []
        rec = [e for e in _events(d, "recovery_reclaimed") if e.get("kind") == "cgroups"]
        assert rec and rec[0]["count"] >= 2
        # never a session: no rebuilt journal row, no proof, no state damage
        assert d.call("proof.pending", {}) == [] and not _events(d, "state_damaged")
        assert list((d.state_dir / "spool").glob("*.pool")) == []  # their reservations
        assert d.call("session.list", {}) == []
    finally:
        d.stop()
    assert _host_leftovers(d, ids) == []


async def test_unbound_sandbox_runs_nothing_until_bound_and_binds_once(engine):
    """nrx-init of a pooled sandbox refuses EXEC before BIND (fail closed), takes the
    hostname once, then runs commands; a second BIND is refused (BindFailed)."""
    sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general",
                             unbound=True)
    try:
        assert sb.hostname == "nrx-unbound"
        with pytest.raises(ExecFailed, match="not bound to a session"):
            await sb.exec("true", timeout=10)
        await engine.bind(sb)
        assert sb.hostname != "nrx-unbound"
        res = await sb.exec("hostname", timeout=10)
        assert res.exit_code == 0 and res.stdout.decode().strip() == sb.hostname
        with pytest.raises(BindFailed, match="EALREADY"):
            await engine.bind(sb)
    finally:
        await sb.teardown()


def test_pool_config_is_read_and_bad_values_are_refused_by_name(tmp_path):
    """[pool] with a [pool.sizes] table is read from the file (it replaces the default
    sizes), and an unknown tier or profile, a negative size or a non-integer is refused
    with the key's name."""
    from agent import config as config_mod

    def load(text: str):
        p = tmp_path / "agent.toml"
        p.write_text(text)
        return config_mod.load(p)

    cfg = load("[pool]\nmax_age_seconds = 30\n[pool.sizes]\nstarter = 3\nfree = 0\n")
    assert cfg.pool.sizes == {"starter": 3, "free": 0} and cfg.pool.max_age_seconds == 30
    assert config_mod.Config().pool.sizes == {"free": 2}  # the default: small, one tier
    for text, key in (("[pool.sizes]\nnope = 1\n", "pool.sizes.nope"),
                      ("[pool.sizes]\nfree = -1\n", "pool.sizes.free"),
                      ("[pool.sizes]\nfree = \"2\"\n", "pool.sizes"),
                      ("[pool]\nprofiles = [\"lax\"]\n", "pool.profiles"),
                      ("[pool]\nrefill_concurrency = 0\n", "pool.refill_concurrency")):
        with pytest.raises(config_mod.ConfigError, match=key):
            load(text)


def test_pooled_spool_reservation_is_invisible_until_bound_and_dropped_at_start(tmp_path):
    """A pool sandbox's reservation (`.pool`, space preallocated) is no session's until
    bind_pooled writes the header and renames it to `.resv`; one a crash left behind is
    removed by the start's scan, and release_pooled drops an unbound one."""
    from agent.service.spool import Spool

    sp = Spool(tmp_path, reserve_bytes=8192)
    a, b, c = (f"sess_{n:016x}" for n in (1, 2, 3))
    for sid in (a, b, c):
        sp.reserve_pooled(sid)
    assert (tmp_path / "spool" / f"{a}.pool").stat().st_blocks * 512 >= 8192
    assert sp.reservations() == {}
    sp.bind_pooled(a, {"customer_id": "cust", "tier": "free"})
    assert sp.reservations()[a]["customer_id"] == "cust"
    sp.release_pooled(b)
    assert sp.scan() == []
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [f"{a}.resv"]
    assert c not in sp.reservations()


def test_a_member_whose_init_dies_is_retired_and_replaced(tmp_path):
    """kill -9 of a ready member's nrx-init: the pool notices within its one-second look,
    destroys what is left through the pipeline (why=died) and makes a replacement; no
    create ever gets the dead one."""
    import signal

    with AgentDaemon(tmp_path, config={"pool": {"sizes": {"free": 1}}}) as d:
        _wait(lambda: _pool(d) == 1, what="pool of 1")
        (made,) = [e for e in _events(d, "sandbox_created") if e.get("pooled")]
        os.kill(made["init_pid"], signal.SIGKILL)
        retired = _wait(lambda: [e for e in _events(d, "pool_member_retired")
                                 if e["session_id"] == made["session_id"]], what="retired")
        assert retired[0]["why"] == "died"
        _wait(lambda: len(_pooled_ids(d)) == 2 and _pool(d) == 1, what="a replacement")
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        assert sid != made["session_id"]
        assert d.call("session.exec", {"session_id": sid, "command": "true"})["exit_code"] == 0
        d.call("session.destroy", {"session_id": sid})
        assert _host_leftovers(d, [made["session_id"]]) == []


async def test_a_member_that_refuses_bind_is_destroyed_and_the_create_goes_cold(agent_dirs):
    """Fail closed: a member whose nrx-init refuses BIND (here: really bound once already,
    so it answers EALREADY) is destroyed through the pipeline (why=bind_failed) and the
    session is built cold under the same id, with a hostname of its own."""
    import trio
    from suite import cgroup_prefix, uid_base

    from agent import config as config_mod
    from agent.keys.attestation import AttestationKeyStore
    from agent.sandbox.engine import SandboxEngine
    from agent.service.journal import Journal
    from agent.service.sessions import Service
    from agent.service.spool import Spool

    state, runtime = agent_dirs
    cfg = config_mod.load(None, state_dir=state, runtime_dir=runtime)
    cfg.sandbox.cgroup_prefix = cgroup_prefix("pool")
    cfg.sandbox.uid_base = uid_base()
    cfg.pool.sizes = {"free": 1}
    eng = SandboxEngine(cfg, cgroup_prefix=cfg.sandbox.cgroup_prefix)
    journal = Journal(state)
    svc = Service(cfg, engine=eng, key_store=AttestationKeyStore(state), journal=journal,
                  spool=Spool(state), version="test")
    retired: list[str] = []
    real_retire = svc.pool.retire

    async def retire(m, why):
        retired.append(why)
        return await real_retire(m, why)

    svc.pool.retire = retire  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            with trio.fail_after(30):
                while svc.pool.counts()["free"] < 1:
                    await trio.sleep(0.01)
            (member,) = svc.pool.members[("free", "default")]
            await eng.bind(member.sandbox)  # its one BIND is spent
            first_name = member.sandbox.hostname
            res = await svc.create(customer_id="c", tier="free")
            assert res["session_id"] == member.session_id and retired == ["bind_failed"]
            s = svc.sessions[res["session_id"]]
            assert s.sandbox is not member.sandbox and s.sandbox.hostname != first_name
            out = await s.sandbox.exec("hostname", timeout=10)
            assert out.stdout.decode().strip() == s.sandbox.hostname
            assert (await svc.destroy(res["session_id"]))["status"] == "destroyed"
            await svc.drain()
            nursery.cancel_scope.cancel()
    finally:
        await eng.aclose()
        journal.close()
    assert not eng.live and eng.cgroups.leftovers() == []


def test_the_pool_never_refuses_a_create_that_fits_without_it(tmp_path):
    """A node of 4 sessions with a pool of 2: four creates back to back all succeed (the
    pool gives way: a member still being made is waited for, then one is retired), and a
    fifth is refused as at capacity; every session then ends with a complete proof."""
    cfg = {**POOL2, "node": {"max_sessions": 4}}
    with AgentDaemon(tmp_path, config=cfg) as d:
        _wait(lambda: _pool(d) == 2, what="pool of 2")
        sids = [d.call("session.create", {"customer_id": f"c{i}", "tier": "free"})
                ["session_id"] for i in range(4)]
        with pytest.raises(Exception, match="capacity"):
            d.call("session.create", {"customer_id": "c9", "tier": "free"})
        assert d.call("agent.info")["capacity"]["sessions_live"] == 4
        for sid in sids:
            res = d.call("session.destroy", {"session_id": sid})
            assert res["status"] == "destroyed", res
