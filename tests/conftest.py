"""Shared fixtures.  Tests need root and the real kernel: namespaces, cgroups, seccomp.

`no_leftovers` is autouse: every test must leave no new mount, cgroup directory under
this suite's prefix, network namespace, or child process behind. It looks only at what this
run owns (`suite.py`: its cgroup prefix; mounts below this run's temporary directories;
processes descended from it or inside its cgroups), so two suites can run on one host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from suite import SUITE_PREFIX

CGROUP_ROOT = Path("/sys/fs/cgroup")
TEST_CGROUP_PREFIX = SUITE_PREFIX
_OWN_TREES: list[str] = []  # this run's temporary directories (set in pytest_configure)


def _mounts() -> set[str]:
    """Mount points below this run's temporary directories (where every agent it starts
    keeps its runtime dir), or named after this suite's prefix."""
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    return {m for m in points
            if SUITE_PREFIX in m or any(m == t or m.startswith(t + "/") for t in _OWN_TREES)}


def _cgroup_dirs() -> set[str]:
    found = set()
    if not CGROUP_ROOT.exists():
        return found
    # v1: one hierarchy per controller below the root; v2: the root is the one hierarchy
    for ctrl in (CGROUP_ROOT, *CGROUP_ROOT.iterdir()):
        for prefix in ctrl.glob(f"{SUITE_PREFIX}*"):
            for dirpath, _dirs, _files in os.walk(prefix):
                found.add(dirpath)
    return found


def _in_own_cgroup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return SUITE_PREFIX in f.read()
    except OSError:
        return False


def _netns_inodes() -> set[int]:
    """Network namespaces held by this run's processes: its descendants and anything in its
    cgroups (a sandbox whose agent died is reparented away from us but stays in them)."""
    seen = set()
    mine = _descendants()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and (int(pid) in mine or _in_own_cgroup(int(pid))):
            try:
                seen.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass
    return seen


def _descendants() -> set[int]:
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = set(), [me]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def snapshot() -> dict[str, set]:
    return {"mounts": _mounts(), "cgroups": _cgroup_dirs(), "netns": _netns_inodes(),
            "procs": _descendants()}


def leftovers(before: dict[str, set], timeout: float = 5.0) -> dict[str, set]:
    """What exists now that did not before (waits a little for asynchronous teardown)."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        diff = {k: now[k] - before[k] for k in now}
        # zombies of ours that nobody reaped yet are leftovers too
        if not any(diff.values()) or time.monotonic() > deadline:
            return {k: v for k, v in diff.items() if v}
        time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def _own_trees(tmp_path_factory):
    """Record this run's temporary base directory for the mount check."""
    _OWN_TREES[:] = [str(tmp_path_factory.getbasetemp())]
    yield


@pytest.fixture(autouse=True)
def no_leftovers(request, _own_trees):
    """Assert the test left no mount, cgroup, netns or process behind."""
    if request.node.get_closest_marker("allow_leftovers"):
        yield
        return
    before = snapshot()
    yield
    left = leftovers(before)
    assert not left, f"test left resources behind: {left}"


@pytest.fixture
def agent_dirs(tmp_path):
    """Temporary state and runtime directories for one agent."""
    state = tmp_path / "state"
    runtime = tmp_path / "run"
    state.mkdir(mode=0o700)
    runtime.mkdir(mode=0o755)
    return state, runtime


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leftovers: skip the no-leftovers check")
    if os.geteuid() != 0:
        raise pytest.UsageError("nanorix-agent tests need root (real namespaces and cgroups)")
