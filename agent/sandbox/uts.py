"""UTS namespace layer (SPEC 3.3): a random hostname per session, unique among live ones.
nrx-init calls sethostname() inside the new UTS namespace: at creation, or for a warm-pool
sandbox (issue 18) at `session.create` through its BIND command, until which the sandbox
carries `placeholder()` and runs nothing."""

from __future__ import annotations

import secrets


def new_hostname(prefix: str, taken: set[str]) -> str:
    """`prefix` + 8 random hex digits, not in `taken`."""
    while True:
        name = prefix + secrets.token_hex(4)
        if name not in taken:
            return name


def placeholder(prefix: str) -> str:
    """The hostname of a pooled sandbox before BIND: the same for all, names no session."""
    return prefix + "unbound"
