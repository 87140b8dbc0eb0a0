"""TLS towards the upstream: whom to trust, what to show, and how a refusal reads.

Built once when the provider starts, so an unreadable CA file or a client
key that does not match its certificate stops the relay at start-up instead
of failing every message.  With C{RELAY_TLS_VERIFY} on (the default) the
upstream's chain is checked against C{RELAY_CA_FILE} or the system's CAs
and its name against C{RELAY_HOST} with C{service_identity}, through
Twisted's C{optionsForClientTLS}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure

from smtpproxy.config import ConfigError
from smtpproxy.providers.smtp.settings import RelaySettings

if TYPE_CHECKING:
    # Only the annotation: Twisted exports the interface from no public module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

_PEM_END = b"-----END CERTIFICATE-----"


def client_tls(settings: RelaySettings) -> IOpenSSLClientConnectionCreator:
    """The TLS options every connection to the upstream uses.

    @raise ConfigError: a file named in the settings is unreadable or not PEM.
    """
    client = client_certificate(settings)
    if not settings.tls_verify:
        # Encrypted but unauthenticated: for an upstream on a private
        # network with a certificate nobody can check.  Said at start-up.
        options = CertificateOptions(
            privateKey=None if client is None else client.privateKey.original,
            certificate=None if client is None else client.original,
            verify=False,
        )
        return cast(IOpenSSLClientConnectionCreator, options)
    trust: IOpenSSLTrustRoot = (
        platformTrust() if not settings.ca_file else _trust_root(settings.ca_file)
    )
    return optionsForClientTLS(settings.host, trustRoot=trust, clientCertificate=client)


def client_certificate(settings: RelaySettings) -> PrivateCertificate | None:
    """The certificate and key of C{RELAY_CLIENT_CERT_FILE}, or None when unset.

    @raise ConfigError: a file is unreadable, or the key does not fit the certificate.
    """
    if not settings.client_cert_file:
        return None
    cert = _read("RELAY_CLIENT_CERT_FILE", settings.client_cert_file)
    key = _read("RELAY_CLIENT_KEY_FILE", settings.client_key_file)
    try:
        loaded: PrivateCertificate = PrivateCertificate.loadPEM(cert + b"\n" + key)
    except Exception as e:  # OpenSSL's errors share no base to name
        raise ConfigError(
            f"RELAY_CLIENT_CERT_FILE: cannot use the certificate and key: {e}"
        ) from None
    return loaded


def _trust_root(path: str) -> IOpenSSLTrustRoot:
    data = _read("RELAY_CA_FILE", path)
    certificates = []
    for block in data.split(_PEM_END)[:-1]:
        try:
            certificates.append(Certificate.loadPEM(block + _PEM_END))
        except Exception:
            raise ConfigError(
                f"RELAY_CA_FILE: {path} holds a certificate that cannot be read"
            ) from None
    if not certificates:
        raise ConfigError(f"RELAY_CA_FILE: {path} holds no PEM certificate")
    return cast("IOpenSSLTrustRoot", trustRootFromCertificates(certificates))


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None


def tls_problem(reason: Failure) -> str | None:
    """What went wrong with TLS, in words for the log, or None when TLS is not the cause.

    A certificate that does not verify closes the connection with an
    OpenSSL error naming the check that failed (C{certificate verify
    failed}, C{certificate has expired}); a name that does not match
    fails in C{service_identity}, whose error names the names.
    """
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - Twisted[tls] installs it
        VerificationError = ()  # type: ignore[assignment,misc]  # noqa: N806
    error = reason.value
    if isinstance(error, VerificationError):
        return f"certificate does not match {_names(error)}"
    if isinstance(error, SSL.Error):
        details = []
        for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
            if isinstance(item, tuple) and item:
                details.append(str(item[-1]))
        return "; ".join(d for d in details if d) or "TLS handshake failed"
    return None


def _names(error: Exception) -> str:
    text = str(error)
    return text[:200] if text else "the upstream's name"
