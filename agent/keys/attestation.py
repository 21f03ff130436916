"""Node attestation keys that sign CDPs (SPEC 7).

Layout under `<state_dir>/keys/` (directory 0700, files 0600, owned by the agent, root):

- `<key_id>.key`  JSON `{key_id, created_at, generation, seed: "base64:<32 bytes>"}` —
  the private key, present only while the key is live;
- `<key_id>.pub`  JSON `{key_id, algorithm, public_key, created_at, generation,
  retired_at?}` — the public record, kept forever; `retired_at` is written when the key
  stops signing (rotation; a leftover key found at load);
- `current`       JSON `{key_id}` — which live key signs.

Every file is written atomically (temporary file, fsync, rename, fsync of the directory).
A rotation writes the new `.key`, then its `.pub`, then `current`, then retires the old
key (overwrites its `.key` with zeros, fsyncs, unlinks).  A crash at any point leaves
`current` naming a key whose private file exists; the next load finishes the job (retires
a live key that is not current, deletes a new key that never became current, removes
leftover temporary files).

A key from a systemd credential (`$CREDENTIALS_DIRECTORY/<credential_name>`: a raw
32-byte seed, 64 hex, base64 of 32 bytes, or a PKCS#8 PEM) is used as is and never
rotated; its public record is still kept in `keys/` so its `key_id` (which includes the
creation time) is stable across restarts.

`get(key_id)` answers for `nrx-verify-*` keys from the public records, with `retired_at`
(null while live).  `export()` (and, without a running agent, `read_keyset(state_dir)`,
which only reads) gives every key as a trust anchor key set (agent.cdp.trust): a record
without `retired_at` that is not current is taken as retired when the next generation
was created.  Session receipt
keys (`nrx-receipt-*`) live in the daemon; it may pass `fallback` (a callable returning a
record or None) and `get` consults it for ids this store does not know.

The private key is held by `cryptography` (OpenSSL memory) while live; unlike session
keys it is not in locked memory, since it is on disk anyway.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import log
from agent.durable import atomic_write, fsync_dir
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["AttestationKeyStore", "AttestationSigner", "make_key_id", "public_records",
           "read_keyset"]

TMP_SUFFIX = ".tmp"


def make_key_id(created_at: float, public_key: bytes) -> str:
    """`nrx-verify-` + creation time YYYYMMDDTHHMMSSZ + `-` + 8 hex of SHA-256(public key)."""
    stamp = _dt.datetime.fromtimestamp(int(created_at), _dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"nrx-verify-{stamp}-{hashlib.sha256(public_key).hexdigest()[:8]}"


def _b64(raw: bytes) -> str:
    return "base64:" + base64.b64encode(raw).decode("ascii")


class AttestationSigner:
    """A live attestation key: the cdp `Signer` protocol plus its metadata."""

    algorithm = "Ed25519"

    def __init__(self, key: Ed25519PrivateKey, key_id: str, created_at: str,
                 generation: int) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes_raw()
        self.key_id = key_id
        self.created_at = created_at
        self.generation = generation

    def sign(self, msg: bytes) -> bytes:
        return self._key.sign(msg)

    def record(self) -> dict:
        return {"key_id": self.key_id, "algorithm": "Ed25519",
                "public_key": _b64(self.public_key), "created_at": self.created_at}

    def __repr__(self) -> str:
        return f"AttestationSigner({self.key_id!r}, generation={self.generation})"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) durably (agent.durable; tests patch this seam)."""
    atomic_write(path, data, tmp=path.with_name(path.name + TMP_SUFFIX))


