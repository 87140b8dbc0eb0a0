"""Replies to one read leave in one write, and never late or out of order.

A client that pipelines gets all the replies to what it sent together back
in one write (one TCP segment, one system call); a client in lock step gets
each reply as soon as it exists.  Collecting replies must not change what is
sent before what: the 220 to STARTTLS goes out in plaintext before the TLS
handshake starts, and the 221 to QUIT before the connection is closed.

Most cases run a session over a L{StringTransport} that records each
C{write}, C{startTLS} and C{loseConnection} in order; one runs STARTTLS over
real loopback TCP, where a 220 sent after the handshake began would arrive
encrypted.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Sequence

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import alsoProvides

from smtpproxy import tls
from smtpproxy.delivery import RelayRealm
from smtpproxy.policy.guard import Guard
from smtpproxy.smtp.base import PAUSE_INPUT_AT
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from tests.support import (
    OPEN,
    TIMEOUT,
    RecordingProvider,
    async_test,
    certificate,
    client_tls,
    codes,
    in_thread,
    read_replies,
    session_defaults,
    start_relay,
)

ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
BODY = b"Subject: batched\r\n\r\nHello.\r\n.\r\n"


class RecordingTransport(StringTransport):
    """A StringTransport that remembers every write and close, in order."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.events: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        self.events.append(("write", data))
        super().write(data)

    def loseConnection(self) -> None:
        self.events.append(("loseConnection", b""))
        super().loseConnection()

    def writes(self) -> list[bytes]:
        return [data for event, data in self.events if event == "write"]


class RecordingTLSTransport(RecordingTransport):
    """Also offers STARTTLS, recording when the handshake would begin."""

    def __init__(self) -> None:
        super().__init__()
        # Declared on the instance: StringTransport lacks the TCP options
        # ITLSTransport inherits, and the session only asks providedBy().
        alsoProvides(self, ITLSTransport)

    def startTLS(self, contextFactory: object) -> None:
        self.events.append(("startTLS", b""))


