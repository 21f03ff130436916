"""What a command sees from inside a sandbox (SPEC 3): every layer checked from inside,
against the real kernel."""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat

import pytest
import test_sandbox_fixtures as fx
import trio

from agent.sandbox import network, userns

new_session_id = fx.new_session_id
sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


async def sh(sb, cmd: str, **kw):
    return await sb.exec(cmd, timeout=kw.pop("timeout", 20), **kw)


async def test_uid_map_is_the_sessions_unique_host_range(engine):
    """Each sandbox maps 0..size-1 onto its own slot's host range; two live sandboxes differ."""
    a = await engine.create(new_session_id(), tier="tiny", classification="general")
    b = await engine.create(new_session_id(), tier="tiny", classification="general")
    try:
        size = engine.cfg.sandbox.uid_slot_size
        base = engine.cfg.sandbox.uid_base
        for sb in (a, b):
            r = await sh(sb, "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g")
            lines = r.stdout.decode().split("\n")
            want = [0, base + sb.slot * size, size]
            assert [int(x) for x in lines[0].split()] == want
            assert [int(x) for x in lines[1].split()] == want
            assert lines[2:4] == ["1000", "1000"]
            assert sb.host_uid == base + sb.slot * size + 1000
            assert userns.read_map(sb.init_pid) == [tuple(want)]
        assert a.slot != b.slot and a.host_uid != b.host_uid
    finally:
        await a.teardown()
        await b.teardown()


async def test_host_sees_the_sandbox_users_host_uid(sandbox):
    """A process started in the sandbox runs on the host as the slot's unprivileged uid."""
    await sh(sandbox, "sleep 30 >/dev/null 2>&1 &")
    pids = [p for p in sandbox.cgroup.pids() if p != sandbox.init_pid]
    assert pids
    for p in pids:
        st = os.stat(f"/proc/{p}")
        assert (st.st_uid, st.st_gid) == (sandbox.host_uid, sandbox.host_gid)
        status = open(f"/proc/{p}/status").read()
        assert re.search(rf"^Uid:\s+{sandbox.host_uid}\s+{sandbox.host_uid}\s", status, re.M)


async def test_only_the_sandboxs_processes_are_visible(sandbox):
    """/proc inside lists PID 1 (nrx-init) and the command's own processes, nothing else."""
    r = await sh(sandbox, "cat /proc/1/comm; ls -d /proc/[0-9]* | wc -l")
    comm, count = r.stdout.decode().split()
    assert comm == "nrx-init"
    assert int(count) <= 4  # init, sh, ls, wc


async def test_hostname_is_random_and_per_sandbox(engine):
    """Each sandbox gets its own `nrx-` + 8 hex hostname, visible inside."""
    a = await engine.create(new_session_id(), tier="tiny", classification="general")
    b = await engine.create(new_session_id(), tier="tiny", classification="general")
    try:
        names = []
        for sb in (a, b):
            r = await sh(sb, "hostname; cat /etc/hostname")
            inside, file_name = r.stdout.decode().split()
            assert re.fullmatch(r"nrx-[0-9a-f]{8}", inside)
            assert inside == file_name == sb.hostname
            names.append(inside)
        assert names[0] != names[1]
        assert os.uname().nodename not in names
    finally:
        await a.teardown()
        await b.teardown()


async def test_network_is_loopback_only_with_no_route(sandbox):
    """Inside: only `lo`, up; no route in the main table; connecting out fails."""
    info = await trio.to_thread.run_sync(network.inspect, sandbox.init_pid)
    assert info["links"] == [("lo", True)]
    assert [r for r in info["routes"] if r[1] is not None or r[2] == 0] == []
    r = await sh(sandbox, "cat /proc/net/dev | tail -n +3 | cut -d: -f1; "
                 "python3 -c 'import socket; s=socket.socket(); s.settimeout(2); "
                 "s.connect((\"1.1.1.1\", 53))'")
    assert r.stdout.decode().split() == ["lo"]
    assert "Network is unreachable" in r.stderr.decode()
    r = await sh(sandbox, "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\", 0));"
                 " s.listen(); c=socket.create_connection(s.getsockname()); print(\"ok\")'")
    assert r.stdout == b"ok\n"


