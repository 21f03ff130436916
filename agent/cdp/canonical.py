"""Canonical JSON `C(x)` of SPEC 6: keys sorted, `,`/`:` separators, no whitespace,
non-ASCII kept as UTF-8.  The value space is JSON without floats (int, str, bool, None,
list/tuple, dict with str keys).  Keys are ordered by their UTF-16 code units, as
RFC 8785 orders them, so for this value space the output is the RFC 8785 form (the
two orders differ only for keys holding characters beyond U+FFFF).

`canonical_json` checks the value once (`_check`) and lets the C encoder sort and write
it; Python's own key order (code points) is the UTF-16 order unless a key holds a
character beyond U+FFFF, and only then is the value copied with the keys in UTF-16 order
first (`normalize`).  A destruction canonicalises every proof part, so this is on the
lifecycle's path (issue 18: copying every dict to sort it cost ~60% of building a proof).
"""

from __future__ import annotations

import json

__all__ = ["CanonicalError", "canonical_json", "canonical_pair", "normalize"]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                            check_circular=False)
_SORTED = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                           check_circular=False, sort_keys=True)
_MAX_DEPTH = 512


class CanonicalError(ValueError):
    """The value holds something canonical JSON does not allow (a float, a non-str key, …)."""


def _key(k: str) -> bytes:
    return k.encode("utf-16-be", "surrogatepass")


def normalize(obj: object, _depth: int = 0) -> object:
    """A copy of `obj` with dict keys in canonical order; raises CanonicalError naming the
    first disallowed value (float, non-str key, other type, nesting deeper than 512)."""
    if _depth > _MAX_DEPTH:
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


_PLAIN = (str, int, bool, type(None))  # exact types: a subclass goes through normalize


def _check(obj: object, depth: int = 0) -> bool:
    """Raise CanonicalError as `normalize` would; True when the C encoder's output would
    differ from the canonical one (a key beyond U+FFFF, or a subclass of a JSON type
    whose text the encoder might take from the subclass)."""
    if depth > _MAX_DEPTH:
        raise CanonicalError("nesting deeper than 512 levels")
    t = type(obj)
    if t is dict:
        odd = False
        for k, v in obj.items():  # type: ignore[attr-defined]
            if type(k) is not str:
                if not isinstance(k, str):
                    raise CanonicalError(f"non-string key of type {type(k).__name__}")
                odd = True
            elif not k.isascii() and max(k) > "\uffff":
                odd = True
            if type(v) in _PLAIN:
                continue
            odd = _check(v, depth + 1) or odd
        return odd
    if t is list or t is tuple:
        odd = False
        for v in obj:  # type: ignore[attr-defined]
            if type(v) not in _PLAIN:
                odd = _check(v, depth + 1) or odd
        return odd
    if t in _PLAIN:
        return False
    if isinstance(obj, float):
        raise CanonicalError(f"float not allowed in canonical JSON: {obj!r}")
    if isinstance(obj, (bool, str, int, list, tuple, dict)):
        return True  # a subclass: normalize turns it into the plain type first
    raise CanonicalError(f"type {type(obj).__name__} not allowed in canonical JSON")


def _ordered(obj: object) -> object:
    """A copy of a checked value (see _check) with dict keys in code-point order, sharing
    every str and int with `obj` (nothing but the containers is new)."""
    if isinstance(obj, dict):  # exact types only, once _check passed
        return {k: _ordered(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_ordered(v) for v in obj]
    return obj


def canonical_pair(obj: object) -> tuple[object, bytes]:
    """(normalize(obj), canonical_json(obj)) with one check of the value: a proof is kept
    as a dict in canonical key order (the order the spool stores and `proof.get` answers)
    and stored as its canonical JSON."""
    try:
        if _check(obj):
            norm = normalize(obj)
            return norm, _encode(_ENCODER, norm)
        return _ordered(obj), _encode(_SORTED, obj)
    except RecursionError:
        raise CanonicalError("nesting deeper than 512 levels") from None


def canonical_json(obj: object) -> bytes:
    """UTF-8 bytes of `obj` as canonical JSON; raises CanonicalError on disallowed values."""
    try:
        if _check(obj):
            return _encode(_ENCODER, normalize(obj))
        return _encode(_SORTED, obj)
    except RecursionError:
        raise CanonicalError("nesting deeper than 512 levels") from None


def _encode(encoder: json.JSONEncoder, obj: object) -> bytes:
    try:
        text = encoder.encode(obj)
    except ValueError as e:  # e.g. an int beyond the interpreter's int->str digit limit
        if isinstance(e, CanonicalError):
            raise
        raise CanonicalError(f"cannot serialise: {e}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CanonicalError("string is not valid Unicode (lone surrogate)") from None
