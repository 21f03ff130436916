"""Exec (SPEC 4): input, environment, exit codes, timeouts, streaming and the one-at-a-time
rule, against real sandboxes."""

from __future__ import annotations

import os
import stat
import time

import pytest
import test_sandbox_fixtures as fx
import trio

from agent.sandbox import ExecBusy, SandboxGone
from agent.sandbox.exec import CHUNK

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


async def test_runs_sh_c_in_work_with_the_minimal_env_plus_env(sandbox):
    """The command runs via /bin/sh -c in /work with PATH, HOME, LANG, TMPDIR and `env`."""
    r = await sandbox.exec("pwd; env | sort", env={"FOO": "bar baz"}, timeout=10)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "/work"
    env = dict(line.split("=", 1) for line in lines[1:])
    assert env["HOME"] == "/work" and env["LANG"] == "C.UTF-8" and env["TMPDIR"] == "/tmp"
    assert env["FOO"] == "bar baz" and "/usr/bin" in env["PATH"]
    assert set(env) <= {"PATH", "HOME", "LANG", "TMPDIR", "FOO", "PWD", "SHLVL", "_"}
    assert r.exit_code == 0 and r.signal is None and not r.timed_out
    assert r.started_at.endswith("Z") and r.finished_at >= r.started_at


async def test_stdin_is_dev_null(sandbox):
    """stdin of a command is /dev/null: reading it ends at once."""
    r = await sandbox.exec("cat; readlink /proc/self/fd/0", timeout=10)
    assert r.stdout == b"/dev/null\n"


async def test_exit_codes_and_signals(sandbox):
    """exit N gives N; death by signal N gives 128+N and `signal` N."""
    assert (await sandbox.exec("exit 3", timeout=10)).exit_code == 3
    r = await sandbox.exec("kill -TERM $$", timeout=10)
    assert (r.exit_code, r.signal) == (143, 15)


async def test_input_data_content_and_permissions(sandbox):
    """input_data lands in /input/data owned by root inside, mode 0444, not replaceable."""
    data = bytes(range(256)) * 100
    r = await sandbox.exec("stat -c '%u %g %a' /input/data; rm -f /input/data; "
                           "echo x > /input/data; mv /input /in2; sha256sum /input/data",
                           input_data=data, timeout=10)
    out = r.stdout.decode().splitlines()
    assert out[0] == "0 0 444"
    import hashlib
    assert out[1].split()[0] == hashlib.sha256(data).hexdigest()
    st = os.stat("input/data", dir_fd=sandbox.root_fd, follow_symlinks=False)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (sandbox.slot_root_uid, 0o444)
    r = await sandbox.exec("cat /input/data", input_data="second", timeout=10)
    assert r.stdout == b"second"


