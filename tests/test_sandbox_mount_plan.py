"""The mount plan (agent/sandbox/mounts.py, applied by native/init/sandbox.c): the sandbox's
mount table and files are exactly the plan's in every tier, a plan op that fails stops
the sandbox before anything runs, and a plan that breaks the rules is refused by the agent
and by nrx-init's parser alike."""

from __future__ import annotations

import os
import socket
import stat
import struct
import tempfile

import pytest
import test_sandbox_fixtures as fx

from agent.destroy import residue
from agent.sandbox import SandboxEngine, initproto, mounts
from agent.sandbox.engine import INIT_BIN, SandboxError, _spawn_helper

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures

LOCKABLE = {"nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime"}
FLAG_NAMES = {mounts.RO: "ro", mounts.NOSUID: "nosuid", mounts.NODEV: "nodev",
              mounts.NOEXEC: "noexec"}


def mountinfo(text: str) -> list[dict]:
    """The lines of a mountinfo text as {root, point, opts (set), fs, super (dict)}."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        sup = dict(kv.partition("=")[::2] for kv in r[2].split(","))
        out.append({"root": f[3], "point": f[4], "opts": set(f[5].split(",")), "fs": r[0],
                    "super": sup})
    return out


def host_mount_of(path: str, table: list[dict]) -> tuple[dict, str]:
    """The host mount that holds `path` (the last one mounted at its deepest mount point)
    and what the bind shows as its root there."""
    real = os.path.realpath(path)
    best = max((m for m in table if real == m["point"] or real.startswith(
        m["point"].rstrip("/") + "/")), key=lambda m: len(m["point"]))
    best = [m for m in table if m["point"] == best["point"]][-1]
    rest = real[len(best["point"].rstrip("/")):]
    return best, (best["root"].rstrip("/") + rest) or "/"


def expected_mounts(plan: list[mounts.SetupOp], tmpfs_bytes: int, inodes: int) -> list[tuple]:
    """(mount point, root, fs type, per-mount options) the plan makes, in order: the
    session tmpfs as /, then every bind (with the host's submounts of a recursive one) and
    proc.  A remounted bind has the options asked for plus those the kernel locked on the
    source; a bind with no flags has the source's."""
    with open("/proc/self/mountinfo") as f:
        host = mountinfo(f.read())
    out = [("/", "/", "tmpfs", {"rw", "nosuid", "nodev", "relatime"},
            {"size": f"{tmpfs_bytes // 1024}k", "nr_inodes": str(inodes), "mode": "755"})]
    for op in plan:
        if op.kind == mounts.OP_PROC:
            out.append((op.dest, "/", "proc", {"rw", "nosuid", "nodev", "noexec", "relatime"},
                        None))
        elif op.kind == mounts.OP_BIND:
            src = os.fsdecode(op.arg)
            m, root = host_mount_of(src, host)
            opts = set(m["opts"])
            if op.flags & (mounts.RO | mounts.NOSUID | mounts.NODEV | mounts.NOEXEC):
                opts = ({"ro" if op.flags & mounts.RO else "rw"}
                        | {n for bit, n in FLAG_NAMES.items() if op.flags & bit and n != "ro"}
                        | (m["opts"] & LOCKABLE))
            out.append((op.dest, root, m["fs"], opts, None))
            if op.flags & mounts.REC:
                real = os.path.realpath(src)
                out += [(op.dest + s["point"][len(real):], s["root"], s["fs"], s["opts"], None)
                        for s in host if s["point"].startswith(real.rstrip("/") + "/")]
    return out


async def test_mount_table_is_the_plan_in_every_tier(engine):
    """In a sandbox of each configured tier, /proc/self/mountinfo lists exactly the plan's
    mounts in its order, with their fs types, roots and per-mount flags, and the session
    tmpfs with the tier's size and inode limit."""
    cfg = engine.cfg
    for tier in sorted(cfg.tiers):
        sb = await engine.create(fx.new_session_id(), tier=tier, classification="general")
        try:
            r = await sb.exec("cat /proc/self/mountinfo", timeout=10)
            assert r.exit_code == 0, r.stderr
            plan = mounts.setup_plan(engine.binds, engine.links, sandbox_id=1000)
            want = expected_mounts(plan, cfg.tmpfs_bytes(tier), cfg.tiers[tier].tmpfs_inodes)
            got = mountinfo(r.stdout.decode())
            assert [(m["point"], m["root"], m["fs"], m["opts"]) for m in got] == \
                [w[:4] for w in want], tier
            sup = {k: got[0]["super"].get(k) for k in want[0][4]}
            assert sup == want[0][4], tier
        finally:
            await sb.teardown()


def walk(dirfd: int, rel: str = "") -> dict[str, os.stat_result]:
    """Every path in the session tmpfs as the host sees it (no submounts), by inside path."""
    out = {}
    for name in os.listdir(dirfd):
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        path = f"{rel}/{name}"
        out[path] = st
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            try:
                out.update(walk(fd, path))
            finally:
                os.close(fd)
    return out


async def test_session_tmpfs_holds_exactly_the_plans_files(sandbox):
    """The session tmpfs holds the plan's directories, files and links and the session's
    identity files (nrx-init's set_identity: /etc/hostname, /etc/hosts) and nothing else,
    each with the planned type, mode, owner, content or link text (mount points as empty
    directories and files: the host's view has no submounts)."""
    eng = sandbox._engine
    plan = mounts.setup_plan(eng.binds, eng.links, sandbox_id=1000)
    top = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=sandbox.root_fd)
    try:
        found = walk(top)
    finally:
        os.close(top)
    made = [op for op in plan if op.kind in (mounts.OP_DIR, mounts.OP_FILE, mounts.OP_SYMLINK)]
    h = sandbox.hostname
    made += [mounts.file_op("/etc/hostname", 0o644, h),
             mounts.file_op("/etc/hosts", 0o644,
                            f"127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\tlocalhost\n")]
    assert sorted(found) == sorted(op.dest for op in made)
    base = sandbox.slot_root_uid
    for op in made:
        st = found[op.dest]
        rel = op.dest.lstrip("/")
        owner = base + (0 if op.uid == mounts.NO_ID else op.uid)
        assert (st.st_uid, st.st_gid) == (owner, owner), op.dest
        if op.kind == mounts.OP_SYMLINK:
            assert os.readlink(rel, dir_fd=sandbox.root_fd).encode() == op.arg
            continue
        assert stat.S_IMODE(st.st_mode) == op.mode, op.dest
        assert stat.S_ISDIR(st.st_mode) == (op.kind == mounts.OP_DIR), op.dest
        if op.kind == mounts.OP_FILE:
            fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sandbox.root_fd)
            try:
                assert os.read(fd, mounts.MAX_OP_DATA + 1) == op.arg, op.dest
            finally:
                os.close(fd)


