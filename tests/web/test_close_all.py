"""The HTTP listener's last step at the stop: answers already written reach their clients.

The defect (queue mode, SIGTERM while submissions wait for the store): a
202 decided in the stop's final reactor turn sat in its connection's send
buffer when the reactor's shutdown dropped every connection without
flushing it, so the client heard nothing for a stored message and sent it
again.  L{ConnectionCap.close_all} closes each connection only after its
buffer is written, bounded for clients that do not read.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from smtpproxy.web.site import ConnectionCap

ANSWER = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}"


class Answering(Protocol):
    """Writes its answer as soon as it is connected (as a finished request does)."""

    answer = ANSWER

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.answer)


def cap(protocol: type[Protocol] = Answering) -> ConnectionCap:
    return ConnectionCap(Factory.forProtocol(protocol), 8, lambda reason: None)


def connect(factory: ConnectionCap) -> StringTransport:
    transport = StringTransport()
    wrapper = factory.buildProtocol(None)
    assert wrapper is not None
    wrapper.makeConnection(transport)
    return transport


class CloseAllTests(TestCase):
    def test_closes_after_flushing_and_waits_for_the_close(self) -> None:
        """Each connection is closed with loseConnection (which sends the buffer
        first), never aborted while it still can flush, and close_all fires only
        once every connection has actually closed."""
        clock = Clock()
        factory = cap()
        transports = [connect(factory) for _ in range(3)]
        done = factory.close_all(clock, 1.0)
        for transport in transports:
            self.assertTrue(transport.disconnecting)
            self.assertFalse(transport.disconnected)  # not aborted
            self.assertEqual(transport.value(), ANSWER)
        self.assertNoResult(done)
        wrappers = list(factory.protocols)
        for wrapper in wrappers[:-1]:
            wrapper.connectionLost(Failure(ConnectionError("closed")))
        self.assertNoResult(done)
        wrappers[-1].connectionLost(Failure(ConnectionError("closed")))
        self.successResultOf(done)
        self.assertEqual(factory.open_connections, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_client_that_does_not_read_is_cut_off(self) -> None:
        """A connection whose buffer never drains is aborted after the timeout, so
        it cannot hold the stop up; not a moment before."""
        clock = Clock()
        factory = cap()
        transport = connect(factory)
        done = factory.close_all(clock, 1.0)
        clock.advance(0.99)
        self.assertFalse(transport.disconnected)
        clock.advance(0.01)
        self.assertTrue(transport.disconnected)  # abortConnection
        [wrapper] = list(factory.protocols)
        wrapper.connectionLost(Failure(ConnectionError("aborted")))
        self.successResultOf(done)

    def test_no_connection_fires_at_once(self) -> None:
        """Nothing open: nothing to wait for."""
        self.successResultOf(cap().close_all(Clock(), 1.0))
