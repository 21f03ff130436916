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