class FlowControlTransport(RecordingTransport):
    """Asks its producer to pause once it holds more than C{limit} unread bytes.

    That is what Twisted's TCP transport does when the peer does not read
    its replies; here the "peer" reads only when the test says so.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.unread = 0
        self.paused_us = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        if self.unread > self.limit and not self.paused_us and self.producer is not None:
            self.paused_us = True
            self.producer.pauseProducing()

    def peer_reads_everything(self) -> None:
        self.unread = 0
        if self.paused_us:
            self.paused_us = False
            assert self.producer is not None
            self.producer.resumeProducing()


def final_codes(data: bytes) -> list[int]:
    """The codes of the final lines of the replies in C{data} (continuations skipped)."""
    lines = data.split(b"\r\n")
    return [int(line[:3]) for line in lines if len(line) > 3 and line[3:4] == b" "]


def connect(
    transport: RecordingTransport,
    provider: RecordingProvider | None = None,
    tls_enabled: bool = False,
) -> RelayProtocol:
    """A session on a Clock over C{transport}; the greeting is cleared away."""
    clock = Clock()
    portal = Portal(RelayRealm(provider or RecordingProvider(), clock))
    portal.registerChecker(AllowAnonymousAccess())
    options = tls.server_context(*certificate()) if tls_enabled else None
    settings = session_defaults()
    guard = Guard(dataclasses.replace(OPEN, auth_enabled=False), clock)
    factory = RelayFactory(settings, portal, options, clock, guard)
    session = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
    session.makeConnection(transport)
    assert final_codes(transport.value()) == [220]
    transport.events.clear()
    transport.clear()
    return session


class BatchingTests(SynchronousTestCase):
    def test_pipelined_replies_leave_in_one_write(self) -> None:
        """Four pipelined commands in one read: four replies in one write."""
        transport = RecordingTransport()
        session = connect(transport)
        session.dataReceived(ENVELOPE)
        [written] = transport.writes()
        self.assertEqual(final_codes(written), [250, 250, 250, 354])

    def test_end_of_data_and_quit_leave_together_then_close(self) -> None:
        """The 250 for the message and QUIT's 221 share a write, and the close comes after."""
        transport = RecordingTransport()
        provider = RecordingProvider()
        session = connect(transport, provider)
        session.dataReceived(ENVELOPE)
        transport.events.clear()
        session.dataReceived(BODY + b"QUIT\r\n")
        self.assertEqual(len(provider.emails), 1)
        self.assertEqual([event for event, _ in transport.events], ["write", "loseConnection"])
        self.assertEqual(final_codes(transport.writes()[0]), [250, 221])

    def test_lock_step_replies_leave_at_once(self) -> None:
        """One command per read: each reply is written before the next command arrives."""
        transport = RecordingTransport()
        session = connect(transport)
        steps = [
            (b"EHLO c\r\n", 250),
            (b"MAIL FROM:<a@example.com>\r\n", 250),
            (b"RCPT TO:<b@example.org>\r\n", 250),
            (b"DATA\r\n", 354),
            (BODY, 250),
            (b"NOOP\r\n", 250),
        ]
        for number, (command, code) in enumerate(steps, 1):
            session.dataReceived(command)
            writes = transport.writes()
            self.assertEqual(len(writes), number, command)
            self.assertEqual(final_codes(writes[-1]), [code], command)

    def test_late_reply_is_written_when_ready(self) -> None:
        """A reply that waits on the provider goes out when it fires, not with the next read.

        The NOOP pipelined behind the message waits its turn, and its reply
        follows the delivery's.
        """
        transport = RecordingTransport()
        provider = RecordingProvider()
        sending: defer.Deferred[None] = defer.Deferred()
        provider.outcomes.append(sending)
        session = connect(transport, provider)
        session.dataReceived(ENVELOPE)
        transport.events.clear()
        session.dataReceived(BODY + b"NOOP\r\n")
        self.assertEqual(transport.writes(), [])
        sending.callback(None)
        self.assertEqual(final_codes(b"".join(transport.writes())), [250, 250])
        self.assertIn(b"delivered", transport.writes()[0])

    def test_quit_reply_is_written_before_close(self) -> None:
        """In lock step too, QUIT's 221 is written and only then is the connection closed."""
        transport = RecordingTransport()
        session = connect(transport)
        session.dataReceived(b"QUIT\r\n")
        self.assertEqual([event for event, _ in transport.events], ["write", "loseConnection"])
        self.assertEqual(final_codes(transport.writes()[0]), [221])

    def test_starttls_reply_is_written_before_handshake(self) -> None:
        """EHLO and STARTTLS in one read: both replies are written, then startTLS; nothing after.

        The MAIL pipelined behind STARTTLS arrived in plaintext and is
        dropped, so it gets no reply at all.
        """
        transport = RecordingTLSTransport()
        session = connect(transport, tls_enabled=True)
        session.dataReceived(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual([event for event, _ in transport.events], ["write", "startTLS"])
        self.assertEqual(final_codes(transport.writes()[0]), [250, 220])

    def test_flow_control_can_pause_a_long_batch(self) -> None:
        """Replies past PAUSE_INPUT_AT are handed over early, so a full transport can stop us.

        Ten thousand pipelined NOOPs in one read would otherwise all be
        answered into one huge write before the transport could say that
        the client is not reading.
        """
        noops = 10_000
        transport = FlowControlTransport(limit=PAUSE_INPUT_AT)
        session = connect(transport)
        session.dataReceived(b"NOOP\r\n" * noops)
        answered = len(final_codes(transport.value()))
        self.assertLess(answered, noops)
        self.assertEqual(transport.producerState, "paused")
        reply = len(b"250 2.0.0 OK\r\n")
        for data in transport.writes():
            self.assertLessEqual(len(data), PAUSE_INPUT_AT + reply)
        for _ in range(noops):
            if not transport.paused_us:
                break
            transport.peer_reads_everything()
        self.assertEqual(final_codes(transport.value()), [250] * noops)
        self.assertEqual(transport.producerState, "producing")


class StartTLSLoopbackTests(TestCase):
    @async_test
    async def test_pipelined_starttls_over_tcp(self) -> None:
        """EHLO+STARTTLS in one segment: the 220 arrives in plaintext, then TLS works.

        Sent after the handshake began, the 220 would arrive encrypted (or
        not at all); replies after the handshake must not bypass TLS either.
        """
        relay = start_relay(self)

        def client(port: int) -> tuple[list[str], list[str]]:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                greeting = read_replies(raw, 1)
                raw.sendall(b"EHLO c\r\nSTARTTLS\r\n")
                plain = greeting + read_replies(raw, 2)
                with client_tls().wrap_socket(raw) as secure:
                    secure.sendall(b"EHLO c\r\nQUIT\r\n")
                    return plain, read_replies(secure, 2)

        plain, secure = await in_thread(client, relay.port)
        self.assertEqual(codes(plain), [220, 250, 220])
        self.assertEqual(codes(secure), [250, 221])


class LineAtATimeTests(SynchronousTestCase):
    """A chunk holding exactly one command line skips the input buffer; nothing else may change."""

    SESSION: tuple[bytes, ...] = (
        b"EHLO client.test\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"NOOP\n",  # a bare LF ends a command line too
        b"BOGUS\r\n",
        b"\r\n",  # an empty line is a (bad) command
        b"DATA\r\n",
        b"Subject: s\r\n\r\nbody\r\n.\r\n",
        b"QUIT\r\n",
    )

    def replies(self, chunks: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
        provider = RecordingProvider()
        transport = RecordingTransport()
        session = connect(transport, provider)
        for chunk in chunks:
            session.dataReceived(chunk)
        # Message ids are random; everything else must match byte for byte.
        replies = re.sub(rb"delivered as [0-9a-f]+", b"delivered as ID", transport.value())
        return replies, [email.raw for email in provider.emails]

    def test_one_line_per_read_answers_as_one_big_read(self) -> None:
        """Lock-step chunks get the same replies and delivery as everything sent at once."""
        one_by_one = self.replies(self.SESSION)
        at_once = self.replies([b"".join(self.SESSION)])
        self.assertEqual(one_by_one, at_once)
        self.assertEqual(final_codes(one_by_one[0]), [250, 250, 250, 250, 500, 500, 354, 250, 221])

    def test_empty_read_is_not_a_command(self) -> None:
        """An empty chunk (no bytes at all) is nothing, not an empty command line."""
        chunks = [c for line in self.SESSION for c in (b"", line)]
        self.assertEqual(self.replies(chunks), self.replies(self.SESSION))

    def test_line_split_at_its_cr_lf(self) -> None:
        """A line whose LF arrives alone is still one command, answered once."""
        chunks = [b"EHLO client.test\r", b"\n", b"NOOP\r\n"]
        self.assertEqual(final_codes(self.replies(chunks)[0]), [250, 250])
