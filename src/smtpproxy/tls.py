"""Certificates for STARTTLS: generated in memory, or read from the operator's files.

Two sources, one result.  With no files configured, L{self_signed} makes a
throwaway certificate so STARTTLS works from the first start (R7.1); it never
touches the disk, so a container never leaves a private key behind (R7.5).
With C{TLS_CERT_FILE} and C{TLS_KEY_FILE}, L{load_files} reads and checks
them up front, because a key that does not match its certificate, a key too
weak for OpenSSL's security level, or an expired certificate otherwise shows
up only as a failed handshake on the first client (R7.4).  Either way the
result is a pair of PEM byte strings, which L{server_context} turns into the
Twisted context used by C{startTLS}; it builds the OpenSSL context at once,
so that whatever OpenSSL would refuse is refused at start-up, not inside a
session's STARTTLS.

Everything except L{load_files} is pure: bytes in, bytes or objects out.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

__all__ = [
    "TLSConfigError",
    "describe",
    "load_files",
    "self_signed",
    "server_context",
]

#: How long a generated certificate is valid.  The process restarts long
#: before this; the value only has to outlive any plausible uptime.
SELF_SIGNED_LIFETIME = timedelta(days=365)

#: Start validity this far in the past so a client whose clock runs a little
#: behind ours does not reject a certificate made a second ago.
CLOCK_SKEW = timedelta(hours=1)

_CN_MAX = 64  # RFC 5280 upper bound for a common name

#: The smallest keys accepted in a configured certificate.  OpenSSL 3's
#: default security level (112-bit) refuses smaller RSA keys only when a
#: context is built, which used to be inside a client's STARTTLS; these
#: bounds make the refusal a start-up error (NIST SP 800-57: RSA 2048 and
#: EC 256 bits give 112 and 128 bits of security).
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256

#: TLS 1.2 suites offered: Mozilla's "intermediate" profile without the DHE
#: suites (they need DH parameters of our own).  All are ECDHE (forward
#: secret) with an AEAD cipher; the static-RSA suites (C{AES128-SHA},
#: C{AES256-GCM-SHA384}, ...) and CBC modes are gone.  TLS 1.3 suites are
#: configured separately by OpenSSL and stay at its defaults, all of which
#: are forward secret and AEAD.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

# The private keys pyOpenSSL can put in a TLS context: the ones that sign.
_TLSKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class TLSConfigError(Exception):
    """The configured certificate or key cannot be used.

    The message names the setting and the file, and says what is wrong, so a
    failed start tells the operator exactly what to fix.
    """


# --- generating ---------------------------------------------------------


def self_signed(hostname: str, now: datetime | None = None) -> tuple[bytes, bytes]:
    """Make a self-signed certificate and key for C{hostname}, in memory only.

    The names cover C{hostname}, C{localhost}, C{127.0.0.1} and C{::1}, so
    clients that pin the certificate can also reach the relay by loopback
    address.  The key is EC P-256: fast to generate at startup and accepted
    by every TLS 1.2+ client.

    @param now: the time the certificate is made (tests pass a fixed one).
    @return: C{(certificate PEM, unencrypted PKCS#8 key PEM)}.
    """
    issued = now if now is not None else datetime.now(UTC)
    name = hostname.strip().rstrip(".").lower() or "localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = name if len(name) <= _CN_MAX else "smtpproxy"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        # 159 bits: positive and within the 20 octets RFC 5280 allows.
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(issued - CLOCK_SKEW)
        .not_valid_after(issued + SELF_SIGNED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(_alt_names(name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _alt_names(name: str) -> list[x509.GeneralName]:
    """The SAN entries: the host name (or address) first, then the loopbacks."""
    wanted: list[x509.GeneralName] = [_general_name(name)]
    for extra in ("localhost", "127.0.0.1", "::1"):
        entry = _general_name(extra)
        if entry not in wanted:
            wanted.append(entry)
    return wanted


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _key_pem(key: _TLSKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- loading the operator's files ---------------------------------------


def load_files(
    cert_path: str, key_path: str, *, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """Read and check a PEM certificate chain and its private key.

    The certificate file holds the server certificate first, then any
    intermediates.  Both files may be the same file holding the chain and
    the key.  Checks: both readable, both PEM, the key unencrypted, the key
    belonging to the first certificate, strong enough (L{MIN_RSA_BITS},
    L{MIN_EC_BITS}), and the first certificate valid at C{now}.

    @param now: the time to check validity against (tests pass a fixed one).
    @return: C{(certificate chain PEM, key PEM)}, re-encoded so that
        comments and unrelated blocks in the files are dropped.
    @raise TLSConfigError: naming the setting and file at fault.
    """
    cert_data = _read("TLS_CERT_FILE", cert_path)
    key_data = _read("TLS_KEY_FILE", key_path)
    chain = _parse_chain(cert_path, cert_data)
    key = _parse_key(key_path, key_data)
    _check_pair(cert_path, key_path, chain, key)
    _check_strength(key_path, key)
    _check_validity(cert_path, chain[0], now if now is not None else datetime.now(UTC))
    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return cert_pem, _key_pem(key)


def _read(setting: str, path: str) -> bytes:
    where = f"{setting} {path!r}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TLSConfigError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{where}: is a directory, expected a PEM file") from None
    except PermissionError:
        raise TLSConfigError(f"{where}: permission denied; the file is not readable") from None
    except OSError as e:
        raise TLSConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not data.strip():
        raise TLSConfigError(f"{where}: file is empty")
    return data


def _parse_chain(path: str, data: bytes) -> list[x509.Certificate]:
    where = f"TLS_CERT_FILE {path!r}"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        if b"PRIVATE KEY-----" in data:
            raise TLSConfigError(
                f"{where}: holds a private key, not a certificate "
                "(are TLS_CERT_FILE and TLS_KEY_FILE swapped?)"
            )
        raise TLSConfigError(f"{where}: not a PEM certificate{_der_hint(data)}")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{where}: a certificate in the file is not valid PEM") from None
    return chain


def _parse_key(path: str, data: bytes) -> _TLSKey:
    where = f"TLS_KEY_FILE {path!r}"
    if b"PRIVATE KEY-----" not in data:
        if b"-----BEGIN CERTIFICATE-----" in data:
            raise TLSConfigError(
                f"{where}: holds a certificate, not a private key "
                "(are TLS_CERT_FILE and TLS_KEY_FILE swapped?)"
            )
        raise TLSConfigError(f"{where}: not a PEM private key{_der_hint(data)}")
    encrypted = f"{where}: the private key is encrypted; supply it without a passphrase"
    # PKCS#8 says "BEGIN ENCRYPTED PRIVATE KEY"; legacy PEM says "Proc-Type: 4,ENCRYPTED".
    if b"ENCRYPTED" in data:
        raise TLSConfigError(encrypted)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "this needs a password".
        raise TLSConfigError(encrypted) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"{where}: the private key is not valid PEM") from None
    signing = _signing_key(key)
    if signing is None:
        raise TLSConfigError(
            f"{where}: a {type(key).__name__} cannot sign, so it cannot serve TLS; "
            "use an RSA or EC key"
        )
    return signing


def _signing_key(key: object) -> _TLSKey | None:
    """C{key} if TLS can use it (it can sign), else C{None}."""
    if isinstance(key, _TLSKey):
        return key
    return None


def _der_hint(data: bytes) -> str:
    # DER starts with an ASN.1 SEQUENCE tag; say so, since the fix is one command.
    if data[:1] == b"\x30":
        return " (it looks like binary DER; convert it to PEM with openssl)"
    return " (expected a -----BEGIN ...----- block)"


def _check_pair(
    cert_path: str,
    key_path: str,
    chain: Sequence[x509.Certificate],
    key: _TLSKey,
) -> None:
    wanted = _spki(key.public_key())
    for index, cert in enumerate(chain):
        if _spki(cert.public_key()) != wanted:
            continue
        if index == 0:
            return
        raise TLSConfigError(
            f"TLS_CERT_FILE {cert_path!r}: the key in TLS_KEY_FILE matches certificate "
            f"#{index + 1} in the file; put the server certificate first, then intermediates"
        )
    raise TLSConfigError(
        f"TLS_KEY_FILE {key_path!r}: the private key does not match the certificate "
        f"in TLS_CERT_FILE {cert_path!r}"
    )


def _check_strength(key_path: str, key: _TLSKey) -> None:
    """Refuse keys below the minimum sizes (or kinds OpenSSL's level refuses)."""
    where = f"TLS_KEY_FILE {key_path!r}"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise TLSConfigError(
            f"{where}: the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are needed"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size < MIN_EC_BITS:
        raise TLSConfigError(
            f"{where}: the EC key ({key.curve.name}) has {key.curve.key_size} bits; "
            f"at least {MIN_EC_BITS} are needed"
        )
    if isinstance(key, dsa.DSAPrivateKey):
        raise TLSConfigError(f"{where}: DSA keys are not usable with TLS 1.2+; use RSA or EC")


def _check_validity(cert_path: str, cert: x509.Certificate, now: datetime) -> None:
    """Refuse a server certificate that has expired or is not valid yet."""
    where = f"TLS_CERT_FILE {cert_path!r}"
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    if cert.not_valid_after_utc <= now:
        raise TLSConfigError(
            f"{where}: the certificate expired on {cert.not_valid_after_utc.strftime(stamp)}"
        )
    if cert.not_valid_before_utc > now:
        raise TLSConfigError(
            f"{where}: the certificate is not valid until "
            f"{cert.not_valid_before_utc.strftime(stamp)}"
        )


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- using them ---------------------------------------------------------


def server_context(
    cert_pem: bytes, key_pem: bytes, source: str = "the certificate"
) -> CertificateOptions:
    """Build the server-side TLS context from PEM bytes.

    TLS 1.2 is the floor (RFC 8996 retired 1.0 and 1.1) and offers only
    L{TLS12_CIPHERS}; TLS 1.3 keeps OpenSSL's suites.  Certificates after
    the first are sent as the chain so clients can build a path to their
    trust store.

    Twisted builds the OpenSSL context lazily, on the first STARTTLS; a
    refusal there (a key below the security level, say) raised inside the
    session and left its transport half-switched, so the session never
    ended.  The context is built here instead, once, and cached by Twisted.

    @param source: what to name in the error, such as the setting and file.
    @raise TLSConfigError: OpenSSL refuses the certificate or key.
    """
    chain = x509.load_pem_x509_certificates(cert_pem)
    key = _signing_key(serialization.load_pem_private_key(key_pem, password=None))
    if key is None:
        raise TLSConfigError("the private key cannot sign, so it cannot serve TLS")
    # Twisted only stores these and hands them to pyOpenSSL's Context, which
    # takes cryptography objects and deprecates its own PKey/X509 wrappers;
    # Twisted's annotations still name the wrappers, hence the casts.
    # Twisted leaves this classmethod unannotated.
    ciphers = AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)  # type: ignore[no-untyped-call]
    options = CertificateOptions(
        privateKey=cast(crypto.PKey, key),
        certificate=cast(crypto.X509, chain[0]),
        extraCertChain=cast(list[crypto.X509], chain[1:]),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=ciphers,
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(f"{source}: OpenSSL refuses it ({_openssl_reason(e)})") from None
    return options


def _openssl_reason(error: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, e.g. C{ee key too small}."""
    reasons = [str(entry[2]) for entry in error.args[0] if isinstance(entry, tuple)]
    return "; ".join(r for r in reasons if r) or "unknown reason"


def describe(cert_pem: bytes, now: datetime | None = None) -> str:
    """One line identifying the certificate in use, for the startup log.

    Gives the subject's common name, the SHA-256 fingerprint (what an
    operator compares against a client's warning) and the expiry.
    """
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    expires = cert.not_valid_after_utc
    text = f"CN={subject} SHA256={fingerprint} expires={expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    if expires <= (now if now is not None else datetime.now(UTC)):
        text += " (EXPIRED)"
    return text
