"""Client TLS for identity backends: always verified, optionally against a private CA."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

from smtpproxy.identities.errors import IdentityConfigError


def trust_root(ca_file: str, where: str) -> Any:
    """The CA certificates in C{ca_file} (a bundle is fine), or the platform's when empty.

    Typed Any: Twisted's trust root interface is only importable from a
    private module.
    """
    if not ca_file:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityConfigError(f"{where}: cannot read {ca_file}: {e.strerror}") from None
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise IdentityConfigError(f"{where}: {ca_file} holds no PEM certificate") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in found]
    )


def client_certificate(cert_file: str, key_file: str, where: str) -> ssl.PrivateCertificate | None:
    """A client certificate for mutual TLS, or None when not configured."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise IdentityConfigError(f"{where}: tls_cert and tls_key go together")
    try:
        with open(cert_file, "rb") as c, open(key_file, "rb") as k:
            loaded: ssl.PrivateCertificate = ssl.PrivateCertificate.loadPEM(
                c.read() + b"\n" + k.read()
            )
            return loaded
    except Exception as e:
        raise IdentityConfigError(f"{where}: client certificate unusable: {e}") from None


def http_policy(ca_file: str, where: str) -> IPolicyForHTTPS:
    """Certificate and host name checked, as a browser does, against C{ca_file} if given."""
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file, where) if ca_file else None)
