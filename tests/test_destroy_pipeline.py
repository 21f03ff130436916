"""The destruction pipeline on real sessions (SandboxEngine): secrets gone from files and
memory, symlink/rename attacks contained by the freeze and the no-follow walk, fault
injection for every step, no names/commands/data in evidence, every trigger verifies."""

from __future__ import annotations

import functools
import json
import os
import secrets
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from suite import cgroup_prefix

from agent.cdp.canonical import canonical_json
from agent.cdp.verify import verify_cdp
from agent.config import Config, MiB, Tier
from agent.destroy import REASONS, DestroyContext, DestroyHooks, run_pipeline
from agent.keys.attestation import AttestationSigner, make_key_id
from agent.keys.session import SessionKey
from agent.sandbox.engine import SandboxEngine
from agent.service.model import SessionRecord
from agent.service.proofs import sign_cdp

STRICT = ["random", "ones", "zeros"]


@pytest.fixture
async def engine(agent_dirs):
    state, run = agent_dirs
    cfg = Config()
    cfg.paths.state_dir, cfg.paths.runtime_dir = state, run
    # a host uid range no other agent on this shared machine uses (step 5 scans for it)
    cfg.node.max_sessions = 4
    cfg.sandbox.uid_base = (1 << 24) + secrets.randbelow(8000) * 4 * cfg.sandbox.uid_slot_size
    cfg.tiers["tiny"] = Tier(3, 300, 300, 32 * MiB, tmpfs_bytes=8 * MiB, pids_max=64)
    eng = SandboxEngine(cfg, cgroup_prefix=cgroup_prefix("destroy"))
    try:
        yield eng
    finally:
        await eng.aclose()
    assert not eng.live


def signer() -> AttestationSigner:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    return AttestationSigner(key, make_key_id(time.time(), pub), "2026-01-01T00:00:00Z", 1)


def new_id() -> str:
    return "sess_" + secrets.token_hex(8)


def make_ctx(sb, *, passes=STRICT, reason="requested", hooks=None, key=True,
             classification="PHI", timeout=3.0) -> DestroyContext:
    sid = sb.session_id if sb is not None else new_id()
    revoked = []
    ctx = DestroyContext(
        sandbox=sb,
        session=SessionRecord(session_id=sid, tier="free", classification=classification,
                              created_at="2026-01-01T00:00:00Z"),
        session_key=SessionKey.generate(sid) if key else None, passes=list(passes),
        reason=reason, node_id="node-test", agent_version="0.1.0",
        revoke=lambda: revoked.append(sid), hooks=hooks, timeout=timeout)
    ctx.revoked = revoked  # type: ignore[attr-defined]
    return ctx


def open_beneath(root_fd: int, rel: str) -> int:
    """Open a file below the pinned root, one component at a time, never following links."""
    parts = rel.strip("/").split("/")
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def read_private_memory(pid: int) -> bytes:
    """All readable private writable memory of a (frozen) process, as the test sees it."""
    out = bytearray()
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in maps:
            parts = line.split()
            if parts[1][:2] != "rw" or parts[1][3] != "p":
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            try:
                out += os.pread(fd, hi - lo, lo)
            except OSError:
                pass
    finally:
        os.close(fd)
    return bytes(out)


def bad(out) -> str:
    """The failed steps' evidence, in full, for assertion messages."""
    return json.dumps([e for e in out.evidence if not e["ok"]])


def counts(ev: dict) -> dict:
    return {k: ev.get(k) for k in ("files", "dirs", "symlinks", "fifos", "hardlinks",
                                   "sparse_files")}


async def baseline_counts(engine) -> dict:
    """Step-2 counts of a session whose command created nothing (the generated layout)."""
    sb = await engine.create(new_id(), tier="free", classification="PHI")
    await sb.exec("true", input_data=b"x" * 48, timeout=10)
    out = await run_pipeline(make_ctx(sb))
    assert out.status == "destroyed", out.evidence
    return counts(out.evidence[1])