async def test_no_host_path_beyond_the_runtime(sandbox):
    """The root holds only the planned layout; /root, /etc/shadow, /var, /home are absent."""
    r = await sh(sandbox, "ls -A /; for p in /root /etc/shadow /var /home /boot /run; do "
                 "test -e $p && echo PRESENT $p; done; ls /etc")
    out = r.stdout.decode().split()
    assert "PRESENT" not in out
    top = set(out[: out.index("group")]) if "group" in out else set(out)
    assert {"usr", "proc", "dev", "etc", "work", "tmp", "input"} <= top
    assert {"group", "hostname", "hosts", "nsswitch.conf", "passwd"} <= set(out)
    r = await sh(sandbox, "ls /dev")
    assert sorted(r.stdout.decode().split()) == sorted(
        ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"])


async def test_usr_is_read_only(sandbox):
    """/usr is a read-only, nosuid bind: writing fails even where permissions would allow."""
    r = await sh(sandbox, "touch /usr/x 2>&1; grep ' /usr ' /proc/self/mountinfo")
    out = r.stdout.decode()
    assert "Read-only file system" in out or "Permission denied" in out
    opts = out.strip().splitlines()[-1].split()[5].split(",")
    assert "ro" in opts and "nosuid" in opts


async def test_writing_past_the_tmpfs_size_gives_enospc(sandbox):
    """The session tmpfs is size-limited: a 64 MiB write into a 16 MiB tmpfs ends in ENOSPC."""
    r = await sh(sandbox, "dd if=/dev/zero of=/work/big bs=1M count=64")
    assert r.exit_code != 0
    assert b"No space left on device" in r.stderr
    assert not r.oom_killed


async def test_memory_cap_oom_kills_and_fires_the_event(sandbox):
    """Without the agent's OOM guard, allocating past the tier's 64 MiB memory cap is
    OOM-killed by the kernel and the OOM watch reports it (sandbox.oom)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(sandbox.watch_oom, guard=False, headroom=0))
        r = await sh(sandbox, "exec python3 -c 'b = bytearray(b\"x\") * (256 * 1024 * 1024)'")
        assert r.exit_code == 137 and r.signal == 9
        assert r.oom_killed
        with trio.fail_after(5):
            await sandbox.oom.wait()
        assert not sandbox.oom_guarded and sandbox.cgroup.oom_kills() >= 1


async def test_fork_bomb_stops_at_pids_max(sandbox):
    """fork() fails with EAGAIN once the cgroup's pids.max (32) is reached; the sandbox lives on."""
    script = ("import os,time\npids=[]\ntry:\n for i in range(500):\n  p=os.fork()\n"
              "  if p==0:\n   time.sleep(60); os._exit(0)\n  pids.append(p)\n"
              "except OSError as e:\n print('stopped', len(pids), e.errno)\n"
              "for p in pids: os.kill(p, 9)\nfor p in pids: os.waitpid(p, 0)\n")
    r = await sh(sandbox, "python3 /input/data", input_data=script.encode())
    words = r.stdout.decode().split()
    assert words[0] == "stopped" and words[2] == "11"
    assert 20 <= int(words[1]) < 32
    assert (await sh(sandbox, "echo alive")).stdout == b"alive\n"


async def test_every_capability_set_is_empty_and_no_new_privs(sandbox):
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb are all zero and NoNewPrivs is 1 for a command."""
    r = await sh(sandbox, "grep -E '^(Cap|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[k], 16) == 0, k
    assert fields["NoNewPrivs"] == "1"


async def test_setuid_binary_gains_nothing(sandbox):
    """A setuid-root binary planted in /work runs with the caller's uid (nosuid, no_new_privs)."""
    fd = os.open("work/id", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755,
                 dir_fd=sandbox.root_fd)
    with open("/usr/bin/id", "rb") as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst)
        os.fchown(dst.fileno(), sandbox.slot_root_uid, sandbox.slot_root_gid)  # root inside
        os.fchmod(dst.fileno(), 0o4755)
    r = await sh(sandbox, "stat -c '%u %A' /work/id; /work/id -u; /work/id -ru")
    lines = r.stdout.decode().split("\n")
    assert lines[0] == "0 -rwsr-xr-x"
    assert lines[1:3] == ["1000", "1000"]
    assert stat.S_ISUID & os.stat("work/id", dir_fd=sandbox.root_fd).st_mode


