"""What C{smtpproxy probe} and C{smtpproxy send} share: where to connect, TLS, passwords.

- L{parse_target} reads C{HOST}, C{HOST:PORT} and C{[IPv6]:PORT}, with the
  port defaulting by mode (465 for implicit TLS, 25 otherwise);
- L{endpoint} is a Twisted client endpoint for it, wrapped in TLS for
  implicit TLS (C{--tls});
- L{verifying_tls} checks the server's certificate and name during the
  handshake, as a mail client must before it sends a password or a
  message; L{observing_tls} completes the handshake whatever the
  certificate, for the probe, which verifies afterwards
  (L{smtpproxy.tools.certs}) so it can say what is wrong;
- L{session_facts} reads the negotiated version, cipher and chain;
- L{read_password} takes the password from a file or a prompt, never
  from the command line, where C{ps} and shell history would show it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from smtpproxy.tools import certs

__all__ = [
    "TLSFacts",
    "Target",
    "UsageError",
    "add_connection_arguments",
    "describe_error",
    "endpoint",
    "observing_tls",
    "parse_target",
    "react",
    "read_password",
    "session_facts",
    "verifying_tls",
]

#: The connection modes, as the reports name them.
MODES = {"plain": "no TLS", "starttls": "STARTTLS", "tls": "implicit TLS"}
SUBMISSIONS_PORT = 465
SMTP_PORT = 25


class UsageError(Exception):
    """A command line the tool cannot act on; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str, *, implicit_tls: bool) -> Target:
    """C{mail.example.com}, C{mail.example.com:587}, C{192.0.2.1:25}, C{[2001:db8::1]:465}.

    @raise UsageError: no host, a port that is not a number from 1 to 65535.
    """
    value = text.strip()
    default = SUBMISSIONS_PORT if implicit_tls else SMTP_PORT
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"{text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif value.count(":") > 1:
        host, port_text = value, ""  # a bare IPv6 address
    else:
        host, _, port_text = value.partition(":")
    if not host:
        raise UsageError(f"{text!r}: no host name")
    if not port_text:
        return Target(host, default)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{text!r}: {port_text!r} is not a port number")
    return Target(host, int(port_text))


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both tools take for reaching a server: TLS mode, CAs, AUTH, timeout."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--starttls", action="store_true", help="upgrade to TLS with STARTTLS (fail if refused)"
    )
    mode.add_argument(
        "--tls", action="store_true", help="implicit TLS from the first byte (port 465)"
    )
    parser.add_argument(
        "--ca-file", metavar="FILE", help="trust the CA certificates in this PEM file only"
    )
    parser.add_argument("--user", metavar="U", help="AUTH as this user (PLAIN or LOGIN)")
    parser.add_argument(
        "--password-file",
        metavar="F",
        help="read the AUTH password from this file's first line (else a prompt)",
    )
    parser.add_argument(
        "--helo", metavar="NAME", help="the name to send in EHLO (default: this host's name)"
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds to wait for the connection and for each reply (default 30)",
    )
    parser.add_argument(
        "--insecure-auth",
        action="store_true",
        help="allow AUTH without TLS (the password travels in clear text)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def endpoint(
    reactor: object, target: Target, timeout: float, tls: IOpenSSLClientConnectionCreator | None
) -> IStreamClientEndpoint:
    """A TCP endpoint for C{target}, inside TLS from the start when C{tls} is given."""
    plain = HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    if tls is None:
        return plain
    wrapped: IStreamClientEndpoint = wrapClientTLS(tls, plain)
    return wrapped