def _shred(path: Path) -> None:
    """Overwrite a file's bytes with zeros, fsync, unlink, fsync the directory."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    fsync_dir(path.parent)


def _parse_credential(raw: bytes) -> Ed25519PrivateKey:
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(text, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("credential PEM is not an Ed25519 private key")
        return key
    if len(raw) == 32:
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        if len(text) == 64:
            return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text.decode("ascii")))
        seed = base64.b64decode(text.removeprefix(b"base64:"), validate=True)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("credential is not a 32-byte Ed25519 seed (raw, hex, base64 or PEM)") from None
    if len(seed) != 32:
        raise ValueError("credential is not a 32-byte Ed25519 seed (raw, hex, base64 or PEM)")
    return Ed25519PrivateKey.from_private_bytes(seed)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def public_records(keys_dir: Path, current: str | None = None) -> list[dict]:
    """Public records of every key in `keys_dir`, oldest first, each with `live` and
    `retired_at` (recorded, else the next generation's `created_at` unless the key is
    `current` or still has its private key).  Reads only."""
    recs = []
    for p in sorted(Path(keys_dir).glob("nrx-verify-*.pub")):
        rec = _read_json(p)
        if rec is not None and isinstance(rec.get("key_id"), str):
            recs.append(rec)
    recs.sort(key=lambda r: (r.get("generation") or 0, r.get("created_at") or ""))
    out = []
    for i, rec in enumerate(recs):
        kid = rec["key_id"]
        live = kid == current or (current is None and (Path(keys_dir) / f"{kid}.key").exists())
        retired = rec.get("retired_at")
        if retired is None and not live and i + 1 < len(recs):
            retired = recs[i + 1].get("created_at")
        out.append({**{k: rec.get(k) for k in ("key_id", "algorithm", "public_key",
                                                "created_at", "generation")},
                    "retired_at": None if live else retired, "live": live})
    return out


def read_keyset(state_dir: os.PathLike | str, *, node_id: str | None = None) -> dict:
    """The key set of the keys in `<state_dir>/keys/` (read only: nothing is created,
    rotated or shredded), for `keys export --state-dir` when no agent runs."""
    from agent.cdp.trust import keyset

    kdir = Path(state_dir) / "keys"
    if not kdir.is_dir():
        raise FileNotFoundError(f"no keys directory in {state_dir}")
    cur = _read_json(kdir / "current")
    current = cur.get("key_id") if cur is not None and isinstance(cur.get("key_id"), str) \
        else None
    return keyset(public_records(kdir, current), node_id=node_id, exported_at=iso_seconds())


class AttestationKeyStore:
    """Ed25519 attestation keys of this node: current key, rotation, lookup by id."""

    def __init__(self, state_dir: os.PathLike | str, rotate_interval_seconds: int = 24 * 3600, *,
                 clock: Callable[[], float] = time.time,
                 credentials_dir: os.PathLike | str | None = None,
                 credential_name: str = "nanorix-attestation-key",
                 fallback: Callable[[str], dict | None] | None = None) -> None:
        if credentials_dir is None:
            credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        self.dir = Path(state_dir) / "keys"
        self.rotate_interval = int(rotate_interval_seconds)
        self.clock = clock
        self.fallback = fallback
        self._lock = threading.RLock()
        self._current: AttestationSigner | None = None
        self.from_credential = False
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        cred = Path(credentials_dir) / credential_name if credentials_dir else None
        if cred is not None and cred.is_file():
            self._load_credential(cred)
        else:
            self._load()

    # -- public API -------------------------------------------------------------------

    def current(self) -> AttestationSigner:
        """The key that signs now, rotating first when it is older than the interval."""
        with self._lock:
            assert self._current is not None
            if (not self.from_credential and self.rotate_interval > 0
                    and self.age_seconds() >= self.rotate_interval):
                try:
                    self.rotate()
                except OSError as e:  # keep signing with the old key; retried next call
                    log.get("keys").warning("attestation_rotation_failed", error=type(e).__name__)
            return self._current

    @property
    def generation(self) -> int:
        """Generation number of the current key (1 for the first key; SPEC 14)."""
        with self._lock:
            assert self._current is not None
            return self._current.generation

    def age_seconds(self) -> float:
        with self._lock:
            assert self._current is not None
            return max(0.0, self.clock() - parse_iso(self._current.created_at))

    def rotate(self) -> AttestationSigner:
        """Create the next key, make it current, retire the previous one."""
        with self._lock:
            if self.from_credential:
                raise RuntimeError("a credential-provided attestation key is never rotated")
            old = self._current
            new = self._create((old.generation + 1) if old else 1)
            self._current = new
            if old is not None:
                self._mark_retired(old.key_id, new.created_at)
                _shred(self.dir / f"{old.key_id}.key")
            return new

    def get(self, key_id: object) -> dict | None:
        """`{key_id, algorithm, public_key, created_at}` of a live or retired key, or None."""
        if not isinstance(key_id, str) or not key_id or "/" in key_id or key_id.startswith("."):
            return None
        if key_id.startswith("nrx-verify-"):
            rec = self._read_json(self.dir / f"{key_id}.pub")
            if rec is not None and rec.get("key_id") == key_id:
                with self._lock:
                    live = self._current is not None and self._current.key_id == key_id
                if not live and rec.get("retired_at") is None:  # an old record: derive it
                    rec = next((r for r in self.records() if r["key_id"] == key_id), rec)
                return {"key_id": key_id, "algorithm": rec.get("algorithm"),
                        "public_key": rec.get("public_key"), "created_at": rec.get("created_at"),
                        "retired_at": None if live else rec.get("retired_at")}
        if self.fallback is not None:
            return self.fallback(key_id)
        return None

    def records(self) -> list[dict]:
        """Public records of every key this node ever had, oldest first, with `live`
        (signs now) and `retired_at`."""
        with self._lock:
            current = self._current.key_id if self._current is not None else None
        return public_records(self.dir, current)

    def export(self, node_id: str | None = None) -> dict:
        """Every key, live and retired, as a trust anchor key set (agent.cdp.trust)."""
        from agent.cdp.trust import keyset

        return keyset(self.records(), node_id=node_id, exported_at=iso_seconds(self.clock()))

    # -- internals --------------------------------------------------------------------

    _read_json = staticmethod(_read_json)

    def _mark_retired(self, key_id: str, at: str) -> None:
        """Record in a key's public file when it stopped signing (kept forever)."""
        path = self.dir / f"{key_id}.pub"
        rec = self._read_json(path)
        if rec is None or rec.get("key_id") != key_id or rec.get("retired_at"):
            return
        _atomic_write(path, json.dumps({**rec, "retired_at": at}).encode())

    def _create(self, generation: int) -> AttestationSigner:
        key = Ed25519PrivateKey.generate()
        now = self.clock()
        pub = key.public_key().public_bytes_raw()
        key_id = make_key_id(now, pub)
        created_at = iso_seconds(now)
        seed = key.private_bytes_raw()
        _atomic_write(self.dir / f"{key_id}.key", json.dumps(
            {"key_id": key_id, "created_at": created_at, "generation": generation,
             "seed": _b64(seed)}).encode())
        del seed
        _atomic_write(self.dir / f"{key_id}.pub", json.dumps(
            {"key_id": key_id, "algorithm": "Ed25519", "public_key": _b64(pub),
             "created_at": created_at, "generation": generation}).encode())
        _atomic_write(self.dir / "current", json.dumps({"key_id": key_id}).encode())
        return AttestationSigner(key, key_id, created_at, generation)

    def _load_private(self, key_id: str) -> AttestationSigner | None:
        rec = self._read_json(self.dir / f"{key_id}.key")
        if rec is None or rec.get("key_id") != key_id:
            return None
        try:
            seed = base64.b64decode(str(rec["seed"]).removeprefix("base64:"), validate=True)
            key = Ed25519PrivateKey.from_private_bytes(seed)
            gen = int(rec["generation"])
            created_at = str(rec["created_at"])
            parse_iso(created_at)
        except (KeyError, ValueError, TypeError, binascii.Error):
            return None
        if make_key_id(parse_iso(created_at), key.public_key().public_bytes_raw()) != key_id:
            return None
        return AttestationSigner(key, key_id, created_at, gen)

    def _load(self) -> None:
        for tmp in self.dir.glob("*" + TMP_SUFFIX):
            _shred(tmp)
        cur = self._read_json(self.dir / "current")
        signer = None
        if cur is not None and isinstance(cur.get("key_id"), str) and "/" not in cur["key_id"]:
            signer = self._load_private(cur["key_id"])
        # any other private key is either retired-but-not-yet-shredded or never became current
        for p in self.dir.glob("nrx-verify-*.key"):
            if signer is None or p.name != f"{signer.key_id}.key":
                self._mark_retired(p.name[:-len(".key")], iso_seconds(self.clock()))
                _shred(p)
        if signer is None:
            last_gen = max((r.get("generation") or 0 for r in self.records()), default=0)
            signer = self._create(int(last_gen) + 1)
        self._current = signer

    def _load_credential(self, path: Path) -> None:
        with open(path, "rb") as f:
            key = _parse_credential(f.read(1 << 16))
        pub = key.public_key().public_bytes_raw()
        b64pub = _b64(pub)
        known = next((r for r in self.records() if r.get("public_key") == b64pub), None)
        if known is not None:
            key_id, created_at, gen = known["key_id"], known["created_at"], int(known["generation"] or 1)
        else:
            now = self.clock()
            key_id, created_at = make_key_id(now, pub), iso_seconds(now)
            gen = max((r.get("generation") or 0 for r in self.records()), default=0) + 1
            _atomic_write(self.dir / f"{key_id}.pub", json.dumps(
                {"key_id": key_id, "algorithm": "Ed25519", "public_key": b64pub,
                 "created_at": created_at, "generation": gen, "source": "credential"}).encode())
        self.from_credential = True
        self._current = AttestationSigner(key, key_id, created_at, gen)
