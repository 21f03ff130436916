"""UTS namespace layer (SPEC 3.3): a random hostname per session, unique among live ones.
nrx-init calls sethostname() inside the new UTS namespace."""

from __future__ import annotations

import secrets


def new_hostname(prefix: str, taken: set[str]) -> str:
    """`prefix` + 8 random hex digits, not in `taken`."""
    while True:
        name = prefix + secrets.token_hex(4)
        if name not in taken:
            return name