async def test_commands_run_under_the_classs_seccomp_filter(sandbox):
    """Every command runs with a seccomp filter installed (Seccomp: 2) and at least one
    filter attached."""
    r = await sh(sandbox, "grep -E '^Seccomp(_filters)?:' /proc/self/status")
    fields = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
    assert fields["Seccomp"] == "2"
    assert int(fields.get("Seccomp_filters", "1")) >= 1


async def test_session_id_must_be_a_safe_name(engine):
    """A session id that could escape the runtime dir is refused before anything is made."""
    from agent.sandbox import SandboxError

    for bad in ("../x", "a/b", "", "x" * 65):
        with pytest.raises(SandboxError):
            await engine.create(bad, tier="tiny", classification="general")
    assert not engine.slots.in_use()


async def test_commands_have_no_controlling_terminal(sandbox):
    """Each command leads its own session with no controlling tty (nothing to TIOCSTI into),
    and PID 1 is outside the agent's session too."""
    r = await sh(sandbox, "cat /proc/self/stat /proc/1/stat")
    me, init = (line.rsplit(")", 1)[1].split() for line in r.stdout.decode().splitlines())
    assert me[4] == "0" and init[4] == "0"  # tty_nr
    assert me[3] == me[2]  # session id == process group id (a session leader's group)
    assert os.getsid(0) != os.getsid(sandbox.init_pid)


async def test_rlimits_and_oom_score_of_commands(sandbox):
    """Commands run with core 0, nofile and fsize from config, and a positive OOM score
    (the sandbox dies before the agent)."""
    cfg = sandbox._engine.cfg
    r = await sh(sandbox, "ulimit -c; ulimit -n; ulimit -f; cat /proc/self/oom_score_adj")
    core, nofile, fsize_blocks, adj = r.stdout.decode().split()
    assert core == "0" and int(nofile) == cfg.sandbox.rlimit_nofile
    assert int(fsize_blocks) * 512 == sandbox.tmpfs_bytes  # dash reports 512-byte blocks
    assert int(adj) == cfg.sandbox.sandbox_oom_score_adj > 0
    assert open(f"/proc/{sandbox.init_pid}/oom_score_adj").read().strip() == adj


async def test_ipc_and_cgroup_namespaces_are_private(engine):
    """A SysV segment made in one sandbox is invisible in another and on the host; inside,
    /proc/self/cgroup shows the cgroup namespace root, not the host's tree."""
    a = await engine.create(new_session_id(), tier="tiny", classification="general")
    b = await engine.create(new_session_id(), tier="tiny", classification="general")
    try:
        r = await sh(a, "ipcmk -M 4096 && ipcs -m | grep -c '^0x'")
        assert r.exit_code == 0 and r.stdout.split()[-1] == b"1"
        r = await sh(b, "ipcs -m | grep -c '^0x'")
        assert r.stdout.strip() == b"0"
        assert a.namespaces["ipc"] != b.namespaces["ipc"]
        r = await sh(a, "cat /proc/self/cgroup")
        lines = r.stdout.decode().splitlines()
        assert lines and all(line.endswith(":/") for line in lines), lines
        assert engine.cfg.sandbox.cgroup_prefix not in r.stdout.decode()
    finally:
        await a.teardown()
        await b.teardown()
