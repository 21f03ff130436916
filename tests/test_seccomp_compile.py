"""seccomp profiles: loading, validation and BPF compilation (no filter is loaded here).

The compiled programs are checked by running them in a small classic-BPF interpreter over
synthetic `struct seccomp_data`, so every rule's verdict is tested without ever executing
a denied syscall on the host.  Behaviour inside real sandboxes is in test_seccomp_sandbox.py.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from agent._native import lib

from agent.sandbox import seccomp as sc

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
ALLOW = sc.ACT_ALLOW
KILL = sc.ACT_KILL_PROCESS


def errno_act(e: int) -> int:
    return 0x00050000 | e


def run_bpf(prog: bytes, nr: int, args=(0,) * 6, arch: int = AUDIT_ARCH_X86_64) -> int:
    """Interpret a seccomp classic-BPF program for one syscall; returns SECCOMP_RET_*."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    ins = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = ins[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            assert code == 0x20, hex(code)  # BPF_LD|BPF_W|BPF_ABS
            a = struct.unpack_from("<I", data, k)[0]
        elif cls == 0x01:  # BPF_LDX
            x = k if code == 0x01 else x
        elif cls == 0x04:  # BPF_ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            a = {0x50: a & src, 0x40: a | src, 0x00: a + src, 0x10: a - src}[op] & 0xFFFFFFFF
        elif cls == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            src = x if code & 0x08 else k
            cond = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if cond else jf
        elif cls == 0x06:  # BPF_RET
            return a if code & 0x10 else k
        elif cls == 0x07:  # BPF_MISC
            a, x = (x, x) if code & 0xF8 == 0x80 else (a, a)
        else:
            raise AssertionError(f"unexpected BPF class {code:#x}")


def nr(name: str) -> int:
    n = lib.nrx_sc_resolve(name.encode())
    assert n >= 0, name
    return n


@pytest.fixture(scope="module")
def default():
    return sc.compile_profile("default")


@pytest.fixture(scope="module")
def strict():
    return sc.compile_profile("strict")


def test_compile_gives_sock_filter_array(default, strict):
    """Both profiles compile to a nonempty array of 8-byte sock_filter entries."""
    for prog in (default, strict):
        assert len(prog) > 8 and len(prog) % 8 == 0
        assert len(prog) // 8 < 4096  # BPF_MAXINSNS


def test_compile_is_cached_and_deterministic(default):
    """compile_profile is built once per profile, and a fresh build gives the same bytes."""
    assert sc.compile_profile("default") is default
    assert sc._compile(sc.load_profile("default"), pfc=False) == default


@pytest.mark.parametrize("name", sorted(sc.MUST_DENY - {"clone3"}))
def test_spec_denials_get_eperm(default, strict, name):
    """Every syscall SPEC 3.6 denies fails with EPERM in both profiles."""
    n = lib.nrx_sc_resolve(name.encode())
    if n < 0:
        pytest.skip(f"{name} does not exist on this architecture")
    assert run_bpf(default, n) == errno_act(errno.EPERM)
    assert run_bpf(strict, n) == errno_act(errno.EPERM)


def test_clone3_gets_enosys_and_threads_clone_is_allowed(default, strict):
    """clone3 answers ENOSYS; glibc's fallback thread clone passes, namespace flags do not."""
    thread_flags = 0x003D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    for prog in (default, strict):
        assert run_bpf(prog, nr("clone3")) == errno_act(errno.ENOSYS)
        assert run_bpf(prog, nr("clone"), (thread_flags,)) == ALLOW
        assert run_bpf(prog, nr("clone"), (17,)) == ALLOW  # fork: SIGCHLD
        for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                     0x40000000):
            assert run_bpf(prog, nr("clone"), (17 | flag,)) == errno_act(errno.EPERM), hex(flag)


def test_ioctl_tiocsti_denied_even_with_high_bits(default, strict):
    """ioctl(TIOCSTI) is denied, also when garbage sits in the upper 32 bits the kernel
    ignores; other ioctls such as TCGETS pass."""
    for prog in (default, strict):
        assert run_bpf(prog, nr("ioctl"), (0, 0x5412)) == errno_act(errno.EPERM)
        assert run_bpf(prog, nr("ioctl"), (0, 0x1_0000_5412)) == errno_act(errno.EPERM)
        assert run_bpf(prog, nr("ioctl"), (0, 0x5401)) == ALLOW
        assert run_bpf(prog, nr("ioctl"), (0, 0x5413)) == ALLOW
        assert run_bpf(prog, nr("ioctl"), (0, 0x80045430)) == ALLOW


