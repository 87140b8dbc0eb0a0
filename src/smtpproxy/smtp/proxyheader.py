"""PROXY protocol (v1 and v2) in front of the SMTP listener.

Twisted's own C{haproxy:} endpoint connects the wrapped protocol as soon as
TCP connects, before the header has said who the client is.  An SMTP server
speaks first and takes its policy decisions at connect time, so it would
greet, log and judge the load balancer's address instead of the client's.
This wrapper holds the SMTP session back until the header is parsed, and
drops connections that never send one.

The header is untrusted input, so it is read by L{parse_header}, a pure
function that either returns what the header says, asks for more bytes, or
raises L{HeaderError} with a short reason; the wrapper turns that into one
log line and a closed connection, never a traceback.  The text form (v1) is
parsed here in full: Twisted's parser lets C{UnicodeDecodeError} and
C{ValueError} escape on odd bytes, refuses the valid C{PROXY UNKNOWN}, and
takes any text for an address.  The binary form (v2) is framed and bounded
here and decoded by Twisted's private C{V2Parser}, reached through
L{smtpproxy.twisted_private} (which checks it at start-up).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, TypeGuard

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from smtpproxy.logsummary import LogSummary
from smtpproxy.policy.rules import client_name
from smtpproxy.twisted_private import parse_proxy_v2

log = Logger(namespace="smtpproxy.proxyheader")

PREFIX = "haproxy:"
# A load balancer sends the header with its first packet; a peer that has
# said nothing for this long is not one.
HEADER_TIMEOUT = 10.0
MAX_HEADER = 536  # v1 is at most 107 bytes; v2 with TLVs stays well below this

V1_SIGNATURE = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length


class HeaderError(Exception):
    """The bytes are not a PROXY header this relay accepts; the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a complete header said.

    @ivar source: the client's address, or None when the header does not
        name one (C{PROXY UNKNOWN}, a v2 C{LOCAL} health check): the
        connection's own peer address is then used.
    @ivar destination: the address the client connected to, or None.
    @ivar length: how many bytes the header took; what follows is SMTP.
    """

    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None
    length: int


def parse_header(data: bytes) -> ProxyHeader | None:
    """Read the PROXY header at the start of C{data}.

    @return: the header, or None while C{data} is a proper prefix of one.
    @raise HeaderError: when C{data} cannot begin with an acceptable header.
    """
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data)
    if data.startswith(V1_SIGNATURE):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data) or V1_SIGNATURE.startswith(data):
        return None
    raise HeaderError("no PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError("PROXY header too long")
        return None
    line, length = data[:end], end + 2
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # The specification: whatever follows UNKNOWN is to be ignored, and
        # the connection's own addresses used (a balancer's health check).
        return ProxyHeader(None, None, length)
    # Printable ASCII only: no other byte has a meaning in a v1 header, and a
    # line holding none of them can be decoded and split without surprises.
    if not line.isascii() or not line.decode("ascii").isprintable():
        raise HeaderError("PROXY header holds bytes that are not printable ASCII")
    fields = line.decode("ascii").split(" ")
    if fields[1] not in ("TCP4", "TCP6") or len(fields) != 6:
        raise HeaderError("malformed PROXY header")
    version = 4 if fields[1] == "TCP4" else 6
    source = _address(version, fields[2], fields[4])
    destination = _address(version, fields[3], fields[5])
    return ProxyHeader(source, destination, length)


def _address(version: int, host: str, port: str) -> IPv4Address | IPv6Address:
    if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise HeaderError("malformed PROXY header: bad port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise HeaderError("malformed PROXY header: bad address") from None
    scoped = isinstance(address, ipaddress.IPv6Address) and address.scope_id
    if address.version != version or scoped:
        raise HeaderError("malformed PROXY header: bad address")
    if isinstance(address, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(address), int(port))
    return IPv6Address("TCP", str(address), int(port))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER:
        raise HeaderError("PROXY header too long")
    if len(data) < length:
        return None
    try:
        source, destination = parse_proxy_v2(data[:length])
    except Exception as error:
        # Twisted's parser of untrusted bytes: whatever it raises means the
        # header is not one we can use (it documents InvalidProxyHeader, but
        # a closed connection is the right answer to anything else too).
        raise HeaderError(f"malformed PROXY header ({type(error).__name__})") from None
    if source is None:
        return ProxyHeader(None, None, length)  # LOCAL, or an unspecified family
    if not (_tcp_over_ip(source) and _tcp_over_ip(destination)):
        raise HeaderError("PROXY header names a client that is not TCP over IP")
    return ProxyHeader(source, destination, length)


def _tcp_over_ip(address: object) -> TypeGuard[IPv4Address | IPv6Address]:
    return isinstance(address, (IPv4Address, IPv6Address)) and address.type == "TCP"


class _HeaderFirstWrapper(ProtocolWrapper):
    factory: ProxyHeaderFactory

    @property
    def _tcp(self) -> Any:
        return self.transport

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._header: ProxyHeader | None = None
        self._pending = b""
        self._timer: IDelayedCall | None = self.factory.reactor.callLater(
            HEADER_TIMEOUT, self._give_up
        )

    def _give_up(self) -> None:
        self._timer = None
        self._log_refusal("no PROXY header received, closing")
        self._tcp.abortConnection()

    def _log_refusal(self, event: str) -> None:
        """One line per peer address and interval: any peer can repeat this at will."""
        peer = self._tcp.getPeer()
        self.factory.log_summary.emit(LogLevel.warn, event, client_name(peer), peer=str(peer))

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:
            return  # rejected or timed out: the connection is closing
        self._pending += data
        try:
            header = parse_header(self._pending)
        except HeaderError as error:
            self._reject(str(error))
            return
        if header is None:
            return
        remaining = self._pending[header.length :]
        self._pending = b""
        self._header = header
        self._stop_timer()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        peer: IAddress = self._tcp.getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        host: IAddress = self._tcp.getHost()
        return host

    def _reject(self, why: str) -> None:
        self._stop_timer()
        self._pending = b""
        self._log_refusal(f"closing connection: {why}")
        self._tcp.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_timer()
        self.factory.unregisterProtocol(self)
        if self._header is not None:
            self.wrappedProtocol.connectionLost(reason)


class ProxyHeaderFactory(WrappingFactory):
    """Wraps the SMTP factory so sessions start after the PROXY header."""

    protocol = _HeaderFirstWrapper

    def __init__(self, wrapped: Any, reactor: IReactorTime) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.log_summary = LogSummary(log, reactor)

    def stopFactory(self) -> None:
        """The listener closed: write the refusals counted so far, stop the timer."""
        self.log_summary.stop()

    def logPrefix(self) -> str:
        return "smtpproxy (PROXY)"


def split_proxy(description: str) -> tuple[bool, str]:
    """C{"haproxy:tcp:2525"} → C{(True, "tcp:2525")}; anything else unchanged."""
    if description.startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description
