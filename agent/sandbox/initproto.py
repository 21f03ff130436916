"""Wire protocol with nrx-init over the SOCK_SEQPACKET control socket (fd 3 on its side).

Mirrors `native/init/proto.h`: every message is a uint32 type; CONFIG and EXEC carry TLV
records (uint32 tag, uint32 length, value); replies carry int32 fields or text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .mounts import SetupOp, check_plan

MSG_CONFIG = 1
MSG_PID = 2
MSG_READY = 3
MSG_ERROR = 4
MSG_EXEC = 5
MSG_STARTED = 6
MSG_EXITED = 7
MSG_SIGNAL = 8
MSG_EXEC_FAIL = 9
MSG_ATTACH = 10
MSG_ATTACHED = 11
MSG_ADOPTED = 12
MSG_BIND = 13  # issue 18: a warm-pool sandbox takes its session's hostname
MSG_BOUND = 14
MSG_GO = 15  # issue 18: the cgroups exist (their cgroup.procs paths); clone PID 1 now

T_HOSTNAME = 1
T_ROOT = 2
T_TMPFS_SIZE = 3
T_TMPFS_INODES = 4
T_UID_BASE = 5
T_GID_BASE = 6
T_MAP_SIZE = 7
T_CGROUP_PROCS = 10
T_OOM_SCORE = 11
T_NOFILE = 12
T_FSIZE = 13
T_SECCOMP = 14
T_SANDBOX_ID = 15
T_ATTACH_PATH = 16
T_ORPHAN_GRACE_MS = 17
T_UNBOUND = 18
T_MOUNT_OP = 19
T_ARG = 20
T_ENV = 21
T_CWD = 22
T_EXEC_TAG = 23
MAX_EXEC_TAG = 1024

MAX_MSG = 1024 * 1024


class InitProtocolError(RuntimeError):
    """nrx-init sent something this agent does not understand."""


def _tlv(tag: int, value: bytes) -> bytes:
    return struct.pack("=II", tag, len(value)) + value


def _u64(tag: int, value: int) -> bytes:
    return _tlv(tag, struct.pack("=q" if value < 0 else "=Q", value))


def encode_op(op: SetupOp) -> bytes:
    """One T_MOUNT_OP record: u32 kind, flags, mode, uid, gid, dest_len, arg_len, dest, arg
    (proto.h).  Not checked here: InitConfig.encode checks the whole plan."""
    dest = op.dest.encode()
    head = struct.pack("=7I", op.kind, op.flags, op.mode, op.uid, op.gid, len(dest),
                       len(op.arg))
    return _tlv(T_MOUNT_OP, head + dest + op.arg)


def encode_plan(ops: list[SetupOp]) -> bytes:
    """The mount plan's T_MOUNT_OP records, checked (raises PlanError)."""
    check_plan(ops)
    return b"".join(encode_op(op) for op in ops)


@dataclass
class InitConfig:
    """Everything nrx-init needs to build one sandbox but its cgroups, which GO names
    (`encode_go`: they are made while nrx-init starts)."""

    hostname: str
    root: str  # host path of the session tmpfs mount point
    tmpfs_size: int
    tmpfs_inodes: int
    uid_base: int  # host uid of uid 0 inside
    gid_base: int
    map_size: int
    sandbox_id: int = 1000
    mount_plan: list[SetupOp] = field(default_factory=list)  # mounts.setup_plan
    plan_records: bytes | None = None  # or the plan already checked and encoded (encode_plan)
    oom_score_adj: int = 500
    nofile: int = 1024
    fsize: int = 0
    seccomp_bpf: bytes = b""
    attach_path: str = ""  # re-attach socket (issue 12); "" = the sandbox dies with the agent
    orphan_grace_ms: int = 0
    unbound: bool = False  # warm pool (issue 18): no EXEC until a BIND names the session

    def encode(self) -> bytes:
        parts = [
            struct.pack("=I", MSG_CONFIG),
            _tlv(T_HOSTNAME, self.hostname.encode()),
            _tlv(T_ROOT, self.root.encode()),
            _u64(T_TMPFS_SIZE, self.tmpfs_size),
            _u64(T_TMPFS_INODES, self.tmpfs_inodes),
            _u64(T_UID_BASE, self.uid_base),
            _u64(T_GID_BASE, self.gid_base),
            _u64(T_MAP_SIZE, self.map_size),
            _u64(T_SANDBOX_ID, self.sandbox_id),
            _u64(T_OOM_SCORE, self.oom_score_adj),
            _u64(T_NOFILE, self.nofile),
            _u64(T_FSIZE, self.fsize),
        ]
        parts.append(self.plan_records if self.plan_records is not None
                     else encode_plan(self.mount_plan))
        if self.attach_path and self.orphan_grace_ms:
            parts.append(_tlv(T_ATTACH_PATH, self.attach_path.encode()))
            parts.append(_u64(T_ORPHAN_GRACE_MS, self.orphan_grace_ms))
        if self.unbound:
            parts.append(_u64(T_UNBOUND, 1))
        if self.seccomp_bpf:
            if len(self.seccomp_bpf) % 8:
                raise ValueError("seccomp BPF must be a whole number of 8-byte instructions")
            parts.append(_tlv(T_SECCOMP, self.seccomp_bpf))
        msg = b"".join(parts)
        if len(msg) > MAX_MSG:
            raise ValueError("init config too large")
        return msg


