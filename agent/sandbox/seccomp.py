"""seccomp profiles (SPEC 3.6): load a reviewable TOML profile, validate it, and compile it
to BPF with libseccomp (in C, native/ext/seccomp.c) once per profile.

`compile_profile(name) -> bytes` returns the raw `struct sock_filter` array for the native
architecture; nrx-init loads it with prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
{len(bpf) // 8, bpf}) after no_new_privs and dropping capabilities.

A profile may start from another one (`base = "default"`), drop every rule that names a
syscall (`remove = [...]`) and append its own rules; see seccomp/strict.toml.
"""

from __future__ import annotations

import errno as _errno
import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SRC = _HERE.parent.parent
# the source tree's seccomp/ first (only when this really is the source tree: an editable
# install's copy may be stale), then the copy setup.py installs beside the package
SEARCH_PATH = ([_SRC / "seccomp"] if (_SRC / "pyproject.toml").is_file() else []) + [
    _HERE.parent / "seccomp"]

ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_OPS = {"ne": 1, "lt": 2, "le": 3, "eq": 4, "ge": 5, "gt": 6, "masked_eq": 7}
NE32 = "ne32"  # low 32 bits != value: expanded into 32 one-bit masked_eq rules
TIOCSTI = 0x5412
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

# SPEC 3.6: a profile that allows any of these (even conditionally) is refused
MUST_DENY = frozenset({
    "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv",
    "process_vm_writev", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "clone3",
})
# these may only be allowed with argument conditions (TIOCSTI, persona, CLONE_NEW*, family)
MUST_FILTER = frozenset({"clone", "personality", "socket"})


class ProfileError(ValueError):
    """A seccomp profile is missing, malformed or unsafe; the message says where."""


@dataclass(frozen=True)
class Cond:
    index: int
    op: str
    value: int
    mask: int = 0


@dataclass(frozen=True)
class Rule:
    syscall: str
    action: int
    conds: tuple[Cond, ...] = ()


@dataclass
class Profile:
    name: str
    default_action: int
    bad_arch_action: int
    rules: list[Rule] = field(default_factory=list)
    description: str = ""

    def actions_for(self, syscall: str) -> list[Rule]:
        return [r for r in self.rules if r.syscall == syscall]


def parse_action(text: object, where: str) -> int:
    if not isinstance(text, str):
        raise ProfileError(f"{where}: action must be a string, got {text!r}")
    fixed = {"allow": ACT_ALLOW, "kill_process": ACT_KILL_PROCESS, "kill_thread": ACT_KILL_THREAD,
             "trap": ACT_TRAP, "log": ACT_LOG}
    if text in fixed:
        return fixed[text]
    if text.startswith("errno:"):
        name = text[6:]
        num = getattr(_errno, name, None) if name.isupper() else None
        if not isinstance(num, int):
            raise ProfileError(f"{where}: unknown errno name {name!r} in action {text!r}")
        return _ACT_ERRNO | (num & 0xFFFF)
    raise ProfileError(f"{where}: unknown action {text!r}; use allow, errno:NAME, kill_process, "
                       "kill_thread, trap or log")


def find_profile(name: str, search: list[Path] | None = None) -> Path:
    if not _NAME_RE.match(name):
        raise ProfileError(f"invalid seccomp profile name {name!r}")
    dirs = search or SEARCH_PATH
    for d in dirs:
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    raise ProfileError(f"seccomp profile {name!r} not found in {', '.join(map(str, dirs))}")


def _resolve(name: str) -> int:
    from agent._native import lib
    return lib.nrx_sc_resolve(name.encode())


def _u64(v: object, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
        raise ProfileError(f"{where}: {key} must be an integer 0..2^64-1, got {v!r}")
    return v


def _parse_cond(raw, where: str) -> Cond:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: an argument condition must be a table")
    unknown = set(raw) - {"index", "op", "value", "mask"}
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)} in argument condition")
    idx, op, value, mask = raw.get("index"), raw.get("op"), raw.get("value"), raw.get("mask", 0)
    if not isinstance(idx, int) or not 0 <= idx <= 5:
        raise ProfileError(f"{where}: argument index must be 0..5, got {idx!r}")
    if op not in _OPS and op != NE32:
        raise ProfileError(f"{where}: op must be one of {', '.join(_OPS)}, {NE32}; got {op!r}")
    value, mask = _u64(value, "value", where), _u64(mask, "mask", where)
    if op == "masked_eq" and "mask" not in raw:
        raise ProfileError(f"{where}: masked_eq needs a mask")
    if op != "masked_eq" and "mask" in raw:
        raise ProfileError(f"{where}: mask is only valid with masked_eq")
    return Cond(idx, op, value, mask)


