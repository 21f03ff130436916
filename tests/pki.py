"""Test certificates made with `cryptography`: a CA, a foreign CA, and leaf certificates
(node, clients; valid or expired; CN, DNS, IP and URI names) written as PEM files.  Used by
tests/test_rpc_remote.py and bench/run.py (the mTLS rows)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """Files of one test's certificates under `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca = self._ca("test-ca")
        self.foreign_key, self.foreign = self._ca("foreign-ca")
        self.write("ca.crt", self.ca)

    def _ca(self, cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1))
                .not_valid_after(NOW + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def write(self, name: str, cert, key=None) -> Path:
        (self.base / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (self.base / name.replace(".crt", ".key")).write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        return self.base / name

    def issue(self, name: str, cn: str, *, server: bool = False, foreign: bool = False,
              expired: bool = False, uri: str | None = None) -> tuple[Path, Path]:
        """A leaf certificate and key written as NAME.crt / NAME.key."""
        ca_key, ca = (self.foreign_key, self.foreign) if foreign else (self.ca_key, self.ca)
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = ((NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1)) if expired
                      else (NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=7)))
        sans: list[x509.GeneralName] = [x509.DNSName(cn)]
        if server:
            sans = [x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if uri:
            sans.append(x509.UniformResourceIdentifier(uri))
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        return self.write(f"{name}.crt", cert, key), self.base / f"{name}.key"