def verifying_tls(host: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """Client TLS that refuses a certificate not valid for C{host} (system CAs or C{ca_file})."""
    if ca_file is None:
        trust = platformTrust()  # type: ignore[no-untyped-call]  # unannotated in Twisted
    else:
        loaded = [Certificate.load(c.public_bytes(Encoding.DER)) for c in _ca(ca_file)]
        trust = trustRootFromCertificates(loaded)  # type: ignore[no-untyped-call]
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(host, trustRoot=trust)
    return creator


def _ca(path: str) -> list[x509.Certificate]:
    try:
        return certs.load_ca_file(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--ca-file {path}: {getattr(e, 'strerror', None) or e}") from None


def ca_certificates(path: str | None) -> list[x509.Certificate] | None:
    """The certificates of C{--ca-file}, or C{None} for the system store."""
    return None if path is None else _ca(path)


@implementer(IOpenSSLClientConnectionCreator)
class _Observing:
    """Client TLS that accepts any certificate, sending the host name (SNI) as a client would.

    Only the probe uses it, and it verifies the chain itself afterwards;
    nothing secret is sent before that verdict is printed.  C{client} is a
    certificate to show the server (the doctor's C{RELAY_CLIENT_CERT_FILE}).
    """

    def __init__(self, host: str, client: PrivateCertificate | None = None) -> None:
        self._options = (
            CertificateOptions(verify=False)
            if client is None
            else CertificateOptions(
                privateKey=client.privateKey.original,
                certificate=client.original,
                verify=False,
            )
        )
        self._name = _sni(host)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._name is not None:
            connection.set_tlsext_host_name(self._name)
        return connection


def observing_tls(
    host: str, client: PrivateCertificate | None = None
) -> IOpenSSLClientConnectionCreator:
    return _Observing(host, client)


def _sni(host: str) -> bytes | None:
    """The SNI name for C{host}: none for an address literal (RFC 6066 3)."""
    if ":" in host or host.replace(".", "").isdigit():
        return None
    try:
        return host.encode("idna")
    except UnicodeError:
        return None


class HasHandle(Protocol):
    """A TLS transport: C{getHandle()} is its OpenSSL connection."""

    def getHandle(self) -> object: ...


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What a completed handshake negotiated, and the chain the server sent."""

    version: str
    cipher: str
    bits: int
    chain: tuple[x509.Certificate, ...]


def session_facts(handle: object) -> TLSFacts | None:
    """Read an OpenSSL connection (a TLS transport's C{getHandle()}) after its handshake."""
    if not isinstance(handle, SSL.Connection):
        return None
    chain = handle.get_peer_cert_chain(as_cryptography=True) or []
    return TLSFacts(
        version=handle.get_protocol_version_name(),
        cipher=handle.get_cipher_name() or "",
        bits=handle.get_cipher_bits() or 0,
        chain=tuple(chain),
    )


def read_password(
    user: str | None,
    password_file: str | None,
    *,
    prompt: bool = True,
    stdin: TextIO | None = None,
) -> str | None:
    """The AUTH password: the first line of C{password_file}, or typed at a prompt.

    A file's trailing line end is not part of the password; anything else
    (leading or trailing spaces) is.  Without a file and without a
    terminal to prompt on, this is a usage error, not an empty password.
    """
    if user is None:
        if password_file is not None:
            raise UsageError("--password-file needs --user")
        return None
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                line = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text"
            raise UsageError(f"--password-file {password_file}: {why}") from None
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise UsageError(f"--password-file {password_file}: the first line is empty")
        return password
    source = stdin or sys.stdin
    if not prompt or not source.isatty():
        raise UsageError("--user needs --password-file (no terminal to ask for the password)")
    return getpass.getpass(f"Password for {user}: ")


def react(run: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Run C{run(reactor)} under C{task.react}, which owns the reactor until it is done.

    C{task.react} ends by raising C{SystemExit}; a success is swallowed here
    so the command returns its own exit status, and anything else (an
    unexpected error, already printed by C{react}) passes on.
    """
    from twisted.internet import task

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def describe_error(error: BaseException, timeout: float) -> str:
    """A failure in words: a timeout, a refused connection, an OpenSSL reason."""
    if isinstance(error, TwistedTimeoutError | TimeoutError | CancelledError):
        return f"no answer within {timeout:g} s"
    reasons = getattr(error, "args", ())
    # OpenSSL errors carry a list of (library, function, reason) tuples.
    if reasons and isinstance(reasons[0], list):
        texts = [str(entry[2]) for entry in reasons[0] if isinstance(entry, tuple)]
        if texts:
            return "; ".join(texts)
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