def nothing_left(eng: SandboxEngine, sid: str) -> None:
    """No sandbox, mount, session directory, cgroup or process with the slot's ids."""
    assert eng.live == {} and eng.slots.in_use() == set()
    root = mounts.mount_path(eng.runtime_dir, sid)
    assert not root.exists() and not mounts.is_mountpoint(root)
    assert sid not in eng.cgroups.leftovers()
    span = eng.cfg.sandbox.uid_slot_size
    ids = [(eng.slots.base, eng.slots.base + span)]
    assert residue.processes_with_ids(ids, ids) == 0


async def test_a_bind_whose_source_vanished_fails_create_and_leaves_nothing(sandbox_cfg):
    """A configured runtime directory removed after the agent started makes its bind op
    fail in nrx-init: create raises with the op's index, kind and errno (no path), and no
    sandbox, mount, cgroup or process is left."""
    src = tempfile.mkdtemp(prefix="nrx-plan-", dir="/var/tmp")
    sandbox_cfg.sandbox.ro_binds = ["/usr", src]
    eng = SandboxEngine(sandbox_cfg)
    try:
        assert (src, src) in eng.binds
        os.rmdir(src)
        sid = fx.new_session_id()
        with pytest.raises(SandboxError, match=r"mount plan op \d+ \(bind\) failed: ENOENT") as e:
            await eng.create(sid, tier="tiny", classification="general")
        assert src not in str(e.value) and os.path.basename(src) not in str(e.value)
        nothing_left(eng, sid)
    finally:
        await eng.aclose()
        if os.path.isdir(src):
            os.rmdir(src)


async def test_no_plan_op_follows_a_symlink(sandbox_cfg, monkeypatch):
    """An op whose dest lies behind a symlink of the plan (/dev/fd, which points at the
    host's /proc before pivot_root) fails (ENOTDIR: the link is not a directory, it is not
    followed) instead of writing through it, and create leaves nothing.  The plan is extended by the test: the agent's own plan has
    no such op, and config cannot make one."""
    real = mounts.setup_plan

    def with_escape(*a, **kw):
        return [*real(*a, **kw), mounts.file_op("/dev/fd/nrx-escape", 0o644, "x")]

    monkeypatch.setattr(mounts, "setup_plan", with_escape)
    eng = SandboxEngine(sandbox_cfg)
    try:
        sid = fx.new_session_id()
        with pytest.raises(SandboxError, match=r"mount plan op \d+ \(file\) failed: ENOTDIR"):
            await eng.create(sid, tier="tiny", classification="general")
        nothing_left(eng, sid)
    finally:
        await eng.aclose()