def _load_raw(path: Path, search: list[Path] | None, depth: int = 0) -> Profile:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read seccomp profile {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"seccomp profile {path} is not valid TOML: {e}") from None
    unknown = set(raw) - {"profile", "rule"}
    if unknown:
        raise ProfileError(f"{path.name}: unknown sections {sorted(unknown)}; allowed: profile, rule")
    head = raw.get("profile")
    if not isinstance(head, dict):
        raise ProfileError(f"{path.name}: missing [profile] table")
    allowed = {"name", "description", "base", "remove", "default_action", "bad_arch_action"}
    if set(head) - allowed:
        raise ProfileError(f"{path.name}: unknown keys {sorted(set(head) - allowed)} in [profile]")
    name = head.get("name")
    if name != path.stem:
        raise ProfileError(f"{path.name}: [profile] name must be {path.stem!r}, got {name!r}")
    if "base" in head:
        if depth > 4:
            raise ProfileError(f"{path.name}: base chain too deep")
        prof = _load_raw(find_profile(head["base"], search), search, depth + 1)
        remove = head.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(s, str) for s in remove):
            raise ProfileError(f"{path.name}: remove must be a list of syscall names")
        missing = set(remove) - {r.syscall for r in prof.rules}
        if missing:
            raise ProfileError(f"{path.name}: remove names syscalls the base has no rule for: "
                               f"{sorted(missing)}")
        prof.rules = [r for r in prof.rules if r.syscall not in set(remove)]
        prof.name = name
    else:
        if "remove" in head:
            raise ProfileError(f"{path.name}: remove needs a base profile")
        prof = Profile(name, ACT_ALLOW, ACT_KILL_PROCESS)
        for k in ("default_action", "bad_arch_action"):
            if k not in head:
                raise ProfileError(f"{path.name}: [profile] needs {k}")
    if "default_action" in head:
        prof.default_action = parse_action(head["default_action"], f"{path.name} default_action")
    if "bad_arch_action" in head:
        prof.bad_arch_action = parse_action(head["bad_arch_action"], f"{path.name} bad_arch_action")
    prof.description = head.get("description", prof.description)
    rules = raw.get("rule", [])
    if not isinstance(rules, list):
        raise ProfileError(f"{path.name}: rule must be an array of tables ([[rule]])")
    for i, r in enumerate(rules):
        where = f"{path.name} rule #{i + 1}"
        if not isinstance(r, dict):
            raise ProfileError(f"{where}: must be a table")
        extra = set(r) - {"comment", "action", "syscalls", "args", "optional"}
        if extra:
            raise ProfileError(f"{where}: unknown keys {sorted(extra)}")
        action = parse_action(r.get("action"), where)
        names = r.get("syscalls")
        if not isinstance(names, list) or not names or not all(isinstance(s, str) for s in names):
            raise ProfileError(f"{where}: syscalls must be a non-empty list of names")
        args = r.get("args", [])
        if not isinstance(args, list):
            raise ProfileError(f"{where}: args must be a list of tables")
        conds = tuple(_parse_cond(a, where) for a in args)
        if len({c.index for c in conds}) != len(conds):
            raise ProfileError(f"{where}: at most one condition per argument index in a rule")
        if sum(c.op == NE32 for c in conds) > 1:
            raise ProfileError(f"{where}: at most one {NE32} condition in a rule")
        if any(c.op == NE32 and c.value >= 2**32 for c in conds):
            raise ProfileError(f"{where}: {NE32} compares the low 32 bits; value must be < 2^32")
        for s in names:
            if _resolve(s) == -1:
                if r.get("optional") is True:
                    continue
                raise ProfileError(f"{where}: unknown syscall {s!r} (a typo? or mark the rule "
                                   "optional = true for syscalls newer than libseccomp)")
            prof.rules.append(Rule(s, action, conds))
    return prof


