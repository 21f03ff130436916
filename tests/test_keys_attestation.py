"""Attestation keys: atomic 0600 files, rotation on a fake clock, retired lookup, credential keys."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.keys import attestation
from agent.keys.attestation import AttestationKeyStore, make_key_id

T0 = 1772323200.0  # 2026-03-01T00:00:00Z


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _store(tmp_path, clock, interval=3600, **kw) -> AttestationKeyStore:
    kw.setdefault("credentials_dir", "")
    return AttestationKeyStore(tmp_path, interval, clock=clock, **kw)


def _pub(rec: dict) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(rec["public_key"][7:]))


def test_key_id_format():
    """key_id is nrx-verify-YYYYMMDDTHHMMSSZ-<8 hex of SHA-256(public key)>."""
    pub = bytes(32)
    assert make_key_id(T0 + 3661, pub) == (
        "nrx-verify-20260301T010101Z-" + hashlib.sha256(pub).hexdigest()[:8])


def test_first_key_created_with_0600_files(tmp_path):
    """A new store creates one key; its files are 0600 in a 0700 directory, owned by us."""
    store = _store(tmp_path, Clock())
    signer = store.current()
    assert signer.key_id.startswith("nrx-verify-20260301T000000Z-")
    assert store.generation == 1
    kdir = tmp_path / "keys"
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    for p in kdir.iterdir():
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, p.name
        assert st.st_uid == os.geteuid()
    assert {p.name for p in kdir.iterdir()} == {"current", f"{signer.key_id}.key",
                                               f"{signer.key_id}.pub"}


def test_sign_verifies_with_record(tmp_path):
    """The current key signs; its public record verifies the signature."""
    store = _store(tmp_path, Clock())
    s = store.current()
    rec = store.get(s.key_id)
    assert rec == {"key_id": s.key_id, "algorithm": "Ed25519",
                   "public_key": "base64:" + base64.b64encode(s.public_key).decode(),
                   "created_at": "2026-03-01T00:00:00Z", "retired_at": None}
    _pub(rec).verify(s.sign(b"m"), b"m")


def test_reload_keeps_key(tmp_path):
    """A second store on the same directory uses the same key (no rotation before due)."""
    clock = Clock()
    a = _store(tmp_path, clock).current()
    clock.t += 100
    b = _store(tmp_path, clock).current()
    assert a.key_id == b.key_id and a.public_key == b.public_key


def test_rotation_with_fake_clock(tmp_path):
    """When the interval passes, current() rotates; the old private key is shredded, its record kept."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=3600)
    old = store.current()
    clock.t += 3599
    assert store.current() is old
    old_key_file = tmp_path / "keys" / f"{old.key_id}.key"
    assert old_key_file.exists()
    clock.t += 1
    new = store.current()
    assert new.key_id != old.key_id and store.generation == 2
    assert not old_key_file.exists()
    assert store.get(old.key_id)["public_key"] == "base64:" + base64.b64encode(old.public_key).decode()
    assert store.age_seconds() == 0
    assert [r["live"] for r in store.records()] == [False, True]


def test_retired_key_overwritten_before_unlink(tmp_path, monkeypatch):
    """Retiring a key writes zeros over its file before unlinking it."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=10)
    old = store.current()
    seen = {}
    real_unlink = os.unlink

    def spy(path, *a, **kw):
        if str(path).endswith(f"{old.key_id}.key"):
            with open(path, "rb") as f:
                seen["content"] = f.read()
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(attestation.os, "unlink", spy)
    clock.t += 10
    store.current()
    assert seen["content"] and set(seen["content"]) == {0}


def test_zero_interval_never_rotates(tmp_path):
    """A rotation interval of 0 disables rotation."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=0)
    a = store.current()
    clock.t += 10**8
    assert store.current() is a


def test_crash_between_write_and_rename_keeps_old_key(tmp_path, monkeypatch):
    """An exception between writing the new key and renaming it leaves the old key current and usable."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=10)
    old = store.current()
    clock.t += 10
    real_replace = os.replace

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(attestation.os, "replace", boom)
    assert store.current() is old  # rotation failed; the old key still signs
    _pub(store.get(old.key_id)).verify(store.current().sign(b"x"), b"x")
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "keys").iterdir())
    monkeypatch.setattr(attestation.os, "replace", real_replace)
    # a restart cleans the leftover tmp file and finds the old key (then rotates, since due)
    clock.t -= 5
    again = _store(tmp_path, clock, interval=10)
    assert again.current().key_id == old.key_id
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "keys").iterdir())


def test_crash_after_new_key_before_current(tmp_path, monkeypatch):
    """A new key written but never made current is destroyed at the next start; the old key stays."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=10)
    old = store.current()
    real_write = attestation._atomic_write

    def fail_on_current(path, data):
        if path.name == "current":
            raise OSError("simulated crash")
        return real_write(path, data)

    monkeypatch.setattr(attestation, "_atomic_write", fail_on_current)
    clock.t += 10
    assert store.current() is old
    keys = sorted(p.name for p in (tmp_path / "keys").glob("*.key"))
    assert len(keys) == 2
    monkeypatch.setattr(attestation, "_atomic_write", real_write)
    clock.t = T0 + 1
    again = _store(tmp_path, clock, interval=10)
    assert again.current().key_id == old.key_id
    assert [p.name for p in (tmp_path / "keys").glob("*.key")] == [f"{old.key_id}.key"]


