"""TLS handshakes, completed and failed, as log events the metrics count.

Each front door that speaks TLS (C{smtps}: implicit TLS on
C{SMTPS_LISTEN} or an C{ssl:} C{SMTP_LISTEN}; C{starttls}; C{https}: the
HTTP listener with C{HTTP_TLS_CERT_FILE}) reports the end of its
handshake here.  Twisted's TLS layer tells the protocol it wraps through
the public L{IHandshakeListener} hook, exactly once per handshake; the
negotiated version is then read from the OpenSSL connection the transport
hands out (C{getHandle}, pyOpenSSL's C{get_protocol_version_name}).

A handshake counts as failed when the connection ends with an OpenSSL
error before it completed (a client that offers only TLS 1.0, speaks
plain text to a TLS port, or rejects the certificate).  A client that
connects and leaves without a word, or is closed for idling, has not
failed a handshake and is not counted: port probes and health checks
would drown the signal.

The events are debug-level log lines, so they reach the metrics observer
(which sees every event) at no cost to an operator's log at C{info}.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["completed", "ended", "version_of"]

log = Logger(namespace="smtpproxy.tls")


def version_of(transport: object) -> str:
    """The negotiated version (C{TLSv1.3}), or C{unknown} when no TLS connection is found."""
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if callable(get_handle) else None
    if isinstance(handle, SSL.Connection):
        return str(handle.get_protocol_version_name())
    return "unknown"


def completed(front_door: str, transport: object) -> None:
    """A handshake on C{front_door} finished; C{transport} carries the TLS connection."""
    log.debug("TLS handshake completed", front_door=front_door, tls_version=version_of(transport))


def ended(front_door: str, reason: Failure | None) -> None:
    """The connection ended before its handshake completed: a failure if OpenSSL said so."""
    if reason is not None and isinstance(reason.value, SSL.Error):
        log.debug("TLS handshake failed", front_door=front_door)