def encode_go(cgroup_procs: list[str]) -> bytes:
    """GO, after CONFIG: the session cgroups to join (their `cgroup.procs` paths, at least
    one: nrx-init refuses a GO without); nrx-init then joins them and clones PID 1."""
    if not cgroup_procs:
        raise ValueError("GO names no cgroup: no sandbox is built outside its cgroups")
    return struct.pack("=I", MSG_GO) + b"".join(_tlv(T_CGROUP_PROCS, p.encode())
                                                 for p in cgroup_procs)


def encode_exec(argv: list[str], env: dict[str, str], cwd: str, tag: bytes = b"") -> bytes:
    """EXEC; `tag` (<= 1 KiB, no customer data) is kept by PID 1 while the command runs and
    handed back to a re-attaching agent if the agent died during it."""
    if len(tag) > MAX_EXEC_TAG:
        raise ValueError("exec tag too large")
    parts = [struct.pack("=I", MSG_EXEC)]
    if tag:
        parts.append(_tlv(T_EXEC_TAG, tag))
    parts += [_tlv(T_ARG, a.encode()) for a in argv]
    parts += [_tlv(T_ENV, f"{k}={v}".encode()) for k, v in env.items()]
    parts.append(_tlv(T_CWD, cwd.encode()))
    msg = b"".join(parts)
    if len(msg) > MAX_MSG:
        raise ValueError("command and environment too large")
    return msg


def encode_bind(hostname: str) -> bytes:
    """BIND: the session identity a pooled sandbox takes (answered by BOUND)."""
    return struct.pack("=I", MSG_BIND) + _tlv(T_HOSTNAME, hostname.encode())


def encode_attach() -> bytes:
    return struct.pack("=I", MSG_ATTACH)


def encode_adopted() -> bytes:
    return struct.pack("=I", MSG_ADOPTED)


def encode_signal(pgid: int, sig: int) -> bytes:
    return struct.pack("=Iii", MSG_SIGNAL, pgid, sig)


def decode(msg: bytes) -> tuple[int, tuple]:
    """(type, fields): PID/STARTED -> (pid,), EXITED -> (pid, status), ERROR -> (text,)."""
    if len(msg) < 4:
        raise InitProtocolError("short message from nrx-init")
    (kind,) = struct.unpack_from("=I", msg)
    body = msg[4:]
    if kind in (MSG_PID, MSG_STARTED, MSG_BOUND):  # BOUND: (0 or errno,)
        return kind, struct.unpack_from("=i", body)
    if kind == MSG_EXITED:
        return kind, struct.unpack_from("=ii", body)
    if kind in (MSG_ERROR, MSG_EXEC_FAIL):
        return kind, (body.decode(errors="replace"),)
    if kind == MSG_READY:
        return kind, ()
    if kind == MSG_ATTACHED:  # (interrupted, wait status, root view fd in PID 1, exec tag)
        interrupted, status, view_fd = struct.unpack_from("=iii", body)
        return kind, (bool(interrupted), status, view_fd, bytes(body[12:]))
    raise InitProtocolError(f"unknown message type {kind} from nrx-init")
