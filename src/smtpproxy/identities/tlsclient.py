"""Client TLS for identity backends: always verified, optionally against a private CA."""

from __future__ import annotations

from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS

from smtpproxy.identities.errors import IdentityConfigError


def trust_root(ca_file: str, where: str) -> ssl.IOpenSSLTrustRoot:
    """The CA bundle in C{ca_file}, or the platform's trust store when empty."""
    if not ca_file:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityConfigError(f"{where}: cannot read {ca_file}: {e.strerror}") from None
    try:
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(data)])
    except Exception:
        raise IdentityConfigError(f"{where}: {ca_file} holds no PEM certificate") from None


def client_certificate(cert_file: str, key_file: str, where: str) -> ssl.PrivateCertificate | None:
    """A client certificate for mutual TLS, or None when not configured."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise IdentityConfigError(f"{where}: tls_cert and tls_key go together")
    try:
        with open(cert_file, "rb") as c, open(key_file, "rb") as k:
            return ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
    except Exception as e:
        raise IdentityConfigError(f"{where}: client certificate unusable: {e}") from None


def http_policy(ca_file: str, where: str) -> IPolicyForHTTPS:
    """Certificate and host name checked, as a browser does, against C{ca_file} if given."""
    return BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file, where) if ca_file else None)
