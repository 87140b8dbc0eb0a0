"""Session timing and lifecycle, driven by a Clock over a StringTransport.

These need control of time, which real sockets cannot give: the idle timer,
delivery that outlasts it, and shutdown.
"""

from __future__ import annotations

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.delivery import RelayRealm
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from tests.support import RecordingProvider, message, open_guard, session_defaults

ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"


class SessionTimingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = RecordingProvider()
        portal = Portal(RelayRealm(self.provider, self.clock))
        portal.registerChecker(AllowAnonymousAccess())
        # The greeting limit as long as the command timeout: these tests are
        # about the command timer (test_tls_and_storms covers the greeting).
        settings = session_defaults(command_timeout=300, greeting_timeout=300, data_timeout=600)
        guard = open_guard(settings, self.clock)
        self.factory = RelayFactory(settings, portal, None, self.clock, guard)

    def connect(self) -> tuple[RelayProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        protocol.makeConnection(transport)
        return protocol, transport

    def replies(self, transport: StringTransport) -> list[int]:
        lines = transport.value().split(b"\r\n")
        return [int(line[:3]) for line in lines if len(line) > 3 and line[3:4] == b" "]

    def test_SEC_030_idle_timeout(self) -> None:
        """An idle session is told 421 4.4.2 and closed after the command timeout."""
        _, transport = self.connect()
        self.clock.advance(299)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(self.replies(transport), [220, 421])
        self.assertTrue(transport.disconnecting)

    def test_SEC_031_byte_at_a_time_client_times_out(self) -> None:
        """A byte-at-a-time client that never finishes a line still times out."""
        protocol, transport = self.connect()
        for _ in range(400):
            protocol.dataReceived(b"N")
            self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_SEC_032_slow_delivery_does_not_time_out(self) -> None:
        """While the provider works the idle timer is off: 250 comes, not 421 (defect 8)."""
        slow: defer.Deferred[None] = defer.Deferred()
        self.provider.outcomes.append(slow)
        protocol, transport = self.connect()
        protocol.dataReceived(ENVELOPE + message() + b".\r\n")
        self.clock.advance(3600)
        self.assertFalse(transport.disconnecting)
        slow.callback(None)
        self.assertEqual(self.replies(transport), [220, 250, 250, 250, 354, 250])
        self.clock.advance(301)
        self.assertTrue(transport.disconnecting)

    def test_shutdown_closes_idle_sessions(self) -> None:
        """At shutdown an idle session hears 421 4.3.2 at once."""
        protocol, transport = self.connect()
        d = self.factory.shutdown(timeout=30)
        self.assertEqual(self.replies(transport), [220, 421])
        protocol.connectionLost(None)
        self.successResultOf(d)

    def test_shutdown_waits_for_delivery(self) -> None:
        """A message in delivery at shutdown is finished and answered 250, then 421."""
        slow: defer.Deferred[None] = defer.Deferred()
        self.provider.outcomes.append(slow)
        protocol, transport = self.connect()
        protocol.dataReceived(ENVELOPE + message() + b".\r\n")
        d = self.factory.shutdown(timeout=30)
        self.assertNoResult(d)
        self.clock.advance(10)
        slow.callback(None)
        self.assertEqual(self.replies(transport), [220, 250, 250, 250, 354, 250, 421])
        protocol.connectionLost(None)
        self.successResultOf(d)

    def test_shutdown_does_not_wait_for_an_unfinished_envelope(self) -> None:
        """A session that gave MAIL and RCPT but no DATA is told 421 at once: nothing is lost."""
        protocol, transport = self.connect()
        protocol.dataReceived(ENVELOPE.replace(b"DATA\r\n", b""))
        d = self.factory.shutdown(timeout=30)
        self.assertEqual(self.replies(transport), [220, 250, 250, 250, 421])
        protocol.connectionLost(None)
        self.successResultOf(d)

    def test_shutdown_gives_up_after_timeout(self) -> None:
        """A delivery still running after the shutdown timeout has its session aborted."""
        self.provider.outcomes.append(defer.Deferred())
        protocol, transport = self.connect()
        protocol.dataReceived(ENVELOPE + message() + b".\r\n")
        self.factory.shutdown(timeout=30)
        self.clock.advance(31)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.replies(transport)[-1], 421)

    def test_portal_without_anonymous_access(self) -> None:
        """A portal that refuses anonymous logins makes MAIL answer 530, not crash."""
        portal = Portal(RelayRealm(self.provider, self.clock))
        settings = session_defaults()
        guard = open_guard(settings, self.clock)
        self.factory = RelayFactory(settings, portal, None, self.clock, guard)
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        self.assertEqual(self.replies(transport), [220, 250, 530, 250])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_new_connection_during_shutdown(self) -> None:
        """A client connecting while we stop is told 421 instead of a greeting."""
        self.factory.stopping = True
        _, transport = self.connect()
        self.assertEqual(self.replies(transport), [421])
