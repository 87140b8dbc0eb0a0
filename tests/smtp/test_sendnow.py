"""L{smtpproxy.smtp.sendnow}: replies sent at once, without losing Twisted's guarantees.

Sending straight to the socket is only safe while it is indistinguishable
from letting the transport send later: nothing of an earlier write may still
be waiting, and a closing or non-TCP transport keeps its own C{write}.
These run over real loopback TCP, because what matters is the bytes the peer
receives and what the real C{tcp.Server} still holds in its buffers.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.smtp.sendnow import writer_for
from smtpproxy.twisted_private import buffered_bytes
from tests.support import TIMEOUT, async_test, in_thread

# Small kernel buffers on both ends: a large write then cannot fit in them,
# however generous the machine's TCP autotuning is.
SMALL_BUFFER = 64 * 1024
BIG = 8 * 1024 * 1024


class _Server(protocol.Protocol):
    """Tells the test when it is connected and when the connection is gone."""

    def __init__(self) -> None:
        self.made: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(None)


class _ServerFactory(protocol.ServerFactory):
    def __init__(self) -> None:
        self.built: list[_Server] = []

    def buildProtocol(self, addr: Any) -> _Server:
        server = _Server()
        server.factory = self
        self.built.append(server)
        return server


def read_exactly(sock: socket.socket, count: int) -> bytes:
    """Blocking: read until C{count} bytes arrived or the peer closed."""
    chunks: list[bytes] = []
    got = 0
    while got < count:
        chunk = sock.recv(min(count - got, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_to_eof(sock: socket.socket) -> bytes:
    """Blocking: read until the peer closes (bounded by the socket's timeout)."""
    chunks: list[bytes] = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def numbered(size: int) -> bytes:
    """C{size} bytes in which every 8-byte record is different: reordering shows."""
    records = size // 8
    return b"".join(b"%07d\n" % i for i in range(records))


def held(transport: Any) -> int:
    """Bytes the transport holds in user space, not yet given to the socket."""
    return buffered_bytes(transport)


class LoopbackTests(TestCase):
    """The writer on a real C{tcp.Server} with a plain socket as the peer."""

    async def connect(self, small_buffers: bool = False) -> tuple[Any, socket.socket]:
        """A server transport and the client socket connected to it; closed at cleanup."""
        from twisted.internet import reactor

        factory = _ServerFactory()
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        if small_buffers:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        client.settimeout(TIMEOUT)
        # The kernel completes the handshake from the listen backlog; the
        # reactor accepts once the test waits below.
        client.connect(("127.0.0.1", port.getHost().port))
        for _ in range(100):
            if factory.built:
                break
            await _turn()
        [server] = factory.built
        await server.made

        transport: Any = server.transport

        async def close() -> None:
            client.close()
            if transport.connected:
                transport.abortConnection()
            await server.lost

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
        if small_buffers:
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        return transport, client

    @async_test
    async def test_small_write_is_sent_at_once(self) -> None:
        """A reply on an idle connection leaves no bytes behind in the transport."""
        transport, client = await self.connect()
        write = writer_for(transport)
        write(b"250 2.0.0 OK\r\n")
        # Twisted's own write would leave the bytes in _tempDataBuffer until
        # the reactor's next turn; sent now, nothing is held.
        self.assertEqual(held(transport), 0)
        self.assertEqual(await in_thread(read_exactly, client, 14), b"250 2.0.0 OK\r\n")

    @async_test
    async def test_large_write_keeps_order(self) -> None:
        """What the socket does not take is buffered, and later writes queue behind it.

        The peer reads nothing until all writes are made, so the first write
        fills the socket and leaves the rest with the transport.  Later small
        writes must then wait behind that rest (sent directly they would
        overtake it), and once everything is read the writer sends directly
        again.
        """
        transport, client = await self.connect(small_buffers=True)
        write = writer_for(transport)
        big = numbered(BIG)
        write(big)
        after_big = held(transport)
        self.assertGreater(after_big, 0, "the socket took 8 MB at once: test proves nothing")
        self.assertLess(after_big, len(big), "nothing was sent at once")
        tails = [b"250 2.0.0 OK %d\r\n" % i for i in range(3)]
        for tail in tails:
            write(tail)
        self.assertEqual(held(transport), after_big + sum(map(len, tails)))
        expected = big + b"".join(tails)
        received = await in_thread(read_exactly, client, len(expected))
        self.assert_same_bytes(received, expected)

        # Everything was read, so the transport's buffers are empty again.
        self.assertEqual(held(transport), 0)
        write(b"221 bye\r\n")
        self.assertEqual(held(transport), 0)
        self.assertEqual(await in_thread(read_exactly, client, 9), b"221 bye\r\n")

    @async_test
    async def test_closing_connection_uses_the_transport(self) -> None:
        """After loseConnection a write is left to the transport, which sends it before closing."""
        transport, client = await self.connect()
        write = writer_for(transport)
        transport.loseConnection()
        write(b"421 closing\r\n")
        self.assertEqual(held(transport), len(b"421 closing\r\n"))
        self.assertEqual(await in_thread(read_to_eof, client), b"421 closing\r\n")

    def assert_same_bytes(self, received: bytes, expected: bytes) -> None:
        """Equal, or a failure naming the first differing offset (not 8 MB of repr)."""
        if received == expected:
            return
        first = next(
            (i for i, (a, b) in enumerate(zip(received, expected, strict=False)) if a != b),
            min(len(received), len(expected)),
        )
        self.fail(
            f"received {len(received)} bytes, expected {len(expected)}; first difference "
            f"at {first}: {received[first : first + 16]!r} != {expected[first : first + 16]!r}"
        )


class OtherTransportTests(SynchronousTestCase):
    def test_other_transports_write_as_usual(self) -> None:
        """Anything but a plain tcp.Server gets its own write back, untouched."""
        transport = StringTransport()
        write = writer_for(transport)
        self.assertEqual(write, transport.write)
        write(b"220 hello\r\n")
        self.assertEqual(transport.value(), b"220 hello\r\n")


def _turn() -> defer.Deferred[None]:
    """Let the reactor run one short round (to accept a connection)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: None)