GOOD = mounts.dir_op("/x", 0o755)
BAD_OPS = {
    "relative dest": mounts.dir_op("x", 0o755),
    "dotdot dest": mounts.dir_op("/x/../..", 0o755),
    "dot dest": mounts.dir_op("/x/.", 0o755),
    "empty component": mounts.dir_op("/x//y", 0o755),
    "trailing slash": mounts.dir_op("/x/", 0o755),
    "the root itself": mounts.dir_op("/", 0o755),
    "dest too long": mounts.dir_op("/" + "a" * mounts.MAX_OP_PATH, 0o755),
    "relative bind source": mounts.bind_op("usr", "/usr", mounts.RO),
    "dotdot bind source": mounts.bind_op("/usr/..", "/usr", mounts.RO),
    "unknown bind flag": mounts.bind_op("/usr", "/usr", 1 << 10),
    "unknown op kind": mounts.SetupOp(99, "/x"),
    "file too large": mounts.file_op("/x", 0o644, "a" * (mounts.MAX_OP_DATA + 1)),
    "mode beyond 07777": mounts.dir_op("/x", 0o10000),
    "flags on a dir": mounts.SetupOp(mounts.OP_DIR, "/x", mode=0o755, flags=mounts.RO),
    "owner of a symlink": mounts.SetupOp(mounts.OP_SYMLINK, "/x", b"y", uid=0, gid=0),
    "empty symlink": mounts.symlink_op("/x", ""),
    "NUL in a symlink": mounts.symlink_op("/x", "a\0b"),
    "argument to proc": mounts.SetupOp(mounts.OP_PROC, "/proc", b"x"),
}


def raw_config(root: str, plan_records: bytes, extra: bytes = b"") -> bytes:
    """A CONFIG message the agent's encoder would refuse: a valid config whose mount plan
    records are `plan_records` (as sent on the wire), followed by `extra`."""
    cfg = initproto.InitConfig(hostname="h", root=root, tmpfs_size=1 << 20, tmpfs_inodes=64,
                               uid_base=1 << 30, gid_base=1 << 30, map_size=65536,
                               mount_plan=[GOOD], seccomp_bpf=bytes(8))
    return cfg.encode().replace(initproto.encode_op(GOOD), plan_records) + extra