def test_socket_families(default, strict):
    """socket(2): AF_UNIX/AF_INET/AF_INET6 pass, every other family (netlink, packet,
    vsock, also with junk in the ignored high bits) gets EPERM; strict also refuses SOCK_RAW."""
    s = nr("socket")
    for prog in (default, strict):
        for fam in (1, 2, 10):
            assert run_bpf(prog, s, (fam, 1)) == ALLOW
            assert run_bpf(prog, s, (fam, 2 | 0x80000)) == ALLOW
        for fam in (16, 17, 40, 38, 0, 0x1_0000_0010):
            assert run_bpf(prog, s, (fam, 1)) == errno_act(errno.EPERM), fam
    assert run_bpf(default, s, (2, 3)) == ALLOW  # SOCK_RAW still needs CAP_NET_RAW there
    assert run_bpf(strict, s, (2, 3)) == errno_act(errno.EPERM)
    assert run_bpf(strict, s, (10, 3)) == errno_act(errno.EPERM)
    assert run_bpf(strict, s, (1, 5)) == ALLOW  # AF_UNIX SOCK_SEQPACKET


def test_socket_protocols_by_explicit_list(default, strict):
    """socket(2)'s protocol is allowed by list: 0, TCP (6) and UDP (17) for inet, 0 for
    AF_UNIX; MPTCP, UDPLITE, SCTP (also with junk in the ignored high bits of another
    protocol) get EPERM in both profiles, and strict ties TCP to streams, UDP to datagrams."""
    s = nr("socket")
    for prog in (default, strict):
        for fam in (2, 10):
            assert run_bpf(prog, s, (fam, 1, 6)) == ALLOW
            assert run_bpf(prog, s, (fam, 2 | 0x80000, 17)) == ALLOW
            for proto in (262, 136, 132, 1, 0x1_0000_0106):
                assert run_bpf(prog, s, (fam, 1, proto)) == errno_act(errno.EPERM), proto
                assert run_bpf(prog, s, (fam, 2, proto)) == errno_act(errno.EPERM), proto
        assert run_bpf(prog, s, (1, 1, 0)) == ALLOW
        assert run_bpf(prog, s, (1, 1, 6)) == errno_act(errno.EPERM)
    assert run_bpf(strict, s, (2, 2, 6)) == errno_act(errno.EPERM)
    assert run_bpf(strict, s, (2, 1, 17)) == errno_act(errno.EPERM)


def test_personality_only_default_persona(default, strict):
    """personality may query or set PER_LINUX (default); strict may only query."""
    p = nr("personality")
    assert run_bpf(default, p, (0xFFFFFFFF,)) == ALLOW
    assert run_bpf(default, p, (0,)) == ALLOW
    assert run_bpf(strict, p, (0xFFFFFFFF,)) == ALLOW
    assert run_bpf(strict, p, (0,)) == errno_act(errno.EPERM)
    for prog in (default, strict):
        assert run_bpf(prog, p, (0x0040000,)) == errno_act(errno.EPERM)  # READ_IMPLIES_EXEC
        assert run_bpf(prog, p, (0x0008,)) == errno_act(errno.EPERM)  # UNAME26


def test_foreign_arch_and_x32_are_killed(default, strict):
    """A syscall made with a foreign ABI (i386, x32 bit) kills the process."""
    for prog in (default, strict):
        assert run_bpf(prog, 1, arch=AUDIT_ARCH_I386) == KILL
        assert run_bpf(prog, 0x40000000 | 1) == KILL
        assert run_bpf(prog, nr("write")) == ALLOW


def test_workload_syscalls_allowed_and_strict_removals(default, strict):
    """Common workload calls pass; strict drops memfd_create, SysV IPC and mlock."""
    for name in ("read", "write", "openat", "execve", "mmap", "futex", "wait4", "pipe2",
                 "rt_sigaction", "getrandom", "statx", "rseq", "exit_group"):
        assert run_bpf(default, nr(name)) == ALLOW, name
        assert run_bpf(strict, nr(name)) == ALLOW, name
    for name in ("memfd_create", "shmget", "mlock", "io_setup", "sched_setaffinity"):
        assert run_bpf(default, nr(name)) == ALLOW, name
        assert run_bpf(strict, nr(name)) == errno_act(errno.EPERM), name
    assert run_bpf(default, 999) == errno_act(errno.EPERM)  # unknown number: default


