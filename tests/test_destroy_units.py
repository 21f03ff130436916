"""Unit tests of the destruction building blocks that need no sandbox: the wipe passes,
the no-follow tree walk on a real tmpfs (with host-side rename races), the kernel facts
parsers, the audit chain and the status rule."""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from pathlib import Path

import oracles
import pytest

from agent.cdp import merkle
from agent.destroy import chain_integrity_seal as seal
from agent.destroy import filesystem_destruction as fsd
from agent.destroy import lifecycle_completion, multipass_overwrite, wipe

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A private tmpfs mounted for this test (unmounted afterwards)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if _libc.mount(b"tmpfs", os.fsencode(mnt), b"tmpfs", 0, b"size=64m,mode=0755") != 0:
        pytest.fail(f"mount tmpfs: {os.strerror(ctypes.get_errno())}")
    try:
        yield mnt
    finally:
        _libc.umount2(os.fsencode(mnt), 2)


def _root_fd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _wipe_both(tmp_path, write, ranges_of, passes):
    """The native wipe and the Python oracle run on two identical files."""
    out = []
    for name, fn in (("native", wipe.wipe_ranges), ("oracle", oracles.py_wipe)):
        p = tmp_path / name
        with open(p, "wb") as f:
            write(f)
        fd = os.open(p, os.O_RDWR)
        try:
            ranges = ranges_of(fd)
            r = fn(fd, ranges, passes)
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        out.append((p, ranges, r, data))
    return out


def test_wipe_overwrites_reads_back_zero_leaves_holes_and_matches_the_oracle(tmp_path):
    """The wipe writes every pass over the data ranges only, reads back zeros and returns
    one SHA-256 leaf per 4 KiB block (short last block zero-padded), as the Python oracle."""
    def write(f):
        f.write(b"S" * 5000)
        f.seek(1 << 20)
        f.write(b"T" * 100)

    (p, ranges, r, data), (_, oranges, o, _) = _wipe_both(
        tmp_path, write, lambda fd: wipe.data_ranges(fd, os.fstat(fd).st_size),
        ["random", "ones", "zeros"])
    assert sum(n for _, n in ranges) < (1 << 20)  # the hole is not a data range
    assert r.bytes == sum(n for _, n in ranges)
    assert data == bytes(len(data))
    assert r.nonzero_blocks == 0
    assert r.blocks == len(r.leaf_digests) // 32
    leaves = [r.leaf_digests[i:i + 32] for i in range(0, len(r.leaf_digests), 32)]
    assert merkle.merkle_root(leaves) == merkle.zero_root(r.blocks)
    assert os.stat(p).st_blocks * 512 < (1 << 20)  # still sparse
    assert ranges == oranges
    assert (r.bytes, r.blocks, r.nonzero_blocks, r.leaf_digests) == \
        (o.bytes, o.blocks, o.nonzero_blocks, o.leaf_digests)


def test_wipe_reports_nonzero_readback_as_the_oracle(tmp_path):
    """A final pass that is not zeros is reported block by block in nonzero_blocks."""
    (_, _, r, _), (_, _, o, _) = _wipe_both(
        tmp_path, lambda f: f.write(b"x" * 8192), lambda fd: [(0, 8192)], ["ones"])
    assert r.nonzero_blocks == 2 and r.blocks == 2
    assert (r.nonzero_blocks, r.blocks, r.leaf_digests) == (o.nonzero_blocks, o.blocks, o.leaf_digests)


