"""Crash points for tests (issue 12: "kill during adoption").

`fault_point(name)` SIGKILLs this process when the environment variable
NANORIX_AGENT_TEST_CRASH_AT names that point — a crash at an exact place between two
steps, which no real kernel produces on demand.  Unset (always, outside tests) it does
nothing."""

from __future__ import annotations

import os
import signal

ENV = "NANORIX_AGENT_TEST_CRASH_AT"


def fault_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
