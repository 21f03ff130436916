"""Merkle roots of SPEC 6 (step 6 read-back, step 8 receipts): leaves are raw 32-byte
SHA-256 digests, a parent is SHA-256(left ‖ right), an odd last node is promoted
unchanged, no leaves gives SHA-256("").  Roots are lowercase hex."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["BLOCK_SIZE", "EMPTY_ROOT", "ZERO_BLOCK_LEAF", "merkle_root", "merkle_root_bytes",
           "zero_root"]

BLOCK_SIZE = 4096
EMPTY_ROOT = hashlib.sha256(b"").hexdigest()
ZERO_BLOCK_LEAF = hashlib.sha256(bytes(BLOCK_SIZE)).digest()


def merkle_root_bytes(leaves: Sequence[bytes]) -> bytes:
    """Raw 32-byte root of `leaves` (each a 32-byte digest); SHA-256("") when empty."""
    level = list(leaves)
    for leaf in level:
        if not isinstance(leaf, (bytes, bytearray, memoryview)) or len(leaf) != 32:
            raise ValueError("every Merkle leaf must be a 32-byte digest")
    if not level:
        return hashlib.sha256(b"").digest()
    sha = hashlib.sha256
    while len(level) > 1:
        nxt = [sha(bytes(level[i]) + bytes(level[i + 1])).digest()
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(bytes(level[-1]))
        level = nxt
    return bytes(level[0])


def merkle_root(leaves: Sequence[bytes]) -> str:
    """Lowercase hex root of `leaves` (raw 32-byte digests)."""
    return merkle_root_bytes(leaves).hex()


def _uniform_root(leaf: bytes, n: int) -> bytes:
    # Every level of a tree of identical leaves holds at most two distinct node values: the
    # "full" node (a perfect subtree) and, at the end, one node from promoted leftovers.
    # Track (full, count_full, tail) per level: O(log n) hashes.
    sha = hashlib.sha256
    full, count = leaf, n
    tail: bytes | None = None
    while count + (tail is not None) > 1:
        pairs, odd = divmod(count, 2)
        nfull = sha(full + full).digest()
        ntail: bytes | None
        if odd:
            ntail = full if tail is None else sha(full + tail).digest()
        else:
            ntail = tail
        full, count, tail = nfull, pairs, ntail
        if count == 0:
            assert tail is not None  # count + 1 > 1 above, so a tail was promoted
            full, count, tail = tail, 1, None
    return full


def zero_root(n_blocks: int, block_size: int = BLOCK_SIZE) -> str:
    """Hex root of `n_blocks` all-zero blocks, computed in O(log n) hashes."""
    if n_blocks < 0:
        raise ValueError("n_blocks must be >= 0")
    if n_blocks == 0:
        return EMPTY_ROOT
    leaf = ZERO_BLOCK_LEAF if block_size == BLOCK_SIZE else hashlib.sha256(bytes(block_size)).digest()
    return _uniform_root(leaf, n_blocks).hex()
