"""Canonical JSON `C(x)` of SPEC 6: keys sorted, `,`/`:` separators, no whitespace,
non-ASCII kept as UTF-8.  The value space is JSON without floats (int, str, bool, None,
list/tuple, dict with str keys).  Keys are ordered by their UTF-16 code units, as
RFC 8785 orders them, so for this value space the output is the RFC 8785 form (the
two orders differ only for keys holding characters beyond U+FFFF)."""

from __future__ import annotations

import json

__all__ = ["CanonicalError", "canonical_json", "normalize"]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                            check_circular=False)


class CanonicalError(ValueError):
    """The value holds something canonical JSON does not allow (a float, a non-str key, …)."""


def _key(k: str) -> bytes:
    return k.encode("utf-16-be", "surrogatepass")


def normalize(obj: object, _depth: int = 0) -> object:
    """A copy of `obj` with dict keys in canonical order; raises CanonicalError naming the
    first disallowed value (float, non-str key, other type, nesting deeper than 512)."""
    if _depth > 512:
        raise CanonicalError("nesting deeper than 512 levels")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        raise CanonicalError(f"float not allowed in canonical JSON: {obj!r}")
    if isinstance(obj, (list, tuple)):
        return [normalize(x, _depth + 1) for x in obj]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise CanonicalError(f"non-string key of type {type(k).__name__}")
        return {k: normalize(obj[k], _depth + 1) for k in sorted(obj, key=_key)}
    raise CanonicalError(f"type {type(obj).__name__} not allowed in canonical JSON")


def canonical_json(obj: object) -> bytes:
    """UTF-8 bytes of `obj` as canonical JSON; raises CanonicalError on disallowed values."""
    try:
        text = _ENCODER.encode(normalize(obj))
    except ValueError as e:  # e.g. an int beyond the interpreter's int->str digit limit
        if isinstance(e, CanonicalError):
            raise
        raise CanonicalError(f"cannot serialise: {e}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("string is not valid Unicode (lone surrogate)") from None