def test_crash_after_current_before_shred(tmp_path, monkeypatch):
    """If the old key was not shredded before a crash, the next start retires it."""
    clock = Clock()
    store = _store(tmp_path, clock, interval=10)
    old = store.current()
    monkeypatch.setattr(attestation, "_shred", lambda p: (_ for _ in ()).throw(OSError("crash")))
    clock.t += 10
    with pytest.raises(OSError):
        store.rotate()
    monkeypatch.undo()
    again = _store(tmp_path, clock, interval=10)
    assert again.current().key_id != old.key_id
    assert not (tmp_path / "keys" / f"{old.key_id}.key").exists()
    assert again.get(old.key_id) is not None


def test_get_unknown_and_hostile_ids(tmp_path):
    """Unknown, path-like or non-string ids return None."""
    store = _store(tmp_path, Clock())
    for kid in ("nrx-verify-nope", "../current", "current", 5, None, "", "nrx-verify-../../x"):
        assert store.get(kid) is None


def test_fallback_for_receipt_keys(tmp_path):
    """Ids this store does not know go to the daemon's fallback (session receipt keys)."""
    rec = {"key_id": "nrx-receipt-0123456789abcdef", "algorithm": "Ed25519",
           "public_key": "base64:x", "created_at": "t"}
    store = _store(tmp_path, Clock(), fallback=lambda k: rec if k == rec["key_id"] else None)
    assert store.get("nrx-receipt-0123456789abcdef") == rec
    assert store.get("nrx-receipt-ffffffffffffffff") is None


@pytest.mark.parametrize("form", ["raw", "hex", "base64", "pem"])
def test_credential_key(tmp_path, form):
    """A key from $CREDENTIALS_DIRECTORY is used as is, never rotated, and keeps its key_id across restarts."""
    k = Ed25519PrivateKey.generate()
    seed = k.private_bytes_raw()
    data = {"raw": seed, "hex": seed.hex().encode() + b"\n",
            "base64": base64.b64encode(seed),
            "pem": k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())}[form]
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "nanorix-attestation-key").write_bytes(data)
    clock = Clock()
    state = tmp_path / "state"
    store = AttestationKeyStore(state, 10, clock=clock, credentials_dir=creds)
    s = store.current()
    assert store.from_credential and s.public_key == k.public_key().public_bytes_raw()
    clock.t += 10**6
    assert store.current() is s
    with pytest.raises(RuntimeError):
        store.rotate()
    assert not list((state / "keys").glob("*.key"))  # the private key is never copied to disk
    again = AttestationKeyStore(state, 10, clock=clock, credentials_dir=creds)
    assert again.current().key_id == s.key_id
    assert again.get(s.key_id)["created_at"] == "2026-03-01T00:00:00Z"


def test_credentials_dir_from_environment(tmp_path, monkeypatch):
    """Without an explicit credentials_dir the store reads $CREDENTIALS_DIRECTORY."""
    creds = tmp_path / "c"
    creds.mkdir()
    (creds / "nanorix-attestation-key").write_bytes(bytes(range(32)))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    store = AttestationKeyStore(tmp_path / "s", 10, clock=Clock())
    assert store.from_credential


def test_bad_credential_refused(tmp_path):
    """A credential that is not an Ed25519 seed is refused at start."""
    creds = tmp_path / "c"
    creds.mkdir()
    (creds / "nanorix-attestation-key").write_bytes(b"not a key")
    with pytest.raises(ValueError):
        AttestationKeyStore(tmp_path / "s", 10, clock=Clock(), credentials_dir=creds)


def test_retired_at_recorded_and_derived(tmp_path):
    """Rotation writes the old key's retired_at (the new key's creation); a public record
    from before that field is given the next generation's creation time; the read-only
    key set export agrees with the store."""
    import json

    clock = Clock()
    store = _store(tmp_path, clock)
    first = store.current()
    clock.t += 7200
    second = store.current()  # rotated: older than the interval
    assert second.key_id != first.key_id
    assert store.get(first.key_id)["retired_at"] == second.created_at
    assert store.get(second.key_id)["retired_at"] is None
    pub = tmp_path / "keys" / f"{first.key_id}.pub"
    rec = json.loads(pub.read_text())
    del rec["retired_at"]
    pub.write_text(json.dumps(rec))
    assert store.get(first.key_id)["retired_at"] == second.created_at
    local = attestation.read_keyset(tmp_path)
    assert local["keys"] == store.export()["keys"]
    assert [k["retired_at"] for k in local["keys"]] == [second.created_at, None]