def test_installed_copy_is_found(tmp_path):
    """A profile is found in the installed agent/seccomp/ copy when the source tree lacks it."""
    src = Path(sc.__file__).resolve().parents[2] / "seccomp" / "default.toml"
    inst = tmp_path / "installed"
    inst.mkdir()
    (inst / "default.toml").write_text(src.read_text())
    assert sc.find_profile("default", [tmp_path / "missing", inst]) == inst / "default.toml"
    assert sc.load_profile("default", [tmp_path / "missing", inst]).name == "default"


BASE = """
[profile]
name = "{name}"
default_action = "errno:EPERM"
bad_arch_action = "kill_process"
[[rule]]
action = "errno:ENOSYS"
syscalls = ["clone3"]
"""


@pytest.mark.parametrize("extra, message", [
    ('[[rule]]\naction = "allow"\nsyscalls = ["mount"]\n', "'mount' must be denied"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["reed"]\n', "unknown syscall 'reed'"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["socket"]\n', "only be allowed with argument"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["ioctl"]\n', "TIOCSTI"),
    ('[[rule]]\naction = "nope"\nsyscalls = ["read"]\n', "unknown action 'nope'"),
    ('[[rule]]\naction = "errno:EWHAT"\nsyscalls = ["read"]\n', "unknown errno name"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["read"]\n[[rule]]\naction = "kill_process"\n'
     'syscalls = ["read"]\n', "two unconditional rules"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["read"]\nargs = [{index = 7, op = "eq", '
     'value = 1}]\n', "argument index must be 0..5"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["read"]\nbogus = 1\n', "unknown keys"),
    ('[[rule]]\naction = "allow"\nsyscalls = [\n', "not valid TOML"),
    ('[[rule]]\naction = "errno:EPERM"\nsyscalls = ["read"]\nargs = [{index = 0, op = "eq", '
     'value = 1}]\n', "has the default action"),
    ('[[rule]]\naction = "allow"\nsyscalls = ["read"]\nargs = [{index = 0, op = "ne32", '
     'value = 0x100000000}]\n', "low 32 bits"),
])
def test_bad_profiles_are_refused_with_clear_errors(tmp_path, extra, message):
    """Unsafe, contradictory or malformed profiles raise ProfileError naming the problem."""
    (tmp_path / "bad.toml").write_text(BASE.format(name="bad") + extra)
    with pytest.raises(sc.ProfileError, match=message):
        sc.load_profile("bad", [tmp_path])


def test_clone3_must_be_enosys(tmp_path):
    """A profile that lets clone3 fall to EPERM is refused (glibc would fail to make threads)."""
    (tmp_path / "p.toml").write_text(BASE.format(name="p").replace("errno:ENOSYS", "errno:EPERM"))
    with pytest.raises(sc.ProfileError, match="clone3 must be errno:ENOSYS"):
        sc.load_profile("p", [tmp_path])


def test_missing_profile_and_bad_name(tmp_path):
    """Unknown profile names and path-like names are refused."""
    with pytest.raises(sc.ProfileError, match="not found"):
        sc.load_profile("nosuch", [tmp_path])
    with pytest.raises(sc.ProfileError, match="invalid seccomp profile name"):
        sc.find_profile("../default")


def test_optional_rules_skip_unknown_names(tmp_path):
    """optional = true lets a profile name syscalls newer than the installed libseccomp."""
    (tmp_path / "o.toml").write_text(BASE.format(name="o") + '[[rule]]\naction = "allow"\n'
                                     'optional = true\nsyscalls = ["read", "future_call"]\n')
    prof = sc.load_profile("o", [tmp_path])
    assert [r.syscall for r in prof.rules] == ["clone3", "read"]


def test_pfc_is_reviewable():
    """profile_pfc gives libseccomp's readable pseudo code with the default action."""
    text = sc.profile_pfc("strict")
    assert "default action" in text and "ERRNO(1)" in text and "KILL_PROCESS" in text