async def test_planted_symlink_at_input_data_is_replaced_not_followed(sandbox, tmp_path):
    """A symlink planted at /input/data pointing to a host file leaves that file untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"host secret")
    os.symlink(str(victim), "input/data", dir_fd=sandbox.root_fd)
    os.symlink("/etc/passwd", "input/.data.x", dir_fd=sandbox.root_fd)
    r = await sandbox.exec("cat /input/data", input_data=b"customer data", timeout=10)
    assert r.stdout == b"customer data"
    assert victim.read_bytes() == b"host secret"
    st = os.stat("input/data", dir_fd=sandbox.root_fd, follow_symlinks=False)
    assert stat.S_ISREG(st.st_mode)


async def test_symlinked_input_dir_is_refused(sandbox, tmp_path):
    """If /input itself is replaced by a symlink, the write is refused, nothing lands outside."""
    os.rename("input", "input.old", src_dir_fd=sandbox.root_fd, dst_dir_fd=sandbox.root_fd)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), "input", dir_fd=sandbox.root_fd)
    with pytest.raises(OSError):
        await sandbox.exec("true", input_data=b"x", timeout=10)
    assert os.listdir(outside) == []


async def test_timeout_sigterm_then_sigkill_after_grace(sandbox):
    """A command ignoring SIGTERM is SIGKILLed after the grace; timed_out and 137 reported."""
    t0 = time.monotonic()
    r = await sandbox.exec("trap '' TERM; echo started; sleep 30", timeout=0.3)
    took = time.monotonic() - t0
    assert r.timed_out and r.exit_code == 137 and r.signal == 9
    assert r.stdout == b"started\n"
    assert 0.5 <= took < 3  # 0.3 s timeout + 0.3 s grace
    assert (await sandbox.exec("echo next", timeout=10)).stdout == b"next\n"


async def test_timeout_term_is_enough_for_a_polite_command(sandbox):
    """A command that dies on SIGTERM ends with 143 before the grace runs out."""
    r = await sandbox.exec("exec sleep 30", timeout=0.2)
    assert r.timed_out and (r.exit_code, r.signal) == (143, 15)


async def test_background_process_holding_stdout_does_not_hold_the_exec(sandbox):
    """When the leader exits the exec returns, even if a background child keeps stdout open."""
    t0 = time.monotonic()
    r = await sandbox.exec("sleep 30 & echo hi", timeout=10)
    assert r.stdout == b"hi\n" and r.exit_code == 0
    assert time.monotonic() - t0 < 2


async def test_stdout_and_stderr_arrive_in_order_and_interleave(sandbox):
    """Chunks reach on_output as they are written, in order, per stream and across streams."""
    seen: list[tuple[str, bytes]] = []

    async def on_output(stream: str, data: bytes) -> None:
        seen.append((stream, data))

    r = await sandbox.exec("for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; "
                           "sleep 0.05; done", on_output=on_output, timeout=10)
    assert seen == [(s, f"{s[3:]}{i}\n".encode()) for i in (1, 2, 3)
                    for s in ("stdout", "stderr")]
    assert r.stdout == b"out1\nout2\nout3\n" and r.stderr == b"err1\nerr2\nerr3\n"


async def test_chunks_are_at_most_64k_and_complete(sandbox):
    """Streaming chunks are <= 64 KiB and together equal the whole output."""
    sizes: list[int] = []

    async def on_output(stream: str, data: bytes) -> None:
        sizes.append(len(data))

    r = await sandbox.exec("head -c 500000 /dev/zero", on_output=on_output, timeout=10)
    assert max(sizes) <= CHUNK and sum(sizes) == 500000 == len(r.stdout)


async def test_second_concurrent_exec_is_refused(sandbox):
    """While one command runs, another exec on the same sandbox raises ExecBusy."""
    async with trio.open_nursery() as n:
        n.start_soon(lambda: sandbox.exec("sleep 0.3", timeout=10))
        await trio.sleep(0.05)
        with pytest.raises(ExecBusy):
            await sandbox.exec("true", timeout=10)
    assert (await sandbox.exec("echo free", timeout=10)).stdout == b"free\n"


async def test_exec_on_a_killed_sandbox_raises_gone(sandbox):
    """After PID 1 is killed, exec raises SandboxGone."""
    await sandbox.kill_init()
    with pytest.raises(SandboxGone):
        await sandbox.exec("true", timeout=10)


async def test_input_larger_than_the_limit_is_refused(sandbox):
    """input_data above exec.max_input_bytes is refused (ExecRefused, BadRequest at the
    RPC edge) naming the field."""
    from agent.sandbox.faults import ExecRefused

    limit = sandbox._engine.cfg.exec.max_input_bytes
    with pytest.raises(ExecRefused) as e:
        await sandbox.exec("true", input_data=b"x" * (limit + 1), timeout=10)
    assert e.value.field == "input_data"


async def test_cancelled_exec_kills_its_command_and_frees_the_sandbox(sandbox):
    """Cancelling an exec (caller went away) SIGKILLs the command; the next exec runs."""
    with trio.move_on_after(0.2):
        await sandbox.exec("touch /tmp/started; sleep 30; touch /tmp/survived", timeout=60)
    r = await sandbox.exec("ls /tmp; ps -e -o comm= | grep -c sleep", timeout=10)
    assert r.stdout.split() == [b"started", b"0"]


async def test_killing_the_sandbox_during_an_exec_raises_gone(sandbox):
    """kill_init while a command runs ends that exec with SandboxGone, promptly."""
    async def killer() -> None:
        await trio.sleep(0.1)
        await sandbox.kill_init()

    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        n.start_soon(killer)
        with pytest.raises(SandboxGone):
            await sandbox.exec("sleep 30", timeout=60)
    assert time.monotonic() - t0 < 2


async def test_oversized_or_malformed_requests_are_bad_requests(sandbox):
    """A huge command, a bad env name or a NUL byte is refused (ExecRefused, BadRequest at
    the RPC edge); 200 env vars (the most exec.max_env_entries allows, checked at the RPC
    edge) all reach the command."""
    from agent.sandbox.faults import ExecRefused

    for kw in ({"command": "x" * 600_000}, {"env": {"A=B": "1"}}, {"command": "echo \0"}):
        with pytest.raises(ExecRefused):
            await sandbox.exec(kw.get("command", "true"), env=kw.get("env"), timeout=10)
    r = await sandbox.exec("echo $V199", env={f"V{i}": str(i) for i in range(200)}, timeout=10)
    assert r.stdout == b"199\n"