def validate(prof: Profile) -> Profile:
    """Refuse contradictory or unsafe profiles (SPEC 3.6 denials must hold)."""
    uncond: dict[str, int] = {}
    for r in prof.rules:
        if r.conds:
            continue
        if r.syscall in uncond and uncond[r.syscall] != r.action:
            raise ProfileError(f"profile {prof.name}: syscall {r.syscall!r} has two "
                               "unconditional rules with different actions")
        uncond[r.syscall] = r.action
    for r in prof.rules:
        if r.conds and r.action == prof.default_action:
            raise ProfileError(
                f"profile {prof.name}: a conditional rule for {r.syscall!r} has the default "
                "action; libseccomp refuses it — allow the complement instead (see ne32)")
    if prof.default_action == ACT_ALLOW:
        raise ProfileError(f"profile {prof.name}: default_action must deny, not allow")
    for r in prof.rules:
        if r.action == ACT_ALLOW and r.syscall in MUST_DENY:
            raise ProfileError(f"profile {prof.name}: {r.syscall!r} must be denied (SPEC 3.6)")
        if r.action == ACT_ALLOW and r.syscall in MUST_FILTER and not r.conds:
            raise ProfileError(f"profile {prof.name}: {r.syscall!r} may only be allowed with "
                               "argument conditions (SPEC 3.6)")
    clone3 = [r for r in prof.rules if r.syscall == "clone3"]
    if not clone3 or any(r.action != (_ACT_ERRNO | _errno.ENOSYS) or r.conds for r in clone3):
        raise ProfileError(f"profile {prof.name}: clone3 must be errno:ENOSYS "
                           "(glibc falls back to clone only on ENOSYS)")
    for r in prof.actions_for("ioctl"):
        if r.action == ACT_ALLOW and Cond(1, NE32, TIOCSTI) not in r.conds:
            raise ProfileError(f"profile {prof.name}: ioctl may only be allowed with "
                               f"{{index = 1, op = \"{NE32}\", value = {TIOCSTI:#x}}} (TIOCSTI)")
    if prof.bad_arch_action == ACT_ALLOW:
        raise ProfileError(f"profile {prof.name}: bad_arch_action must not allow")
    return prof


def load_profile(name: str, search: list[Path] | None = None) -> Profile:
    return validate(_load_raw(find_profile(name, search), search))


def _expand(rule: Rule) -> list[Rule]:
    """Rewrite a ne32 condition as 32 alternatives "bit i differs from value's bit i"."""
    ne = [c for c in rule.conds if c.op == NE32]
    if not ne:
        return [rule]
    rest = tuple(c for c in rule.conds if c.op != NE32)
    c = ne[0]
    return [Rule(rule.syscall, rule.action,
                 (*rest, Cond(c.index, "masked_eq", ~c.value & (1 << i), 1 << i)))
            for i in range(32)]


def _compile(prof: Profile, pfc: bool) -> bytes:
    from agent._native import ffi, lib
    # rules equal to the default action without conditions only document the review
    rules = [x for r in prof.rules if r.conds or r.action != prof.default_action
             for x in _expand(r)]
    crules = ffi.new("struct nrx_sc_rule[]", max(1, len(rules)))
    keep = []
    for i, r in enumerate(rules):
        conds = ffi.new("struct nrx_sc_cond[]", max(1, len(r.conds)))
        for j, c in enumerate(r.conds):
            conds[j].arg = c.index
            conds[j].op = _OPS[c.op]
            if c.op == "masked_eq":
                conds[j].a, conds[j].b = c.mask, c.value
            else:
                conds[j].a, conds[j].b = c.value, 0
        keep.append(conds)
        crules[i].nr = _resolve(r.syscall)
        crules[i].action = r.action
        crules[i].ncond = len(r.conds)
        crules[i].conds = conds
    out = ffi.new("unsigned char **")
    outlen = ffi.new("size_t *")
    err = ffi.new("char[]", 512)
    rc = lib.nrx_sc_compile(prof.default_action, prof.bad_arch_action, crules, len(rules),
                            1 if pfc else 0, out, outlen, err, 512)
    if rc < 0:
        raise ProfileError(f"profile {prof.name}: libseccomp: {ffi.string(err).decode()}")
    try:
        return bytes(ffi.buffer(out[0], outlen[0]))
    finally:
        lib.nrx_sc_free(out[0])


@functools.cache
def compile_profile(name: str) -> bytes:
    """The profile's BPF program (raw struct sock_filter array), compiled once per name."""
    bpf = _compile(load_profile(name), pfc=False)
    if not bpf or len(bpf) % 8:
        raise ProfileError(f"profile {name}: libseccomp produced {len(bpf)} bytes of BPF")
    return bpf


def profile_pfc(name: str) -> str:
    """libseccomp's human-readable pseudo filter code for review (`doctor`, debugging)."""
    return _compile(load_profile(name), pfc=True).decode()