DEPTH = 100
SECRET_CMD = """
set -e
mkdir -p /work/$(python3 -c "print('/'.join(['d'] * DEPTH))")
for i in 1 2 3; do cat /input/data > /work/f$i; done
cat /input/data > /work/$(python3 -c "print('/'.join(['d'] * DEPTH))")/deep
ln /work/f1 /work/hard
ln -s /work/f2 /work/sym
mkfifo /work/fifo
python3 -c "
f = open('/work/sparse', 'wb'); f.seek(3 << 20); f.write(open('/input/data', 'rb').read()); f.truncate(8 << 20)"
python3 -c "
import time; s = bytearray(open('/input/data', 'rb').read() * 64); open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
""".replace("DEPTH", str(DEPTH))


async def test_secret_gone_from_files_and_memory_and_counts_match(engine):
    """After steps 2 and 3 a random secret is in no file (read through fds opened before
    destruction) and in no process memory (read after the wipe, before the kill), and the
    step-2 counts are the generated layout plus exactly what the command created."""
    base = await baseline_counts(engine)
    secret = b"S3CRET-" + secrets.token_hex(20).encode()
    sb = await engine.create(new_id(), tier="free", classification="PHI")
    r = await sb.exec(SECRET_CMD, input_data=secret, timeout=20)
    assert r.exit_code == 0, r.stderr
    rels = ["work/f1", "work/f2", "work/f3", "work/sparse", "input/data",
            "work/" + "/".join(["d"] * DEPTH) + "/deep"]
    fds = [open_beneath(sb.root_fd, rel) for rel in rels]
    seen = {}

    async def after_step(n, ev):
        if n == 1:
            pids = sb.cgroup.pids()
            seen["pids"] = pids
            seen["mem_before"] = any(secret in read_private_memory(p) for p in pids)
            seen["files_before"] = all(secret in os.pread(fd, os.fstat(fd).st_size, 0)
                                       for fd in fds)
        if n == 2:
            for fd in fds:
                data = os.pread(fd, os.fstat(fd).st_size, 0)
                assert secret not in data
                assert data == bytes(len(data))
                os.close(fd)
            fds.clear()

    async def before_kill(pids):
        seen["wiped_pids"] = sorted(pids)
        seen["mem_after"] = [secret in read_private_memory(p) for p in pids]

    try:
        out = await run_pipeline(make_ctx(sb, hooks=DestroyHooks(after_step=after_step,
                                                                  before_kill=before_kill)))
    finally:
        for fd in fds:
            os.close(fd)
    assert seen["files_before"] and seen["mem_before"]  # the test saw the secret first
    assert seen["mem_after"] and not any(seen["mem_after"])
    assert seen["wiped_pids"] == sorted(seen["pids"])
    assert out.status == "destroyed", bad(out)
    ev2, ev3 = out.evidence[1], out.evidence[2]
    assert counts(ev2) == {"files": base["files"] + 6,  # f1-3, deep, sparse, ready
                           "dirs": base["dirs"] + DEPTH,
                           "symlinks": base["symlinks"] + 1, "fifos": base["fifos"] + 1,
                           "hardlinks": base["hardlinks"] + 1,
                           "sparse_files": base["sparse_files"] + 1}
    assert ev2["passes"] == STRICT and ev2["agent_view_unmounted"] is True
    assert ev3["processes"] == len(seen["pids"]) >= 2
    assert ev3["killed"] and ev3["cgroup_empty"] and ev3["memory_after_bytes"] == 0
    assert out.evidence[5]["blocks"] == ev2["readback_blocks"] + ev3["readback_blocks"]
    assert out.evidence[5]["match"] is True


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def test_symlink_and_rename_attack_cannot_touch_host_files(engine, tmp_path):
    """Symlinks planted to a host file and directory plus a busy rename/ln -sf loop are
    frozen at step 1 (no CPU time passes) and the wipe leaves the host untouched."""
    host = tmp_path / "host-secret.txt"
    host.write_bytes(b"HOST-CONTENT\n" * 512)
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    (hostdir / "keep").write_bytes(b"KEEP")
    before = (host.read_bytes(), os.stat(host).st_mtime_ns, os.stat(host).st_nlink,
              sorted(os.listdir(hostdir)))
    up = "../" * 30
    cmd = f"""
ln -s {host} /work/evil
ln -s {up}{str(host).lstrip('/')} /work/evil-rel
ln -s {hostdir} /work/evildir
mkdir -p /work/x; echo data > /work/a
(while :; do mv /work/a /work/b 2>/dev/null; ln -sf {host} /work/a; rm -f /work/a;
  echo data > /work/a; ln -sfn {hostdir} /work/x/d; mv /work/x /work/y; mv /work/y /work/x;
  done) </dev/null >/dev/null 2>&1 &
sleep 0.2
"""
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(cmd, timeout=10)
    assert r.exit_code == 0, r.stderr
    proof = {}

    async def after_step(n, ev):
        if n == 1:
            pids = sb.cgroup.pids()
            t0 = {p: _cpu_ticks(p) for p in pids}
            await trio.sleep(0.3)
            proof["frozen"] = sb.cgroup.frozen()
            proof["ticks_moved"] = [p for p in pids if _cpu_ticks(p) != t0[p]]
            proof["pids"] = len(pids)

    out = await run_pipeline(make_ctx(sb, passes=STRICT,
                                      hooks=DestroyHooks(after_step=after_step)))
    assert proof["frozen"] and proof["pids"] >= 2 and proof["ticks_moved"] == []
    assert (host.read_bytes(), os.stat(host).st_mtime_ns, os.stat(host).st_nlink,
            sorted(os.listdir(hostdir))) == before
    assert (hostdir / "keep").read_bytes() == b"KEEP"
    assert out.status == "destroyed", bad(out)
    assert out.evidence[1]["symlinks"] >= 4 and out.evidence[1]["races"] == 0


