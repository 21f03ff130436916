"""Session receipt keys: libsodium locked memory, signing in C, zeroize with read-back."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.keys.session import KeyZeroized, SessionKey, receipt_key_id

SID = "sess_a8f3e71c4b2d9f06"


def test_key_id_from_session_id():
    """The receipt key id is nrx-receipt- plus the session id's 16 hex (as in the vector)."""
    assert SessionKey.generate(SID).key_id == "nrx-receipt-a8f3e71c4b2d9f06"
    assert receipt_key_id("custom-id").startswith("nrx-receipt-")
    assert len(receipt_key_id("custom-id")) == len("nrx-receipt-") + 16


def test_sign_and_verify():
    """Signatures made in C verify with the public key under cryptography's Ed25519."""
    k = SessionKey.generate(SID)
    assert isinstance(k.public_key, bytes) and len(k.public_key) == 32
    sig = k.sign(b"hello")
    assert len(sig) == 64
    Ed25519PublicKey.from_public_bytes(k.public_key).verify(sig, b"hello")
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(k.public_key).verify(sig, b"hellO")


def test_matches_rfc8032_from_seed():
    """From a known seed, the C signer gives the same deterministic signature as cryptography."""
    seed = bytes(range(32))
    k = SessionKey._from_seed_for_tests(SID, seed)
    ref = Ed25519PrivateKey.from_private_bytes(seed)
    assert k.public_key == ref.public_key().public_bytes_raw()
    assert k.sign(b"abc") == ref.sign(b"abc")


def test_keys_are_distinct():
    """Two sessions get different keys."""
    assert SessionKey.generate(SID).public_key != SessionKey.generate(SID).public_key


def test_zeroize_reports_and_refuses_use():
    """zeroize() wipes the 64-byte secret, reads it back as zero; later use raises."""
    k = SessionKey.generate(SID)
    k.sign(b"x")
    rec = k.zeroize()
    assert rec == {"key_id": "nrx-receipt-a8f3e71c4b2d9f06", "purpose": "exec_receipts",
                   "bytes": 64, "zeroized": True, "readback_zero": True}
    assert k.zeroized and k.last_zeroize == rec
    with pytest.raises(KeyZeroized):
        k.sign(b"x")
    with pytest.raises(KeyZeroized):
        k.zeroize()


def test_no_api_exposes_secret():
    """The only bytes a SessionKey holds are its public key (the secret stays in C memory)."""
    k = SessionKey.generate(SID)
    held = [v for v in vars(k).values() if isinstance(v, (bytes, bytearray, memoryview))]
    assert held == [k.public_key]
    public = {n for n in dir(k) if not n.startswith("_")}
    assert public == {"algorithm", "key_id", "public_key", "sign", "zeroize", "zeroized",
                      "last_zeroize", "public_record", "generate", "memory_locked"}


def test_concurrent_sign_and_zeroize():
    """Signing from threads while the key is zeroized either succeeds or raises KeyZeroized, never crashes."""
    k = SessionKey.generate(SID)
    errors: list[BaseException] = []

    def worker():
        for _ in range(300):
            try:
                k.sign(b"m")
            except KeyZeroized:
                return
            except BaseException as e:  # pragma: no cover - would be the bug
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    rec = k.zeroize()
    for t in threads:
        t.join()
    assert not errors and rec["readback_zero"] is True


CHILD = r"""
from agent.keys.session import SessionKey
import sys
keys = [SessionKey.generate("sess_0123456789abcdef") for _ in range(int(sys.argv[1]))]
for k in keys: k.sign(b"x")
locked = all(k.memory_locked for k in keys)
dd = lo = 0
for line in open("/proc/self/smaps"):
    if line.startswith("VmFlags:"):
        flags = line.split()[1:]
        dd += "dd" in flags
        lo += "dd" in flags and "lo" in flags
print(dd, lo, int(locked))
"""


def test_secret_pages_locked_and_not_dumpable():
    """Session key pages are MADV_DONTDUMP (dd) and, where permitted, mlocked (lo) as memory_locked says."""
    def count(n: int) -> tuple[int, int, int]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True,
                             text=True, timeout=30, check=True)
        dd, lo, locked = map(int, out.stdout.split())
        return dd, lo, locked

    base_dd, base_lo, _ = count(0)
    dd, lo, locked = count(4)
    assert dd >= base_dd + 4  # every key's pages are excluded from core dumps
    if locked:  # root / CAP_IPC_LOCK: the pages are mlocked too (reported by memory_locked)
        assert lo >= base_lo + 4


def test_memory_locked_as_root():
    """Running as root (CAP_IPC_LOCK), the secret's page is reported locked."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs CAP_IPC_LOCK")
    assert SessionKey.generate(SID).memory_locked is True
