"""This test run's identity on the host: its cgroup prefix and where its temporary files live.

Every cgroup a test creates is named with `cgroup_prefix(kind)`, which starts with
`SUITE_PREFIX` (`nanorix-agent-test-<suite tag>`), so the autouse leftover check in
`conftest.py` looks only at what this run made: two suites on one host never see each
other's cgroups, mounts or sandboxes. The tag comes from `NRX_TEST_SUITE` when set (so
daemons and helpers started by a test share it) and is random otherwise.
"""

from __future__ import annotations

import os
import secrets

SUITE_TAG = os.environ.setdefault("NRX_TEST_SUITE", secrets.token_hex(3))
SUITE_PREFIX = f"nanorix-agent-test-{SUITE_TAG}"


def cgroup_prefix(kind: str = "") -> str:
    """A fresh cgroup prefix inside this suite's namespace, e.g. `…-<tag>-rec-1a2b3c4d`."""
    middle = f"{kind}-" if kind else ""
    return f"{SUITE_PREFIX}-{middle}{secrets.token_hex(4)}"


def uid_base() -> int:
    """A random host uid base for an engine a test makes itself (daemons get theirs in
    helpers_daemon): step 5 fails when any process on the host runs with a session's
    uids, so two suites on one host, or a test beside a bench, must not share the
    default range (slot 0 of the default base was every concurrent suite's first
    sandbox).  Room for the default node.max_sessions (1000 slots of 65536)."""
    return (1 << 24) + secrets.randbelow(2000) * (1 << 20)