@pytest.mark.parametrize("step", range(1, 9))
async def test_fault_in_any_step_gives_signed_incomplete_proof_and_no_residue(engine, step):
    """A fault injected in step N still runs every other step, ends expired_unclean and
    incomplete, signs a CDP that verifies, and leaves nothing behind."""
    sb = await engine.create(new_id(), tier="free", classification="PHI")
    r = await sb.exec("echo data > /work/f; sleep 100 </dev/null >/dev/null 2>&1 &", timeout=10)
    assert r.exit_code == 0
    ctx = make_ctx(sb, hooks=DestroyHooks(fail_step=step), timeout=0.5)
    out = await run_pipeline(ctx)
    assert out.status == "expired_unclean"
    assert out.destruction_state == "incomplete"
    failed = [e["step"] for e in out.evidence if not e["ok"]]
    assert step in failed
    assert out.evidence[step - 1]["error"] == "injected fault"
    assert [e["step"] for e in out.evidence] == list(range(1, 9))
    cdp = sign_cdp(out, signer())
    res = verify_cdp(cdp)
    assert res["valid"] is True, res
    assert res["checks"]["destruction_complete"] is False
    assert out.teardown_ok
    assert not engine.live  # slot released (by step 5 or by teardown)


async def test_evidence_holds_no_names_commands_or_data(engine):
    """File names, command text and data carrying a marker never reach the evidence, the
    CDP or the logs."""
    import structlog

    marker = "MRK" + secrets.token_hex(6)
    sb = await engine.create(new_id(), tier="free", classification="general")
    cmd = (f"mkdir -p /work/{marker}_dir && echo {marker}_content > /work/{marker}_dir/{marker}"
           f" && ln -s /work/{marker}_target /work/{marker}_link && mkfifo /tmp/{marker}_fifo"
           f" && echo {marker}")
    r = await sb.exec(cmd, input_data=marker.encode(), timeout=10)
    assert marker.encode() in r.stdout
    with structlog.testing.capture_logs() as logs:
        out = await run_pipeline(make_ctx(sb, passes=["zeros"], classification="general"))
    assert out.status == "destroyed", bad(out)
    blob = canonical_json(out.evidence).decode() + json.dumps(sign_cdp(out, signer()))
    assert marker not in blob
    assert logs and marker not in repr(logs)