def test_present_ranges_cover_the_pages_the_oracle_finds():
    """The native present_ranges of a stopped process cover exactly the pages the Python
    oracle finds from smaps and pagemap."""
    import signal
    import subprocess

    # cat has answered one line: it is past its start-up, in its read loop; then stopped
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdin.write(b"ready\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ready\n"
        os.kill(proc.pid, signal.SIGSTOP)
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            os.sched_yield()

        def pages(ranges):
            return {a + i for a, n in ranges for i in range(0, n, oracles.PAGE)}

        native = pages(wipe.present_ranges(proc.pid))
        assert native and native == pages(oracles.py_present_ranges(proc.pid))
    finally:
        proc.kill()
        proc.wait()


def test_present_ranges_find_a_secret_in_private_memory():
    """present_ranges covers the private resident memory that holds a live secret."""
    secret = os.urandom(16).hex().encode() * 4
    buf = bytearray(secret)  # noqa: F841 - keep it resident
    ranges = wipe.present_ranges(os.getpid())
    fd = os.open(f"/proc/{os.getpid()}/mem", os.O_RDONLY)
    found = False
    try:
        for addr, n in ranges:
            try:
                if secret in os.pread(fd, n, addr):
                    found = True
                    break
            except OSError:
                continue
    finally:
        os.close(fd)
    assert found


def test_destroy_tree_counts_wipes_and_unlinks_everything(tmpfs):
    """Files, hard links (once per inode), symlinks, FIFOs, sparse files and a tree deeper
    than the open-fd budget are wiped in place and unlinked, with exact counts."""
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    (tmpfs / "a").write_bytes(secret * 1000)
    (tmpfs / "b").write_bytes(secret)
    os.link(tmpfs / "a", tmpfs / "a2")
    os.symlink("a", tmpfs / "sym")
    os.mkfifo(tmpfs / "fifo")
    with open(tmpfs / "sparse", "wb") as f:
        f.seek(4 << 20)
        f.write(secret)
    deep = tmpfs
    for _ in range(fsd.MAX_OPEN_DIRS + 30):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(secret)
    keep = {n: os.open(tmpfs / n, os.O_RDONLY) for n in ("a", "b", "sparse")}
    keep["leaf"] = os.open(deep / "leaf", os.O_RDONLY)
    root = _root_fd(tmpfs)
    try:
        s = fsd.destroy_tree(root, ["random", "ones", "zeros"])
        for fd in keep.values():
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            assert secret not in data and data == bytes(len(data))
        assert os.fstat(keep["sparse"]).st_blocks * 512 < (1 << 20)
    finally:
        os.close(root)
        for fd in keep.values():
            os.close(fd)
    assert os.listdir(tmpfs) == []
    assert (s.files, s.hardlinks, s.symlinks, s.fifos) == (4, 1, 1, 1)
    assert s.dirs == fsd.MAX_OPEN_DIRS + 30
    assert s.sparse_files == 1
    assert s.unlinked == 4 + 1 + 1 + 1 + s.dirs
    assert s.nonzero_blocks == 0 and s.races == 0
    assert len(b"".join(s.leaves)) == 32 * s.blocks


def test_destroy_tree_never_follows_symlinks_even_under_host_side_races(tmpfs, tmp_path):
    """While a thread keeps swapping a file for symlinks to a host file and directory,
    the wipe never writes the host file nor removes anything outside the tmpfs."""
    host = tmp_path / "host.txt"
    host.write_bytes(b"HOST" * 1024)
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    (hostdir / "inner").write_bytes(b"INNER")
    before = (host.read_bytes(), os.stat(host).st_mtime_ns, sorted(os.listdir(hostdir)))
    for i in range(200):
        (tmpfs / f"f{i}").write_bytes(b"x" * 4096)
    os.symlink(host, tmpfs / "abs")
    os.symlink("../" * 20 + str(host).lstrip("/"), tmpfs / "rel")
    os.symlink(hostdir, tmpfs / "dirlink")
    stop = threading.Event()

    def racer():
        n = 0
        while not stop.is_set():
            n += 1
            tmp = tmpfs / f".t{n}"
            try:
                os.symlink(host if n % 2 else hostdir, tmp)
                os.rename(tmp, tmpfs / f"f{n % 200}")
            except OSError:
                pass

    t = threading.Thread(target=racer)
    t.start()
    root = _root_fd(tmpfs)
    try:
        for _ in range(3):
            fsd.destroy_tree(root, ["ones", "zeros"])
    finally:
        stop.set()
        t.join()
        os.close(root)
    assert (host.read_bytes(), os.stat(host).st_mtime_ns, sorted(os.listdir(hostdir))) == before
    assert (hostdir / "inner").read_bytes() == b"INNER"


def test_destroy_tree_does_not_enter_or_unlink_other_mounts(tmpfs, tmp_path):
    """A mount found inside the tree (another device) is neither entered nor unlinked."""
    (tmpfs / "m").mkdir()
    (tmpfs / "f").write_bytes(b"data")
    inner = tmpfs / "m"
    assert _libc.mount(b"tmpfs", os.fsencode(inner), b"tmpfs", 0, b"size=1m") == 0
    try:
        (inner / "other").write_bytes(b"KEEP")
        root = _root_fd(tmpfs)
        try:
            s = fsd.destroy_tree(root, ["zeros"])
        finally:
            os.close(root)
        assert s.mounts_skipped == 1
        assert (inner / "other").read_bytes() == b"KEEP"
    finally:
        _libc.umount2(os.fsencode(inner), 2)


def test_init_on_free_prefers_cmdline_then_kernel_config():
    """init_on_free comes from the kernel command line (before `--`), else the config."""
    cfg_off = "# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\n"
    cfg_on = "CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n"
    assert multipass_overwrite.init_on_free("quiet init_on_free=1", cfg_off) == (True, "cmdline")
    assert multipass_overwrite.init_on_free("init_on_free=0", cfg_on) == (False, "cmdline")
    assert multipass_overwrite.init_on_free("quiet -- init_on_free=1", cfg_on) == \
        (True, "kernel_config")
    assert multipass_overwrite.init_on_free("quiet", cfg_off) == (False, "kernel_config")
    assert multipass_overwrite.init_on_free("quiet", "") == (False, "unknown")


def test_audit_chain_matches_its_written_definition():
    """The audit head is the documented NUL-joined SHA-256 chain over seq/kind/hash/at."""
    events = [{"seq": 1, "kind": "created", "hash": "", "at": "2026-03-01T14:00:00Z"},
              {"seq": 2, "kind": "exec", "hash": "ab" * 32, "at": "2026-03-01T14:01:00Z"},
              {"seq": 3, "kind": "destroy_requested", "hash": "", "at": "2026-03-01T14:30:00Z"}]
    h = hashlib.sha256(b"").hexdigest()
    for e in events:
        msg = b"\x00".join([h.encode(), str(e["seq"]).encode(), e["kind"].encode(),
                            e["hash"].encode(), e["at"].encode()])
        h = hashlib.sha256(msg).hexdigest()
    assert seal.audit_head(events) == h
    assert seal.audit_head(events[:2]) != h


def test_chain_recheck_detects_evidence_changed_after_sealing():
    """steps_verified stops at the first step whose evidence changed after it was sealed."""
    from agent.cdp import chain

    evidence = [{"step": i, "ok": True} for i in range(1, 7)]
    sealed, prev = {}, chain.GENESIS
    for (n, sub, op), ev in zip(chain.STEPS[:6], evidence, strict=True):
        prev = chain.chain_step(prev, n, sub, op, chain.evidence_hash(ev)[7:])
        sealed[n] = prev
    assert seal.verify_chain(evidence, sealed) == 6
    evidence[3]["ok"] = False
    assert seal.verify_chain(evidence, sealed) == 3


def test_status_rule():
    """destroyed only for a request with every step ok; expired for other reasons;
    expired_unclean whenever a step failed."""
    ok = [{"ok": True}] * 7
    assert lifecycle_completion.final_status(ok, "requested") == "destroyed"
    assert lifecycle_completion.final_status(ok, "oom") == "expired"
    assert lifecycle_completion.final_status(ok, "ttl_expired") == "expired"
    bad = ok[:3] + [{"ok": False}] + ok[4:]
    assert lifecycle_completion.final_status(bad, "requested") == "expired_unclean"


def _receipts(sid: str, n: int) -> list[dict]:
    from agent.cdp.receipt import build_receipt
    from agent.keys.session import SessionKey

    key = SessionKey.generate(sid)
    h = hashlib.sha256(b"").hexdigest()
    return [build_receipt({"session_id": sid, "seq": i, "command_sha256": h,
                           "input_sha256": h, "output_sha256": h, "stderr_sha256": h,
                           "exit_code": 0, "timed_out": False,
                           "started_at": "2026-03-01T14:00:00Z",
                           "finished_at": "2026-03-01T14:00:01Z"}, key)
            for i in range(1, n + 1)]


def _ctx(record):
    from agent.destroy.context import DestroyContext

    return DestroyContext(sandbox=None, session=record, session_key=None, passes=["zeros"],
                          reason="agent_recovery", node_id="n", agent_version="v",
                          revoke=lambda: None)


async def test_receipts_root_and_audit_seal_from_the_journal_after_recovery():
    """Without the receipts (recovery), step 8 roots the journal's exec hashes, which
    equal the receipts' leaves, and step 7 seals the log without flagging it."""
    from agent.cdp.receipt import receipt_leaf, receipts_root
    from agent.destroy.context import DestroyState
    from agent.service.model import SessionRecord

    sid = "sess_00112233445566ff"
    rs = _receipts(sid, 3)
    events = [{"seq": 1, "kind": "created", "hash": "aa" * 32, "at": "2026-03-01T14:00:00Z"}]
    events += [{"seq": i + 2, "kind": "exec", "hash": receipt_leaf(r).hex(),
                "at": "2026-03-01T14:00:01Z"} for i, r in enumerate(rs)]
    record = SessionRecord(session_id=sid, audit_events=events, exec_count=3)
    st = DestroyState()
    base = lifecycle_completion.base_fields(_ctx(record), st)
    assert base["receipts_root"] == receipts_root(rs)
    assert base["receipts_source"] == "audit_log"
    ev: dict = {}
    with pytest.raises(Exception, match="evidence changed"):  # no steps 1-6 sealed here
        await seal.run(_ctx(record), st, ev)
    assert ev["audit_events"] == 5 and "receipts_consistent" not in ev
    live = SessionRecord(session_id=sid, audit_events=events, exec_count=3, receipts=rs)
    assert lifecycle_completion.base_fields(_ctx(live), st)["receipts_root"] == \
        receipts_root(rs)


async def test_audit_seal_flags_receipts_that_disagree_with_the_log():
    """A receipt missing from the audit log (or an extra one) fails step 7."""
    from agent.cdp.receipt import receipt_leaf
    from agent.destroy.context import DestroyState
    from agent.service.model import SessionRecord

    sid = "sess_00112233445566ee"
    rs = _receipts(sid, 2)
    events = [{"seq": 1, "kind": "exec", "hash": receipt_leaf(rs[0]).hex(), "at": "x"}]
    record = SessionRecord(session_id=sid, audit_events=events, exec_count=2, receipts=rs)
    ev: dict = {}
    with pytest.raises(Exception, match="audit log and receipts disagree"):
        await seal.run(_ctx(record), DestroyState(), ev)
    assert ev["receipts_consistent"] is False


def test_a_zombie_has_nothing_to_wipe_and_is_not_a_failure():
    """A process that exited but is not reaped yet has no memory: planned as empty, the
    wipe counts it as done, not failed."""
    import time

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(500):
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.002)
        plan, total = multipass_overwrite.plan_processes([pid])
        w = multipass_overwrite.wipe_processes(plan, ["zeros"])
        assert total == 0 and w["failed"] == 0 and w["processes"] + w["exited"] == 1
    finally:
        os.waitpid(pid, 0)
