"""Timestamps: wire format is ISO-8601 UTC with seconds precision and `Z` (SPEC 2);
evidence `completed_at` carries microseconds."""

from __future__ import annotations

import datetime as _dt
import time

_last_second: tuple[int, str] = (-1, "")  # an exec stamps the same second ~6 times


def iso_seconds(t: float | None = None) -> str:
    global _last_second
    sec = int(time.time() if t is None else t)
    last = _last_second
    if last[0] == sec:
        return last[1]
    text = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _last_second = (sec, text)
    return text


def iso_micro(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> float:
    """Inverse of iso_seconds / iso_micro; raises ValueError on anything else."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in s else "%Y-%m-%dT%H:%M:%SZ"
    return _dt.datetime.strptime(s, fmt).replace(tzinfo=_dt.UTC).timestamp()
