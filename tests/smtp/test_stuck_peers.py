"""Closing sessions whose peer stopped reading, and the delivery contracts on the hot path.

A review of the performance work found these: a close that trusted an
empty Twisted buffer could wait for ever on a peer whose kernel queue was
full, a delivery that refuses the first MAIL by raising lost the session,
and a provider answering without a Deferred got a delivered message a 451.
"""

from __future__ import annotations

import dataclasses
import fcntl
import select
import socket
import struct
import termios
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.smtp import Address, SMTPBadSender
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from smtpproxy.delivery import RelayDelivery, RelayRealm
from smtpproxy.mime.message import Email
from smtpproxy.policy.guard import Guard
from smtpproxy.smtp.closing import CLOSE_GRACE
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.twisted_private import buffered_bytes
from tests.support import (
    OPEN,
    TIMEOUT,
    RecordingProvider,
    async_test,
    read_replies,
    session_defaults,
)

# Small kernel buffers: the relay's replies fill them after a few thousand NOOPs.
SMALL_BUFFER = 16 * 1024
NOOPS_PER_ROUND = 20
MAX_ROUNDS = 1000  # about 160 suffice with these buffers


def _turn() -> defer.Deferred[None]:
    from twisted.internet import reactor

    return deferLater(reactor, 0.005, lambda: None)


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in C{sock}'s receive queue (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    count: int = struct.unpack("i", raw)[0]
    return count


def _writable(sock: socket.socket) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _held(transport: Any) -> int:
    return buffered_bytes(transport)


class StuckPeerTests(TestCase):
    """A closing session whose peer reads nothing must still end within its grace time.

    Real sockets on loopback; the relay's timers run on a L{Clock} so that
    "after the grace period" needs no waiting.
    """

    async def stuck_session(
        self, provider: RecordingProvider | None = None
    ) -> tuple[RelayProtocol, Clock, socket.socket]:
        """A session whose socket is not writable although Twisted holds nothing.

        The client pipelines NOOPs and never reads.  The replies go straight
        into the kernel (the direct send), until the server socket's send
        queue is past the point where Linux reports it writable (free space
        below half of what is queued) while every reply so far was taken
        whole.  That is the state of any client that stops reading.
        """
        from twisted.internet import reactor

        clock = Clock()
        settings = session_defaults()
        portal = Portal(RelayRealm(provider or RecordingProvider(), clock))
        portal.registerChecker(AllowAnonymousAccess())
        factory = RelayFactory(settings, portal, None, clock, Guard(OPEN, clock))
        port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        client.settimeout(TIMEOUT)
        client.connect(("127.0.0.1", port.getHost().port))
        for _ in range(200):
            if factory.sessions:
                break
            await _turn()
        [session] = factory.sessions
        transport: Any = session.transport
        server_sock: socket.socket = transport.getHandle()
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)

        def cleanup() -> None:
            if transport.connected:
                transport.abortConnection()

        self.addCleanup(cleanup)
        self.assertEqual(read_replies(client, 1)[0][:3], "220")

        for _ in range(MAX_ROUNDS):
            client.sendall(b"NOOP\r\n" * NOOPS_PER_ROUND)
            for _ in range(100):
                await _turn()
                if _unread(server_sock) == 0 and not session._input:
                    break
            if _held(transport):
                self.skipTest("a reply was only partly taken by the kernel; state not reached")
            if not _writable(server_sock):
                return session, clock, client
        self.skipTest("the server socket never stopped being writable")

    async def wait_closed(self, session: RelayProtocol) -> bool:
        """Let the real reactor run a few rounds; is the session gone?"""
        for _ in range(40):
            if session.factory is not None and session not in session.factory.sessions:
                return True
            await _turn()
        return False

    @async_test
    async def test_quit_to_a_peer_that_does_not_read_ends_within_grace(self) -> None:
        """QUIT's close is cut off after CLOSE_GRACE even when Twisted holds nothing.

        With replies sent straight to the socket, Twisted's buffer can be
        empty while the kernel's send queue is full of replies the peer
        never read.  C{loseConnection} waits for the socket to become
        writable, which then never happens, so only the grace timer ends
        the session (without it, it would linger for the 300 s command
        timeout).
        """
        session, clock, client = await self.stuck_session()
        client.sendall(b"QUIT\r\n")
        for _ in range(200):
            if session._closing:
                break
            await _turn()
        self.assertTrue(session._closing)
        clock.advance(CLOSE_GRACE + 1)
        self.assertTrue(await self.wait_closed(session), "session still open after its grace")

    @async_test
    async def test_idle_timeout_to_a_peer_that_does_not_read_ends(self) -> None:
        """The idle timeout's close is bounded too, not left to the peer for ever.

        The idle timer has fired by then, so the close's own grace timer is
        the only one left; without it a client that stops reading would hold
        its connection slot until it chose to read or reset.
        """
        session, clock, _ = await self.stuck_session()
        clock.advance(session.settings.command_timeout + 1)
        self.assertTrue(session._closing)
        clock.advance(CLOSE_GRACE + 1)
        self.assertTrue(await self.wait_closed(session), "session still open; no timer left")

    @async_test
    async def test_shutdown_with_a_peer_that_does_not_read_finishes(self) -> None:
        """The forced close at the end of a shutdown still ends every session.

        A session waiting on its delivery has no idle timer (a slow backend
        is not an idle client).  When the shutdown timeout forces it closed,
        only the close's grace timer can end it if the peer does not read;
        without it the service's stop would wait on it for ever.
        """
        provider = RecordingProvider()
        backend: defer.Deferred[None] = defer.Deferred()
        provider.outcomes.append(backend)
        session, clock, client = await self.stuck_session(provider)
        client.sendall(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\n"
        )
        for _ in range(200):
            if provider.emails:
                break
            await _turn()
        self.assertTrue(session._busy)
        if _held(session.transport):
            self.skipTest("a reply was only partly taken by the kernel; state not reached")
        assert session.factory is not None
        stopped = session.factory.shutdown(5.0)
        clock.advance(5.0)
        self.assertTrue(session._closing)
        clock.advance(CLOSE_GRACE + 1)
        self.assertTrue(await self.wait_closed(session), "session still open after shutdown")
        self.assertTrue(stopped.called)
        backend.callback(None)