def run_init(msg: bytes, go: bytes | None = None) -> tuple[int, bytes]:
    """Run nrx-init on one CONFIG message (and `go` after it, else EOF); (exit status,
    its first reply, b"" when it sent none)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, initproto.MAX_MSG + 65536)
        ours.send(msg)
        if go is not None:
            ours.send(go)
        ours.shutdown(socket.SHUT_WR)
        try:
            pid = _spawn_helper(str(INIT_BIN), theirs.fileno())
        finally:
            theirs.close()
        reply = ours.recv(65536)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), reply


@pytest.mark.parametrize("case", sorted(BAD_OPS))
def test_a_plan_op_that_breaks_a_rule_is_refused_by_both_sides(case, tmp_path):
    """The agent raises PlanError for the op before anything starts, and nrx-init, sent
    it anyway, refuses the config as malformed before it touches anything (no mount)."""
    op = BAD_OPS[case]
    with pytest.raises(mounts.PlanError):
        op.check()
    with pytest.raises(mounts.PlanError):
        initproto.InitConfig(hostname="h", root="/r", tmpfs_size=1, tmpfs_inodes=64,
                             uid_base=1, gid_base=1, map_size=1, mount_plan=[GOOD, op],
                             seccomp_bpf=bytes(8)).encode()
    code, reply = run_init(raw_config(str(tmp_path), initproto.encode_op(GOOD)
                                      + initproto.encode_op(op)))
    assert code == 2 and reply[4:] == b"nrx-init: malformed config message", (case, reply)
    assert not mounts.is_mountpoint(tmp_path)


def test_plan_framing_is_bounded(tmp_path):
    """nrx-init refuses a config with no mount plan, more than MAX_OPS ops, an op record
    whose lengths do not add up, or a tag it does not know; the agent will not encode the
    first two; a plan of exactly MAX_OPS ops parses (it fails later, at the cgroup step)."""
    one = initproto.encode_op(GOOD)
    cut = initproto._tlv(initproto.T_MOUNT_OP, one[8:-1])
    bad = {"no plan": b"", "too many ops": one * (mounts.MAX_OPS + 1), "short op": cut,
           "unknown tag": one + initproto._tlv(99, b"")}
    for case, records in bad.items():
        code, reply = run_init(raw_config(str(tmp_path), records))
        assert code == 2 and reply[4:] == b"nrx-init: malformed config message", case
    for n in (0, mounts.MAX_OPS + 1):
        with pytest.raises(mounts.PlanError):
            mounts.check_plan([GOOD] * n)
    root = tmp_path / "s" / "root"
    code, reply = run_init(raw_config(str(root), one * mounts.MAX_OPS),
                           initproto.encode_go(["/nonexistent/cgroup.procs"]))
    assert code == 1 and b"malformed" not in reply and b"joining cgroup" in reply
    assert not mounts.is_mountpoint(root)


def test_no_pid1_without_a_go_naming_its_cgroups(tmp_path):
    """nrx-init mounts the session tmpfs while the agent makes the cgroups, but clones no
    PID 1 until a GO names at least one cgroup: on EOF (the agent gave up), an empty GO, a
    GO with another tag, or another message instead, it sends no PID, unmounts the tmpfs
    and exits non-zero."""
    import struct

    go = struct.pack("=I", initproto.MSG_GO)
    cases = {"eof": None, "empty GO": go,
             "GO with another tag": go + initproto._tlv(initproto.T_HOSTNAME, b"h"),
             "CONFIG again": raw_config("/r", initproto.encode_op(GOOD))}
    for case, msg in cases.items():
        root = tmp_path / case.replace(" ", "-") / "root"
        code, reply = run_init(raw_config(str(root), initproto.encode_op(GOOD)), msg)
        assert code == 1, case
        assert reply[:4] != struct.pack("=I", initproto.MSG_PID), case
        assert reply == b"" if msg is None else b"malformed GO" in reply, case
        assert root.is_dir() and not mounts.is_mountpoint(root), case


@pytest.mark.parametrize("key", ["ro_binds", "usr_links"])
def test_a_config_that_makes_a_bad_plan_stops_the_engine_at_start(sandbox_cfg, key):
    """A runtime bind that climbs with `..` or a merged-usr link name with a slash is
    refused when the engine starts (the daemon does not start), not at each create."""
    setattr(sandbox_cfg.sandbox, key, ["/usr/../usr"] if key == "ro_binds" else ["bin/x"])
    with pytest.raises(mounts.PlanError):
        SandboxEngine(sandbox_cfg)


def test_plan_of_the_host_runtime():
    """The agent's plan binds /usr read-only, recursively, nosuid and nodev into a
    directory made for it, adds only the merged-usr links the host has, and encodes to
    records of the documented layout."""
    binds = [("/usr", "/usr")]
    links = [("bin", "usr/bin")]
    plan = mounts.setup_plan(binds, links, sandbox_id=1000)
    kinds = [(mounts.OP_NAMES[op.kind], op.dest) for op in plan]
    assert kinds[:3] == [("dir", "/usr"), ("bind", "/usr"), ("symlink", "/bin")]
    assert plan[1].flags == mounts.REC | mounts.RO | mounts.NOSUID | mounts.NODEV
    assert ("proc", "/proc") in kinds and ("dir", "/work") in kinds
    work = next(op for op in plan if op.dest == "/work")
    assert (work.mode, work.uid, work.gid) == (0o700, 1000, 1000)
    rec = initproto.encode_op(plan[1])
    tag, length = struct.unpack_from("=II", rec)
    head = struct.unpack_from("=7I", rec, 8)
    assert tag == initproto.T_MOUNT_OP and length == 28 + 4 + 4
    assert head == (mounts.OP_BIND, plan[1].flags, 0, mounts.NO_ID, mounts.NO_ID, 4, 4)
    assert rec[36:] == b"/usr/usr"
    nested = mounts.setup_plan([("/srv/a/b", "/opt/a/b"), ("/srv/c", "/opt/c")], [("opt", "x")],
                               sandbox_id=1000)
    assert [op.dest for op in nested[:6]] == ["/opt", "/opt/a", "/opt/a/b", "/opt/a/b",
                                               "/opt/c", "/opt/c"]
    assert not any(op.kind == mounts.OP_SYMLINK and op.dest == "/opt" for op in nested)
