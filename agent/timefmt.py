"""Timestamps: wire format is ISO-8601 UTC with seconds precision and `Z` (SPEC 2);
evidence `completed_at` carries microseconds."""

from __future__ import annotations

import datetime as _dt
import time


def iso_seconds(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return _dt.datetime.fromtimestamp(int(t), _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_micro(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> float:
    """Inverse of iso_seconds / iso_micro; raises ValueError on anything else."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in s else "%Y-%m-%dT%H:%M:%SZ"
    return _dt.datetime.strptime(s, fmt).replace(tzinfo=_dt.UTC).timestamp()