class _RefusingDelivery(RelayDelivery):
    """Refuses every sender the way IMessageDelivery documents: by raising."""

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        raise SMTPBadSender(origin)


@implementer(IRealm)
class _RefusingRealm:
    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        delivery = _RefusingDelivery(RecordingProvider(), Clock(), None)
        return IMessageDelivery, delivery, lambda: None


@dataclasses.dataclass
class _SynchronousProvider:
    """A backend whose send returns nothing: it delivered before returning."""

    name: str = "synchronous"
    emails: list[Email] = dataclasses.field(default_factory=list)

    def send(self, email: Email) -> Any:
        self.emails.append(email)
        return None

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


def _final_codes(data: bytes) -> list[int]:
    lines = data.split(b"\r\n")
    return [int(line[:3]) for line in lines if len(line) > 3 and line[3:4] == b" "]


def _session(realm: Any) -> tuple[RelayProtocol, StringTransport]:
    """A session on a Clock over a StringTransport, greeting cleared away."""
    clock = Clock()
    portal = Portal(realm)
    portal.registerChecker(AllowAnonymousAccess())
    factory = RelayFactory(session_defaults(), portal, None, clock, Guard(OPEN, clock))
    session = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
    session.makeConnection(transport)
    transport.clear()
    return session, transport


class DeliveryContractTests(SynchronousTestCase):
    def test_first_mail_refused_by_raising_gets_its_reply(self) -> None:
        """A delivery that refuses the first MAIL by raising SMTPBadSender gets 550, not a drop.

        IMessageDelivery.validateFrom documents raising SMTPBadSender as the
        way to refuse.  Before the anonymous-login shortcut, the first MAIL
        ran validateFrom inside a callback, so the raise became a 550 and the
        session went on; later MAILs still go through C{_validate}, which
        catches it.  In the shortcut's synchronous branch the exception now
        escapes C{dataReceived}, and Twisted drops the connection without a
        reply.
        """
        session, transport = _session(_RefusingRealm())
        session.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        self.assertEqual(_final_codes(transport.value()), [250, 550, 250])

    def test_provider_returning_no_deferred_is_delivered(self) -> None:
        """A provider that sends synchronously and returns None is answered 250, as before.

        C{eomReceived} used C{maybeDeferred(provider.send)}; calling it
        directly then C{.addCallbacks} on None raises AttributeError after
        the backend already took the message, so the client is told to
        retry (451) and sends it again: a duplicate.  Only a provider that
        breaks the C{Deferred} return contract is affected.
        """
        provider = _SynchronousProvider()
        session, transport = _session(RelayRealm(provider, Clock()))
        session.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\n"
        )
        self.assertEqual(len(provider.emails), 1)
        self.assertEqual(_final_codes(transport.value()), [250, 250, 250, 354, 250])