@pytest.mark.parametrize("reason", REASONS)
async def test_every_trigger_gives_a_verifying_cdp(engine, reason):
    """Each trigger reason produces a valid complete CDP: destroyed on request, expired
    otherwise, with the reason in step 8."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    out = await run_pipeline(make_ctx(sb, passes=["zeros"], reason=reason))
    assert out.status == ("destroyed" if reason == "requested" else "expired"), \
        bad(out)
    assert out.evidence[7]["reason"] == reason
    assert out.evidence[7]["status"] == out.status
    res = verify_cdp(sign_cdp(out, signer()))
    assert res["valid"] and res["checks"]["destruction_complete"] is True


async def test_oom_ends_the_session_through_the_pipeline_as_expired(engine):
    """With the agent's OOM guard a session at its memory cap is frozen with nothing freed,
    and the pipeline (reason oom) wipes it before the kill: expired, every step ok."""
    from agent.sandbox.faults import SandboxGone

    sb = await engine.create(new_id(), tier="tiny", classification="general")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(sb.watch_oom, guard=True, headroom=8 << 20))

        async def bomb() -> None:
            with pytest.raises(SandboxGone):
                await sb.exec("python3 -c 'a = bytearray(96 << 20)'", timeout=20)

        nursery.start_soon(bomb)
        with trio.fail_after(10):
            await sb.oom.wait()
        assert sb.oom_contained and sb.cgroup.frozen() and sb.cgroup.oom_kills() == 0
        sb.ending = True
        out = await run_pipeline(make_ctx(sb, passes=["zeros"], reason="oom"))
    assert out.status == "expired", bad(out)
    assert all(ev["ok"] for ev in out.evidence), bad(out)
    assert out.evidence[2]["oom_killer_disabled"] and out.evidence[2]["kernel_oom_kills"] == 0
    assert out.evidence[7]["reason"] == "oom"
    assert verify_cdp(sign_cdp(out, signer()))["valid"]


async def test_recovery_without_sandbox_records_failures_without_crashing():
    """With no sandbox and no key (agent recovery), every step that cannot verify records
    ok false with an error, and the signed CDP still verifies."""
    out = await run_pipeline(make_ctx(None, key=False, reason="agent_recovery"))
    assert out.status == "expired_unclean"
    assert len(out.evidence) == 8
    for n in (1, 2, 3, 4, 5, 6):
        assert out.evidence[n - 1]["ok"] is False and out.evidence[n - 1]["error"]
    assert out.evidence[7]["reason"] == "agent_recovery"
    assert verify_cdp(sign_cdp(out, signer()))["valid"]


async def test_revoke_is_called_and_slot_released(engine):
    """Step 5 revokes the session id and releases the uid slot."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    ctx = make_ctx(sb, passes=["zeros"])
    out = await run_pipeline(ctx)
    ev5 = out.evidence[4]
    assert ctx.revoked == [sb.session_id]
    assert ev5["slot_released"] and ev5["session_revoked"] and ev5["hostname_retired"]
    assert ev5["processes_with_ids"] == 0 and ev5["host_uid"] == sb.host_uid
    assert sb.session_id not in engine.live


async def _destroy_with_id_holder(engine, *, exits: bool, timeout: float = 3.0):
    """Destroy a session while a host process (outside the sandbox) runs as the session's
    slot uid, started after step 4: /bin/true left unreaped for 0.2 s (a zombie once
    exited, as a dying task is) or a sleeper killed after the pipeline."""
    import subprocess

    sb = await engine.create(new_id(), tier="free", classification="general")
    holder: list[subprocess.Popen] = []

    async def after_step(n, ev):
        if n != 4:
            return
        argv = ["/bin/true"] if exits else ["/bin/sleep", "1000"]
        p = subprocess.Popen(argv, user=sb.host_uid, group=sb.host_gid, extra_groups=[])
        holder.append(p)
        if exits:  # until it exited, without reaping it
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, _reap_later, p))

    try:
        async with trio.open_nursery() as nursery:
            return await run_pipeline(make_ctx(sb, passes=["zeros"], timeout=timeout,
                                               hooks=DestroyHooks(after_step=after_step)))
    finally:
        for p in holder:
            p.kill()
            p.wait()


def _reap_later(p) -> None:
    time.sleep(0.2)
    p.wait()


async def test_step5_waits_for_an_exiting_id_holder_to_be_reaped(engine):
    """A task with the session's uid that has exited but is not yet reaped is waited for
    (bounded), not reported as a live process: the step passes once the kernel reaps it,
    and the evidence says it saw one exiting holder and how long it waited."""
    out = await _destroy_with_id_holder(engine, exits=True)
    ev5 = out.evidence[4]
    assert out.status == "destroyed", bad(out)
    assert ev5["processes_with_ids"] == 0 and ev5["slot_released"]
    assert ev5["processes_with_ids_exiting"] == 1
    assert ev5["processes_with_ids_outside"] == ev5["processes_with_ids_in_session"] == 0
    assert ev5["exit_wait_us"] >= 100_000


