"""What a listen setting turns into: the address to bind and the layers in front of a session.

C{SMTP_LISTEN} speaks SMTP with STARTTLS, unless its value is an C{ssl:}
endpoint string; C{SMTPS_LISTEN} always speaks implicit TLS (RFC 8314,
port 465: the TLS handshake comes first, the SMTP greeting inside it).
Either may start with C{haproxy:}, and then the PROXY header comes first of
all, in plain text, as a load balancer passing TLS through sends it.

Twisted's own C{ssl:} endpoint would build a second TLS context from the
files named in the string, with Twisted's default versions and ciphers
rather than the relay's checked certificate and policy (L{smtpproxy.tls}),
and it would sit below the PROXY header layer instead of above it.  So an
C{ssl:} value is taken apart here: the relay binds the same address with
C{tcp:} and wraps each connection in Twisted's TLS layer
(L{TLSMemoryBIOFactory}) with the one context built at start-up, the one
STARTTLS uses too.  Its C{privateKey=} and C{certKey=} name the
certificate files when C{TLS_CERT_FILE} does not.

L{plan} and L{certificate_files} are pure; L{wrap} assembles the factories.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtpproxy.policy import pressure
from smtpproxy.smtp import proxyheader

__all__ = ["ListenError", "Listener", "certificate_files", "plan", "wrap"]

# Options of Twisted's ssl: server endpoint that carry over to the tcp: one.
_ADDRESS_OPTIONS = ("port", "interface", "backlog")


class ListenError(ValueError):
    """A listen value the relay cannot serve as written."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One SMTP listener: where it binds and what comes before the SMTP session."""

    setting: str
    #: A Twisted server endpoint description, never C{ssl:} or C{haproxy:}.
    endpoint: str
    #: The PROXY protocol header is read first (C{haproxy:}).
    proxy: bool = False
    #: The TLS handshake comes before the greeting.
    implicit_tls: bool = False
    #: Certificate files named by an C{ssl:} value (C{certKey=}, C{privateKey=}).
    cert_file: str = ""
    key_file: str = ""


def plan(setting: str, description: str, *, implicit_tls: bool = False) -> Listener:
    """Read a listen value (as L{smtpproxy.config.listen_endpoint} returns it).

    @param implicit_tls: every connection starts with TLS whatever the value
        says (C{SMTPS_LISTEN}); otherwise only an C{ssl:} value does.
    @raise ListenError: an C{ssl:} option the relay does not honour.
    """
    proxy, rest = proxyheader.split_proxy(description)
    parts = pressure.split_endpoint(rest)
    cert_file = key_file = ""
    if parts[0] == "ssl":
        rest, cert_file, key_file = _from_ssl(parts)
        implicit_tls = True
    elif parts[0] == "haproxy":
        raise ListenError("haproxy: may appear only once, at the start")
    return Listener(
        setting,
        pressure.with_backlog(rest),
        proxy=proxy,
        implicit_tls=implicit_tls,
        cert_file=cert_file,
        key_file=key_file,
    )


def _from_ssl(parts: list[str]) -> tuple[str, str, str]:
    """C{ssl:465:privateKey=k.pem} → C{("tcp:465", "k.pem", "k.pem")}."""
    kept = ["tcp"]
    cert_file = key_file = ""
    positional = 0
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if not eq:
            positional += 1
            if positional > 1:
                raise ListenError(f"ssl: takes the port, then name=value options; got {part!r}")
            kept.append(part)
        elif name in _ADDRESS_OPTIONS:
            kept.append(part)
        elif name == "privateKey":
            key_file = _unescape(value)
        elif name == "certKey":
            cert_file = _unescape(value)
        else:
            raise ListenError(
                f"ssl: option {name!r} is not supported: every listener uses the relay's "
                "TLS settings (TLS_CERT_FILE with its chain, TLS 1.2 or later)"
            )
    if cert_file and not key_file:
        raise ListenError("ssl: certKey= needs privateKey= as well")
    # As in Twisted's ssl: endpoint, one file may hold both.
    return ":".join(kept), cert_file or key_file, key_file


def _unescape(value: str) -> str:
    """Undo the backslash escapes of Twisted's endpoint syntax (C{\\:} is a colon)."""
    out: list[str] = []
    escaped = False
    for char in value:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def certificate_files(cert_file: str, key_file: str, listeners: list[Listener]) -> tuple[str, str]:
    """The certificate files to load: C{TLS_CERT_FILE}/C{TLS_KEY_FILE}, or an C{ssl:} value's.

    One certificate serves every listener and STARTTLS, so two different
    sources of it are an error rather than a silent choice.  C{("", "")}
    means none was named (the relay generates one).
    """
    named = {(spec.cert_file, spec.key_file) for spec in listeners if spec.key_file}
    if cert_file:
        named.add((cert_file, key_file))
    if len(named) > 1:
        raise ListenError(
            "the certificate is named twice (TLS_CERT_FILE and privateKey= in an ssl: "
            "listen value, or two different ssl: values); one certificate serves every listener"
        )
    return named.pop() if named else ("", "")


def wrap(
    spec: Listener,
    factory: IProtocolFactory,
    context: CertificateOptions,
    reactor: IReactorTime,
) -> IProtocolFactory:
    """The factory to listen with: the PROXY header outside, then TLS, then the session."""
    wrapped = factory
    if spec.implicit_tls:
        wrapped = TLSMemoryBIOFactory(context, False, wrapped, reactor)
    if spec.proxy:
        wrapped = proxyheader.ProxyHeaderFactory(wrapped, reactor)
    return wrapped
