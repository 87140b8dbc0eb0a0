"""What a server's certificate chain says, and whether it verifies for the name we dialled.

The probe completes every TLS handshake without verifying (it has to see a
bad certificate to report on it) and then verifies the chain here, with
OpenSSL's own path building against the system's CA store or a file of CAs,
and the name check of L{service_identity} (the one Twisted's client TLS
uses).  So "does not verify" comes with OpenSSL's reason and the names the
certificate does hold, instead of a failed handshake.

No sockets: chains in, values out.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import service_identity
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

__all__ = ["CertInfo", "Verification", "describe", "load_ca_file", "verify"]

_STAMP = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True, slots=True)
class CertInfo:
    """One certificate of a chain, as an operator reads it."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    key: str
    sha256: str

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def as_json(self, now: datetime) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "names": list(self.names),
            "not_before": self.not_before.strftime(_STAMP),
            "not_after": self.not_after.strftime(_STAMP),
            "days_left": round(self.days_left(now), 1),
            "key": self.key,
            "sha256": self.sha256,
        }


def describe(cert: x509.Certificate) -> CertInfo:
    """Subject, issuer, subject alternative names, validity, key and fingerprint."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        names=names,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key=key_description(cert),
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


def key_description(cert: x509.Certificate) -> str:
    """C{RSA 2048}, C{EC secp256r1 256}, or the key type's name."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} {key.curve.key_size}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")


def common_name(cert: x509.Certificate) -> str:
    found = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else ""


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of verifying a chain for a host: C{ok}, or why not."""

    ok: bool
    trust: str
    reason: str = ""


def load_ca_file(path: str) -> list[x509.Certificate]:
    """The certificates in a PEM file of trusted CAs.

    @raise ValueError: the file holds no PEM certificate.
    """
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path}: no PEM certificate in the file")
    return x509.load_pem_x509_certificates(data)


def verify(
    chain: Sequence[x509.Certificate],
    host: str,
    *,
    ca: Sequence[x509.Certificate] | None = None,
    ca_name: str = "",
    ca_label: str = "--ca-file",
    now: datetime | None = None,
) -> Verification:
    """Does C{chain} (server certificate first) verify for C{host}?

    @param ca: trust only these certificates (C{--ca-file}); C{None} trusts
        the system's CA store, as a mail client on this machine would.
    @param ca_label: how the report names where C{ca} came from (the
        probe's option, or the doctor's C{RELAY_CA_FILE}).
    @param now: the time to check validity at (tests pass a fixed one).
    """
    trust = f"{ca_label} {ca_name}" if ca is not None else "the system CA store"
    if not chain:
        return Verification(False, trust, "the server sent no certificate")
    store = crypto.X509Store()
    if ca is None:
        # Where this machine's OpenSSL looks (SSL_CERT_FILE / SSL_CERT_DIR honoured).
        paths = ssl.get_default_verify_paths()
        if paths.cafile or paths.capath:
            store.load_locations(paths.cafile, paths.capath)
    else:
        for cert in ca:
            store.add_cert(crypto.X509.from_cryptography(cert))
    if now is not None:
        store.set_time(now.replace(tzinfo=None))
    leaf = crypto.X509.from_cryptography(chain[0])
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, leaf, untrusted).verify_certificate()
    except crypto.X509StoreContextError as e:
        reason = str(e.args[0]) if e.args else str(e)
        return Verification(False, trust, f"the chain does not verify: {reason}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    try:
        if address is None:
            verify_certificate_hostname(chain[0], host)
        else:
            verify_certificate_ip_address(chain[0], str(address))
    except (service_identity.VerificationError, service_identity.CertificateError):
        names = ", ".join(describe(chain[0]).names) or common_name(chain[0]) or "no names"
        return Verification(False, trust, f"the certificate is not for {host} (it names {names})")
    return Verification(True, trust)


def now_utc() -> datetime:
    return datetime.now(UTC)