async def test_step5_fails_at_once_on_a_live_id_holder_outside_the_session(engine):
    """A live host process with the session's uid (another workload on an overlapping
    range) fails step 5 without waiting out the timeout, and the evidence says it was
    outside the session's PID namespace; the slot is not released."""
    out = await _destroy_with_id_holder(engine, exits=False, timeout=30.0)
    ev5 = out.evidence[4]
    assert out.status == "expired_unclean"
    assert not ev5["ok"] and "processes still run with session ids" in ev5["error"]
    assert ev5["processes_with_ids"] == 1 and ev5["processes_with_ids_outside"] == 1
    assert ev5["processes_with_ids_exiting"] == 0 and not ev5["slot_released"]
    assert ev5["exit_wait_us"] < 10_000_000


def test_paths_helper_is_relative():
    """open_beneath refuses absolute escapes by construction (sanity of the test helper)."""
    assert Path("work/a").parts[0] == "work"


COW_CMD = """
python3 -c "
import os, time
b = bytearray(os.urandom(1 << 20) * 14)
if os.fork() == 0:
    time.sleep(1000)
open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def test_wipe_of_cow_shared_memory_near_the_cap_completes(engine):
    """Processes sharing copy-on-write pages near the memory cap are still fully wiped:
    the cap is raised before the overwrite makes its copies."""
    sb = await engine.create(new_id(), tier="tiny", classification="general")
    r = await sb.exec(COW_CMD, timeout=20)
    assert r.exit_code == 0, r.stderr
    with trio.fail_after(30):
        out = await run_pipeline(make_ctx(sb, passes=["zeros"]))
    ev3 = out.evidence[2]
    assert ev3["ok"], ev3
    assert ev3["cap_raised"] is True
    assert ev3["bytes"] >= 2 * 14 << 20
    assert out.status == "destroyed"


async def test_cancelled_after_freeze_still_kills_and_leaves_nothing(engine):
    """A pipeline cancelled right after step 1 froze the session (daemon shutdown) does not
    hang on the frozen PID 1: teardown kills and thaws, nothing is left behind."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec("sleep 100 </dev/null >/dev/null 2>&1 &", timeout=10)
    assert r.exit_code == 0
    fds_before = len(os.listdir("/proc/self/fd"))
    with trio.CancelScope() as cs:

        async def after_step(n, ev):
            if n == 1:
                assert sb.cgroup.frozen()
                cs.cancel()

        with trio.fail_after(15):
            await run_pipeline(make_ctx(sb, hooks=DestroyHooks(after_step=after_step)))
    assert cs.cancelled_caught
    assert not sb.alive
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_pipeline_releases_every_pin_and_fd(engine):
    """The namespace and superblock pins and the sandbox's fds are all closed at the end."""
    before = len(os.listdir("/proc/self/fd"))
    sb = await engine.create(new_id(), tier="free", classification="general")
    out = await run_pipeline(make_ctx(sb, passes=["zeros"]))
    assert out.status == "destroyed"
    assert out.evidence[5]["namespaces_pinned"] is True
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_recovery_never_wipes_a_host_process_that_reused_the_init_pid():
    """A partial sandbox whose recorded init pid now names an unrelated host process:
    no step freezes, wipes, pins or kills that process."""
    import subprocess
    import sys
    from types import SimpleNamespace

    marker = b"KEEP-" + secrets.token_hex(8).encode()
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; s = bytearray(sys.argv[1]"
                          ".encode() * 100); print('ok', flush=True); time.sleep(60)",
                          marker.decode()], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ok\n"
        fake = SimpleNamespace(init_pid=p.pid, namespaces={n: 1 for n in (
            "user", "mnt", "uts", "ipc", "pid", "net", "cgroup")}, cgroup=None, root_fd=-1,
            host_uid=None, host_gid=None, session_id=new_id())
        out = await run_pipeline(make_ctx(fake, key=False, reason="agent_recovery"))
        assert out.status == "expired_unclean"
        assert out.evidence[2]["processes"] == 0
        assert p.poll() is None
        assert marker * 100 in read_private_memory(p.pid)
    finally:
        p.kill()
        p.wait()


