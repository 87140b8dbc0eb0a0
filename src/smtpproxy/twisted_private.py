"""The private Twisted API smtpproxy still uses, in one place, checked at start-up.

Everything else goes through Twisted's public API.  Two needs have no public
equivalent:

- Decoding a PROXY protocol v2 header.  C{twisted.protocols.haproxy}
  exports only C{proxyEndpoint}, whose wrapper starts the session before
  the header has named the client (see L{smtpproxy.proxyheader}); its
  binary parser lives in the private C{_v2parser} module.
- Knowing that a TCP transport holds no unsent bytes, which
  L{smtpproxy.sendnow} needs before it may write to the socket directly.
  No interface says how much a transport has buffered: C{FileDescriptor}
  keeps it in C{dataBuffer} (an attribute without an underscore, but not
  part of any interface) and the private C{_tempDataLen}.

A Twisted upgrade may change either without notice.  L{check} runs each on a
known input and raises L{TwistedChangedError} naming what no longer behaves as
expected; C{twistd smtpproxy} runs it before it binds (one line, exit status
1), and C{tests/test_twisted_private.py} runs it in CI.
"""

from __future__ import annotations

import socket
from typing import cast

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress, IReactorFDSet
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._v2parser import V2Parser

# A v2 PROXY header: PROXY command, TCP over IPv4, 192.0.2.1:56324 connected
# to 198.51.100.2:25; and the LOCAL command a balancer's health check sends.
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_TCP4 = (
    _V2_SIGNATURE
    + b"\x21\x11\x00\x0c"
    + bytes([192, 0, 2, 1, 198, 51, 100, 2])
    + (56324).to_bytes(2, "big")
    + (25).to_bytes(2, "big")
)
_V2_LOCAL = _V2_SIGNATURE + b"\x20\x00\x00\x00"


class TwistedChangedError(Exception):
    """The installed Twisted no longer behaves as smtpproxy's private uses expect."""


def parse_proxy_v2(header: bytes) -> tuple[IAddress | None, IAddress | None]:
    """The (source, destination) a complete v2 header names; None for LOCAL.

    Raises whatever Twisted's parser raises on a malformed header: the caller
    treats any exception as a refused header.
    """
    info = V2Parser.parse(header)
    return info.source, info.destination


def write_buffer_empty(transport: FileDescriptor) -> bool:
    """Whether a C{tcp.Server} holds no bytes that earlier writes left unsent."""
    return not transport.dataBuffer and not transport._tempDataLen


def buffered_bytes(transport: FileDescriptor) -> int:
    """How many written bytes a C{tcp.Server} still holds (for tests and diagnostics)."""
    return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)


def check() -> None:
    """Exercise every private use on a known input.

    @raise TwistedChangedError: naming the use that broke and the Twisted version.
    """
    for name, probe in (("PROXY v2 parser", _check_proxy_v2), ("TCP write buffer", _check_tcp)):
        try:
            probe()
        except Exception as e:
            import twisted

            raise TwistedChangedError(
                f"Twisted {twisted.__version__}: the {name} smtpproxy relies on "
                f"changed ({type(e).__name__}: {e}); see smtpproxy/twisted_private.py"
            ) from e


def _check_proxy_v2() -> None:
    source, destination = parse_proxy_v2(_V2_TCP4)
    expected = (IPv4Address("TCP", "192.0.2.1", 56324), IPv4Address("TCP", "198.51.100.2", 25))
    if (source, destination) != expected:
        raise AssertionError(f"TCP4 header read as {source!r}, {destination!r}")
    local = parse_proxy_v2(_V2_LOCAL)
    if local != (None, None):
        raise AssertionError(f"LOCAL header read as {local!r}")


class _NoReactor:
    """The four calls a C{FileDescriptor} makes on its reactor; nothing is polled."""

    def addReader(self, reader: object) -> None:
        pass

    def removeReader(self, reader: object) -> None:
        pass

    def addWriter(self, writer: object) -> None:
        pass

    def removeWriter(self, writer: object) -> None:
        pass


def _check_tcp() -> None:
    """What sendnow relies on: write() only buffers, doWrite() sends and empties."""
    ours, peer = socket.socketpair()
    try:
        peer.setblocking(False)
        reactor = cast(IReactorFDSet, _NoReactor())
        no_port = cast(tcp.Port, None)  # a connection accepted by no listener
        transport = tcp.Server(ours, Protocol(), ("192.0.2.1", 1), no_port, 0, reactor)
        if not write_buffer_empty(transport) or buffered_bytes(transport) != 0:
            raise AssertionError("a new transport reports buffered bytes")
        transport.write(b"ping")
        if write_buffer_empty(transport) or buffered_bytes(transport) != 4:
            raise AssertionError("write() did not show in the buffer")
        try:
            early = peer.recv(16)
        except BlockingIOError:
            early = b""
        if early:
            raise AssertionError("write() sent at once instead of buffering")
        transport.doWrite()
        if not write_buffer_empty(transport) or buffered_bytes(transport) != 0:
            raise AssertionError("doWrite() did not empty the buffer")
        if transport.writeSomeData(b"!") != 1:
            raise AssertionError("writeSomeData() did not report the bytes sent")
        if peer.recv(16) != b"ping!":
            raise AssertionError("the bytes did not arrive in order")
        for attribute in ("TLS", "disconnecting", "connected"):
            if not hasattr(transport, attribute):
                raise AssertionError(f"tcp.Server has no {attribute}")
    finally:
        ours.close()
        peer.close()
