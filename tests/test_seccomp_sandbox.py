"""seccomp inside real sandboxes, bubblewrap-style: a tiny static probe (tests/probe/probe.c)
tries one named syscall and exits with the errno it got; each test first asserts that it
runs inside a session (hostname nrx-*, PID 1 nrx-init) — the probe itself refuses to run
anywhere else — and then asserts the exact errno for every denied call.

Exit codes: 0 success, N = errno N, 159 = killed by SIGSYS (128 + 31)."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import test_sandbox_fixtures as fx

    from agent.sandbox.engine import INIT_BIN

    engine_available = INIT_BIN.exists()
except ImportError:  # the engine has not landed
    engine_available = False

pytestmark = pytest.mark.skipif(not engine_available or shutil.which("cc") is None,
                                reason="needs the sandbox engine (nrx-init) and a C compiler")

if engine_available:
    sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures

PROBE_SRC = Path(__file__).parent / "probe" / "probe.c"
EPERM, ENOSYS, ENOTTY = errno.EPERM, errno.ENOSYS, errno.ENOTTY
SIGSYS_EXIT = 128 + 31

# the default profile (data class "general")
DEFAULT = {
    **{n: EPERM for n in (
        "mount", "umount2", "pivot_root", "chroot", "fsopen", "open_tree", "move_mount",
        "unshare_user", "unshare_ns", "setns", "ptrace", "process_vm_readv",
        "process_vm_writev", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
        "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "kexec_load",
        "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
        "swapoff", "clone_newuser", "clone_newns", "clone_newnet", "clone_newpid",
        "ioctl_tiocsti", "ioctl_tiocsti_hi", "socket_inet_raw", "socket_netlink",
        "socket_packet", "socket_vsock", "socket_alg", "personality_linux32",
        "socket_mptcp", "socket_mptcp6", "socket_udplite", "socket_sctp",
        "personality_rie", "open_by_handle_at")},
    "clone3": ENOSYS,
    "clone_fork": 0,
    "ioctl_tcgets": ENOTTY,  # ioctl itself passes; stdin is /dev/null, not a terminal
    "socket_unix": 0, "socket_inet": 0, "socket_inet6": 0, "socket_tcp": 0, "socket_udp6": 0,
    "personality_query": 0, "personality_linux": 0,
    "memfd_create": 0, "getpid": 0,
    "foreign_abi": SIGSYS_EXIT, "x32_abi": SIGSYS_EXIT,
}
# strict (PHI, PII, financial, credentials): also no memfd, no re-setting the persona
STRICT = {**DEFAULT, "memfd_create": EPERM, "personality_linux": EPERM}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> bytes:
    """The probe, compiled statically with cc into a temporary directory."""
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["cc", "-static", "-O2", "-Wall", "-o", str(out), str(PROBE_SRC)],
                   check=True, capture_output=True)
    return out.read_bytes()


async def assert_in_session(sb) -> None:
    """Refuse to go on unless commands really run inside the sandbox session."""
    r = await sb.exec("hostname; cat /proc/1/comm; grep -E '^(Seccomp|NoNewPrivs):' "
                      "/proc/self/status", timeout=10)
    lines = r.stdout.decode().split("\n")
    assert lines[0] == sb.hostname and lines[0].startswith("nrx-"), lines
    assert lines[1] == "nrx-init", lines
    assert "Seccomp:\t2" in lines and "NoNewPrivs:\t1" in lines, lines


async def run_probes(sb, probe: bytes, names) -> dict[str, int]:
    await assert_in_session(sb)
    script = ("cp /input/data /tmp/p && chmod 755 /tmp/p || exit 99\n"
              f"for n in {' '.join(names)}; do /tmp/p $n 2>/dev/null; echo \"$n $?\"; done\n")
    r = await sb.exec(script, input_data=probe, timeout=30)
    assert r.exit_code == 0, r.stderr
    got = dict(line.rsplit(" ", 1) for line in r.stdout.decode().splitlines())
    return {k: int(v) for k, v in got.items()}


async def test_probe_refuses_to_run_outside_a_sandbox(probe, tmp_path):
    """The probe exits 200 on the host without trying anything (safety of the test itself)."""
    p = tmp_path / "p"
    p.write_bytes(probe)
    p.chmod(0o755)
    assert subprocess.run([str(p), "getpid"], capture_output=True).returncode == 200


async def test_default_profile_exact_errnos(sandbox, probe):
    """In a general-class sandbox every denied call fails with its exact errno, clone3 with
    ENOSYS, foreign-ABI syscalls kill the caller, and allowed calls succeed."""
    got = await run_probes(sandbox, probe, DEFAULT)
    assert got == DEFAULT


async def test_strict_profile_exact_errnos(engine, probe):
    """A PHI sandbox runs the strict profile: the default denials plus memfd_create and
    setting a persona."""
    sb = await engine.create(fx.new_session_id(), tier="tiny", classification="PHI")
    try:
        got = await run_probes(sb, probe, STRICT)
        assert got == STRICT
    finally:
        await sb.teardown()


async def test_threads_still_work(sandbox):
    """glibc threads work (clone3 -> ENOSYS makes pthread_create fall back to clone)."""
    await assert_in_session(sandbox)
    r = await sandbox.exec(
        "python3 -c 'import threading\n"
        "out = []\n"
        "ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(sorted(out) == list(range(8)))'", timeout=20)
    assert (r.exit_code, r.stdout) == (0, b"True\n"), r.stderr