async def test_evidence_carries_every_field_of_the_vector_with_its_type(engine):
    """Each step's evidence has every field (and method) of the shared CDP vector, with
    the same JSON types, and no float anywhere."""
    vector = json.loads((Path(__file__).parent / "vectors" / "cdp-v1.json").read_text())
    sb = await engine.create(new_id(), tier="free", classification="PHI")
    out = await run_pipeline(make_ctx(sb))
    assert out.status == "destroyed", bad(out)

    def kind(v):
        return type(v).__name__ if not isinstance(v, bool) else "bool"

    for want, got in zip(vector["cdp"]["evidence"], out.evidence, strict=True):
        assert got["method"] == want["method"]
        for key, value in want.items():
            assert key in got, (want["step"], key)
            assert kind(got[key]) == kind(value), (want["step"], key)
        if "residue" in want:
            assert set(got["residue"]) == set(want["residue"])
        if "keys" in want:
            assert set(got["keys"][0]) == set(want["keys"][0])
    canonical_json(out.evidence)  # raises on a float



LEASE_CMD = """
python3 -c "
import fcntl, os, sys, time
secret = open('/input/data', 'rb').read()
for name, kind in (('/work/rlease', fcntl.F_RDLCK), ('/work/wlease', fcntl.F_WRLCK)):
    with open(name, 'wb') as f:
        f.write(secret * 100)
    fd = os.open(name, os.O_RDONLY if kind == fcntl.F_RDLCK else os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def test_files_under_a_lease_are_still_overwritten(engine, monkeypatch):
    """A session process holding read/write leases cannot stop the wipe: the leased files
    are pinned in step 2 and overwritten in step 3 after the holder is dead (read back
    here through the pins, before they are released)."""
    from agent.destroy import filesystem_destruction as fsd

    secret = b"LEASED-" + secrets.token_hex(16).encode()
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(LEASE_CMD, input_data=secret, timeout=20)
    assert r.exit_code == 0, r.stderr
    rfd = open_beneath(sb.root_fd, "work/rlease")  # a read open does not break a read lease
    assert secret in os.pread(rfd, 1 << 20, 0)
    os.close(rfd)
    seen = []
    real = fsd.wipe_deferred

    def checked(fds, passes):
        dups = [os.dup(fd) for fd in fds]
        try:
            res = real(fds, passes)
            for d in dups:
                fd = os.open(f"/proc/self/fd/{d}", os.O_RDONLY)
                try:
                    seen.append(os.pread(fd, 1 << 20, 0))
                finally:
                    os.close(fd)
            return res
        finally:
            for d in dups:
                os.close(d)

    monkeypatch.setattr(fsd, "wipe_deferred", checked)
    with trio.fail_after(20):
        out = await run_pipeline(make_ctx(sb, passes=STRICT))
    assert out.status == "destroyed", bad(out)
    assert out.evidence[1]["deferred_files"] == 2
    assert out.evidence[2]["deferred_files"] == 2
    assert [len(d) for d in seen] == [len(secret) * 100] * 2
    assert all(d == bytes(len(d)) for d in seen)
    ev6 = out.evidence[5]
    assert ev6["blocks"] == (out.evidence[1]["readback_blocks"] +
                             out.evidence[2]["readback_blocks"] +
                             out.evidence[2]["deferred_blocks"])


HIDDEN_CMD = """
python3 -c "
import mmap, os, time
secret = open('/input/data', 'rb').read() * 64
f = open('/work/gone', 'wb+'); f.write(secret); f.flush(); os.unlink('/work/gone')
t = os.open('/tmp', os.O_TMPFILE | os.O_RDWR); os.write(t, secret)
m = os.memfd_create('x'); os.write(m, secret)
g = open('/work/mapped', 'wb+'); g.write(secret); g.flush()
mm = mmap.mmap(g.fileno(), len(secret)); g.close(); os.unlink('/work/mapped')
open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def test_deleted_but_open_files_memfds_and_mappings_are_wiped(engine):
    """Data the session deleted but still holds (open fd, O_TMPFILE, memfd, mapping only)
    is overwritten in step 2, read back here through the processes' own magic links."""
    secret = b"HIDDEN-" + secrets.token_hex(16).encode()
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(HIDDEN_CMD, input_data=secret, timeout=20)
    assert r.exit_code == 0, r.stderr

    def hidden_contents() -> list[bytes]:
        out = []
        for pid in sb.cgroup.pids():
            for sub in ("fd", "map_files"):
                base = f"/proc/{pid}/{sub}"
                for n in os.listdir(base):
                    try:
                        st = os.stat(f"{base}/{n}")
                        if not (st.st_nlink == 0 and st.st_size and st.st_mode & 0o100000):
                            continue
                        fd = os.open(f"{base}/{n}", os.O_RDONLY)
                    except OSError:
                        continue
                    try:
                        out.append(os.pread(fd, 1 << 20, 0))
                    finally:
                        os.close(fd)
        return out

    before = hidden_contents()
    assert sum(secret in d for d in before) >= 4  # gone, tmpfile, memfd, mapped
    after: list[bytes] = []

    async def after_step(n, ev):
        if n == 2:
            after.extend(hidden_contents())

    out = await run_pipeline(make_ctx(sb, passes=STRICT,
                                      hooks=DestroyHooks(after_step=after_step)))
    assert out.status == "destroyed", bad(out)
    assert len(after) >= 4 and all(d == bytes(len(d)) for d in after)
    assert out.evidence[1]["open_unlinked_files"] == 4


SEALED_CMD = """
python3 -c "
import fcntl, os, time
m = os.memfd_create('x', os.MFD_ALLOW_SEALING); os.write(m, open('/input/data', 'rb').read())
fcntl.fcntl(m, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def test_a_write_sealed_memfd_is_reported_not_hidden(engine):
    """Data the kernel refuses to let anyone overwrite (a write-sealed memfd) makes step 2
    fail with a reason; the rest still runs and the signed CDP verifies."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(SEALED_CMD, input_data=b"SEALED" * 100, timeout=20)
    assert r.exit_code == 0, r.stderr
    out = await run_pipeline(make_ctx(sb, passes=["zeros"]))
    assert out.status == "expired_unclean"
    assert [e["step"] for e in out.evidence if not e["ok"]] == [2]
    assert "could not be overwritten" in out.evidence[1]["error"]
    assert verify_cdp(sign_cdp(out, signer()))["valid"]


async def test_a_failing_hook_is_raised_after_everything_ran(engine):
    """An exception in a test hook does not stop destruction; it is re-raised at the end."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    calls = []

    async def after_step(n, ev):
        calls.append(n)
        if n == 2:
            raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        await run_pipeline(make_ctx(sb, passes=["zeros"],
                                    hooks=DestroyHooks(after_step=after_step)))
    assert calls == list(range(1, 9))
    assert not sb.alive


SYSV_CMD = """
python3 -c "
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
secret = open('/input/data', 'rb').read() * 512
shmid = libc.shmget(0x4e5258, len(secret), 0o1600)
assert shmid >= 0, ctypes.get_errno()
addr = libc.shmat(shmid, None, 0)
ctypes.memmove(addr, secret, len(secret))
libc.shmdt(ctypes.c_void_p(addr))
"
"""


async def test_unattached_sysv_shared_memory_is_wiped_and_removed(engine, monkeypatch):
    """A System V segment no process has attached (so in no address space) is entered
    through the session's IPC namespace, overwritten (read back here while attached) and
    removed."""
    import threading

    from agent.destroy import sysv_shm

    secret = b"SYSV-" + secrets.token_hex(16).encode()
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(SYSV_CMD, input_data=secret, timeout=20)
    assert r.exit_code == 0, r.stderr
    seen = []
    real = sysv_shm.wipe.wipe_ranges

    def checked(fd, ranges, passes):
        if threading.current_thread().name != "nrx-sysv-shm-wipe":
            return real(fd, ranges, passes)
        before = b"".join(os.pread(fd, n, a) for a, n in ranges)
        res = real(fd, ranges, passes)
        after = b"".join(os.pread(fd, n, a) for a, n in ranges)
        seen.append((secret in before, len(after), after == bytes(len(after))))
        return res

    monkeypatch.setattr(sysv_shm.wipe, "wipe_ranges", checked)
    out = await run_pipeline(make_ctx(sb, passes=["zeros"]))
    monkeypatch.undo()
    assert out.status == "destroyed", bad(out)
    assert seen and seen[0][0] is True and seen[0][1] >= len(secret) * 512 and seen[0][2]
    assert out.evidence[2]["sysv_shm_segments"] == 1
    assert out.evidence[2]["sysv_shm_bytes"] >= len(secret) * 512


async def test_oom_fallback_to_the_kernel_is_reported_not_hidden(engine):
    """When the agent hands an OOM-stalled session back to the kernel killer (its bounded
    fallback), the kernel frees the memory unwiped and step 3 says so: oom_kernel_fallback
    true, kernel_oom_kills > 0, the step not ok, the session expired_unclean."""
    from agent.sandbox.faults import SandboxGone

    sb = await engine.create(new_id(), tier="tiny", classification="general")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(sb.watch_oom, guard=True, headroom=8 << 20))

        async def bomb() -> None:
            try:
                await sb.exec("python3 -c 'a = bytearray(96 << 20)'", timeout=20)
            except SandboxGone:
                pass

        nursery.start_soon(bomb)
        with trio.fail_after(10):
            await sb.oom.wait()
        sb.fall_back_to_kernel_oom()
        with trio.fail_after(10):
            while sb.cgroup.oom_kills() == 0:
                await trio.sleep(0.01)
        sb.ending = True
        out = await run_pipeline(make_ctx(sb, passes=["zeros"], reason="oom"))
    ev3 = out.evidence[2]
    assert ev3["oom_kernel_fallback"] is True and ev3["kernel_oom_kills"] >= 1
    assert ev3["ok"] is False and out.status == "expired_unclean", bad(out)


async def test_proof_chain_hashes_the_evidence_as_each_step_sealed_it(engine):
    """Each step's evidence is serialised once, when it is sealed: the outcome carries those
    bytes, the CDP built from them verifies, and evidence changed after its step ended
    (here by a test hook) no longer matches its hash in the proof, where step 7 also
    reports it; the proof never re-hashes what changed as if it had been sealed."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    out = await run_pipeline(make_ctx(sb))
    assert out.status == "destroyed", bad(out)
    assert out.evidence_json == [canonical_json(ev) for ev in out.evidence]
    assert verify_cdp(sign_cdp(out, signer()))["valid"] is True

    seen: dict[int, dict] = {}

    async def after_step(n, ev):
        seen[n] = ev
        if n == 6:  # steps 1-6 are sealed; step 7 re-checks them next
            seen[2]["files"] = -1

    sb2 = await engine.create(new_id(), tier="free", classification="general")
    out2 = await run_pipeline(make_ctx(sb2, hooks=DestroyHooks(after_step=after_step)))
    assert out2.evidence[1]["files"] == -1
    assert out2.evidence[6]["ok"] is False and out2.evidence[6]["steps_verified"] == 1
    res = verify_cdp(sign_cdp(out2, signer()))
    assert res["valid"] is False and res["checks"]["evidence"] is False, res


PIPE_CMD = """
python3 -c "
import os, socket, time
r, w = os.pipe(); os.write(w, b'x' * 3000)
a, b = socket.socketpair()
open('/tmp/ready', 'w').close(); time.sleep(1000)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def test_step3_measures_pipe_bytes_and_sockets_of_the_frozen_processes(engine):
    """Bytes queued in a session pipe and the sockets a session process holds are
    measured from the frozen processes (step 3's worker-thread call) and reported as not
    wiped."""
    sb = await engine.create(new_id(), tier="free", classification="general")
    r = await sb.exec(PIPE_CMD, timeout=20)
    assert r.exit_code == 0, r.stderr
    out = await run_pipeline(make_ctx(sb))
    ev = out.evidence[2]
    assert out.status == "destroyed", bad(out)
    assert ev["pipe_buffer_bytes"] == 3000
    assert ev["sockets"] >= 2  # the pair (PID 1's own control sockets come on top)
    assert ev["pipe_socket_buffers_wiped"] is False
