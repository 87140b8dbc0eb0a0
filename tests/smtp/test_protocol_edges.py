"""Edge cases of the SMTP front end found by adversarial review.

The first classes reproduce defects an adversarial review found (all fixed:
sessions that could not be closed, unbounded reply buffers, quadratic RCPT
handling, AUTH and oversize interplay with shutdown, trickling DATA); the
others pin down edge cases that were attacked and held, so they stay held.

Timing-sensitive cases (idle timer, shutdown, AUTH delay, trickling clients)
run on a L{Clock} over a L{StringTransport}; cases that depend on real TCP and
TLS behaviour (a peer that never reads, a stalled TLS handshake, RSTs, the
PROXY header) run over loopback sockets.  Waits on the real reactor are
bounded polls, never assertions about how long something took.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import socket
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy import addresses
from smtpproxy.delivery import RelayRealm
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.policy.guard import Guard
from smtpproxy.smtp import session as session_module
from smtpproxy.smtp.base import PAUSE_INPUT_AT
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.smtp.sasl import StaticPasswordChecker
from smtpproxy.twisted_private import buffered_bytes
from tests.support import (
    ENVELOPE,
    OPEN,
    PASSWORD,
    TIMEOUT,
    USER,
    RecordingProvider,
    async_test,
    client_tls,
    codes,
    in_thread,
    listen_behind_proxy,
    message,
    read_replies,
    session_defaults,
    start_relay,
)

SHORT_ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
GOOD_PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
BAD_PLAIN = base64.b64encode(f"\0{USER}\0wrong".encode())


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# -- helpers: an in-memory session on a Clock --------------------------------


class Harness:
    """One factory on a Clock; sessions over StringTransports from 192.0.2.7."""

    def __init__(
        self, *, auth: bool = False, provider: RecordingProvider | None = None, **settings: Any
    ) -> None:
        self.clock = Clock()
        self.provider = provider or RecordingProvider()
        portal = Portal(RelayRealm(self.provider, self.clock))
        portal.registerChecker(AllowAnonymousAccess())
        if auth:
            portal.registerChecker(StaticPasswordChecker(USER, PASSWORD))
            settings.setdefault("allow_insecure_auth", True)
        session = session_defaults(auth_enabled=auth, **settings)
        guard = Guard(dataclasses.replace(OPEN, auth_enabled=auth), self.clock)
        self.factory = RelayFactory(session, portal, None, self.clock, guard)

    def connect(self) -> tuple[RelayProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        protocol.makeConnection(transport)
        return protocol, transport


def reply_codes(transport: StringTransport) -> list[int]:
    """Final reply codes written so far (continuation lines skipped)."""
    lines = transport.value().split(b"\r\n")
    return [int(line[:3]) for line in lines if len(line) > 3 and line[3:4] == b" "]


def reply_lines(transport: StringTransport) -> list[str]:
    lines = transport.value().decode("utf-8", "replace").split("\r\n")
    return [line for line in lines if len(line) > 3 and line[3] == " "]


def body_of_size(size: int) -> bytes:
    """A message of exactly C{size} bytes (as delivered), ending in CRLF."""
    head = b"Subject: sized\r\n\r\n"
    return head + b"a" * (size - len(head) - 2) + b"\r\n"


def stuff(raw: bytes) -> bytes:
    """Dot-stuff a message the way a client must on the wire."""
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


# -- helpers: real sockets -----------------------------------------------------


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(condition: Callable[[], bool], rounds: int = 40, step: float = 0.1) -> bool:
    """Poll C{condition} on the reactor at most C{rounds} times; True once it holds."""
    for _ in range(rounds):
        if condition():
            return True
        await sleep(step)
    return condition()


def only_session(factory: RelayFactory) -> RelayProtocol:
    [session] = factory.sessions
    return session


def pending_output(session: RelayProtocol) -> int:
    """Bytes of replies Twisted holds in user space for this session's socket."""
    return buffered_bytes(session._tcp)


def connect_quietly(port: int) -> socket.socket:
    """A client socket with a tiny receive window that will never read its replies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def send_ignoring_backpressure(sock: socket.socket, data: bytes) -> None:
    """Send C{data}; a server that stops reading (rightly) makes this time out."""
    sock.settimeout(3.0)
    with contextlib.suppress(TimeoutError):
        sock.sendall(data)


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# =============================================================================
# Defects found in review, now fixed: each class says what used to go wrong.
# =============================================================================


class StalledConnectionTests(TestCase):
    """Closing a connection completes even when the peer will not cooperate.

    C{loseConnection} waits until every buffered byte is written (and, under
    TLS, until the handshake is done); a stalled peer used to keep its
    session, its connection slot and the shutdown waiting for ever.  Closing
    now cuts the connection off after a grace period.
    """

    @async_test
    async def test_silent_client_after_starttls_is_disconnected(self) -> None:
        """A client that sends STARTTLS and then nothing is closed by the idle timer.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        relay = start_relay(self, command_timeout=0.5)
        sockets: list[socket.socket] = []

        def stall(port: int) -> list[str]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sockets.append(sock)
            replies = read_replies(sock, 1)
            sock.sendall(b"EHLO c\r\nSTARTTLS\r\n")
            return replies + read_replies(sock, 2)

        self.addCleanup(close_all, sockets)
        replies = await in_thread(stall, relay.port)
        self.assertEqual(codes(replies), [220, 250, 220])
        closed = await wait_until(lambda: not relay.factory.sessions, rounds=50)
        self.assertTrue(closed, "session still open 5 s after a 0.5 s idle timeout")
        self.assertEqual(relay.factory.guard.connections.total, 0)

    @async_test
    async def test_shutdown_completes_with_a_client_silent_after_starttls(self) -> None:
        """Graceful shutdown finishes (bounded by its timeout) even with a stalled TLS peer.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        relay = start_relay(self)
        sockets: list[socket.socket] = []

        def stall(port: int) -> None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sockets.append(sock)
            read_replies(sock, 1)
            sock.sendall(b"EHLO c\r\nSTARTTLS\r\n")
            read_replies(sock, 2)

        self.addCleanup(close_all, sockets)
        await in_thread(stall, relay.port)
        stopped = relay.factory.shutdown(timeout=0.3)
        finished = await wait_until(lambda: stopped.called, rounds=30)
        self.assertTrue(finished, "shutdown(timeout=0.3) still waiting after 3 s")

    @async_test
    async def test_idle_timeout_disconnects_a_client_that_never_reads(self) -> None:
        """A client that pipelines commands and never reads the replies is still timed out.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        relay = start_relay(self, command_timeout=0.5)
        sockets: list[socket.socket] = []

        def connect(port: int) -> None:
            sockets.append(connect_quietly(port))

        self.addCleanup(close_all, sockets)
        await in_thread(connect, relay.port)
        await wait_until(lambda: len(relay.factory.sessions) == 1)
        # Keep the kernel from hiding the backlog, whatever this host's tcp_wmem.
        only_session(relay.factory)._tcp.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
        )
        await in_thread(send_ignoring_backpressure, sockets[0], b"EHLO c\r\n" * 32768)
        closed = await wait_until(lambda: not relay.factory.sessions, rounds=50)
        self.assertTrue(closed, "session still open 5 s after a 0.5 s idle timeout")
        self.assertEqual(relay.factory.guard.connections.total, 0)


class UnboundedOutputTests(TestCase):
    """Replies to a client that does not read them used to pile up without limit."""

    @async_test
    async def test_replies_to_a_client_that_never_reads_stay_bounded(self) -> None:
        """256 KB of pipelined EHLO, never read: the server must not buffer megabytes.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        relay = start_relay(self)
        sockets: list[socket.socket] = []

        def connect(port: int) -> None:
            sockets.append(connect_quietly(port))

        self.addCleanup(close_all, sockets)
        await in_thread(connect, relay.port)
        await wait_until(lambda: len(relay.factory.sessions) == 1)
        session = only_session(relay.factory)
        session._tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        await in_thread(send_ignoring_backpressure, sockets[0], b"EHLO c\r\n" * 32768)
        peak = 0
        for _ in range(20):
            peak = max(peak, pending_output(session))
            if peak > 1_000_000:
                break
            await sleep(0.05)
        self.assertLessEqual(peak, 1_000_000, f"{peak} bytes of replies buffered")


class ShutdownInAuthTests(SynchronousTestCase):
    """A session half-way through an AUTH exchange used to hold the shutdown up."""

    def test_shutdown_closes_a_session_waiting_in_auth(self) -> None:
        """At shutdown, a client sitting at the AUTH LOGIN prompt hears 421 at once.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        harness = Harness(auth=True)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"EHLO c\r\nAUTH LOGIN\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 334])
        stopped = harness.factory.shutdown(timeout=30)
        self.assertEqual(reply_codes(transport), [220, 250, 334, 421])
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.successResultOf(stopped)


class TricklingDataTests(SynchronousTestCase):
    """A client dripping the message body used to hold its session indefinitely."""

    def test_trickling_body_cannot_hold_a_session_forever(self) -> None:
        """One byte every 10 s inside DATA: the session must end within 6 x SMTP_DATA_TIMEOUT.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        harness = Harness(data_timeout=600)
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        for _ in range(360):  # six simulated hours at most
            if transport.disconnecting:
                break
            protocol.dataReceived(b"x")
            harness.clock.advance(10)
        self.assertTrue(transport.disconnecting, "still in DATA after 3600 s of trickle")
        self.assertEqual(harness.provider.emails, [])


class AuthLineTooLongTests(SynchronousTestCase):
    """An over-long line inside an AUTH exchange used to leave the session in AUTH mode."""

    def test_overlong_sasl_response_ends_the_exchange(self) -> None:
        """After '500 Line too long' to a SASL response, the next line is a command again.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        harness = Harness(auth=True)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"EHLO c\r\nAUTH LOGIN\r\n")
        for _ in range(4):
            protocol.dataReceived(b"A" * 4096)
        protocol.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(reply_codes(transport)[:4], [220, 250, 334, 500])
        self.assertEqual(reply_codes(transport)[4:], [250])


class RecipientScanTests(SynchronousTestCase):
    """Every RCPT used to rescan the whole recipient list."""

    def test_rcpt_cost_does_not_grow_with_the_recipient_list(self) -> None:
        """400 RCPTs after 500 recipients (duplicates, then new ones over the cap) must
        not cost 400 x 500 address normalisations.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        calls = 0
        real = addresses.envelope_key

        def counting(address: str) -> str:
            nonlocal calls
            calls += 1
            return real(address)

        self.patch(session_module, "envelope_key", counting)
        harness = Harness()
        protocol, transport = harness.connect()
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        protocol.dataReceived(
            b"".join(b"RCPT TO:<user%03d@example.org>\r\n" % i for i in range(500))
        )
        calls = 0
        protocol.dataReceived(b"RCPT TO:<user499@example.org>\r\n" * 200)
        protocol.dataReceived(
            b"".join(b"RCPT TO:<new%03d@example.org>\r\n" % i for i in range(200))
        )
        self.assertEqual(reply_codes(transport)[-400:], [250] * 200 + [452] * 200)
        # The count is real: the patched function is the one RCPT uses.
        self.assertGreaterEqual(calls, 400)
        self.assertLessEqual(calls, 400 * 2, f"{calls} address normalisations for 400 RCPTs")


class ShutdownAfterOversizeTests(SynchronousTestCase):
    """A message rejected for size during shutdown used to leave its session open."""

    def test_shutdown_during_oversize_data_closes_after_552(self) -> None:
        """Shutdown arrives mid-DATA, the message turns out too big: 552, then 421 and close.

        Regression test for a defect found in review; see the commit that fixed it.
        """
        harness = Harness(max_message_size=100)
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE + b"x" * 200)
        stopped = harness.factory.shutdown(timeout=30)
        self.assertNoResult(stopped)
        protocol.dataReceived(b"\r\n.\r\n")
        self.assertEqual(reply_codes(transport)[-2:], [552, 421])
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.successResultOf(stopped)


# =============================================================================
# Edge cases attacked and held: regression tests.
# =============================================================================


class DataBoundaryTests(SynchronousTestCase):
    """Size limit, empty bodies and the end marker at every chunk boundary."""

    def deliver(self, harness: Harness, wire: bytes) -> list[int]:
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE + wire + b"NOOP\r\n")
        return reply_codes(transport)

    def test_message_exactly_at_the_limit_is_accepted(self) -> None:
        """A body of exactly SMTP_MAX_MESSAGE_SIZE bytes (CRLF before '.' included) is 250."""
        harness = Harness(max_message_size=100)
        raw = body_of_size(100)
        self.assertEqual(self.deliver(harness, raw + b".\r\n"), [220, 250, 250, 250, 354, 250, 250])
        self.assertEqual([e.raw for e in harness.provider.emails], [raw])

    def test_one_byte_over_the_limit_is_552_and_session_goes_on(self) -> None:
        """Limit + 1 is 552 5.3.4 after the dot, nothing is delivered, NOOP still works."""
        harness = Harness(max_message_size=100)
        self.assertEqual(
            self.deliver(harness, body_of_size(101) + b".\r\n"),
            [220, 250, 250, 250, 354, 552, 250],
        )
        self.assertEqual(harness.provider.emails, [])

    def test_limit_counts_unstuffed_bytes(self) -> None:
        """Dot-stuffing on the wire does not count against SIZE: 100 bytes with stuffed
        lines is still exactly at the limit."""
        harness = Harness(max_message_size=100)
        raw = b"Subject: s\r\n\r\n" + b".x\r\n" * 15 + b"." * 4 + b"\r\n"
        raw += b"a" * (100 - len(raw) - 2) + b"\r\n"
        self.assertEqual(len(raw), 100)
        self.assertEqual(
            self.deliver(harness, stuff(raw) + b".\r\n"), [220, 250, 250, 250, 354, 250, 250]
        )
        self.assertEqual([e.raw for e in harness.provider.emails], [raw])

    def test_empty_message(self) -> None:
        """'.' straight after 354 is an empty message: accepted once, session continues."""
        harness = Harness()
        self.assertEqual(self.deliver(harness, b".\r\n"), [220, 250, 250, 250, 354, 250, 250])
        self.assertEqual([e.raw for e in harness.provider.emails], [b""])

    def test_dot_not_preceded_by_crlf_is_content(self) -> None:
        """'text.' CRLF does not end DATA; only a line holding a single dot does."""
        harness = Harness()
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE + b"Subject: s\r\n\r\nend.\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        protocol.dataReceived(b".\r\n")
        self.assertEqual(reply_codes(transport)[-1], 250)
        self.assertEqual([e.raw for e in harness.provider.emails], [b"Subject: s\r\n\r\nend.\r\n"])

    def test_end_marker_and_stuffing_split_at_every_pair_of_offsets(self) -> None:
        """Any two cuts through the body, the stuffed dots and the final CRLF.CRLF
        give the same single delivery and the same replies."""
        raw = b"Subject: s\r\n\r\n.a\r\n..\r\nc.\r\n.\r\n"
        body = stuff(raw) + b".\r\nNOOP\r\n"
        expected = [220, 250, 250, 250, 354, 250, 250]
        harness = Harness()
        for i in range(len(body) + 1):
            for j in range(i, len(body) + 1):
                harness.provider.emails.clear()
                protocol, transport = harness.connect()
                protocol.dataReceived(SHORT_ENVELOPE + body[:i])
                protocol.dataReceived(body[i:j])
                protocol.dataReceived(body[j:])
                self.assertEqual(reply_codes(transport), expected, (i, j))
                self.assertEqual([e.raw for e in harness.provider.emails], [raw], (i, j))
                protocol.connectionLost(None)


class BoundedInputTests(SynchronousTestCase):
    """What the session keeps while a client floods it without line ends.

    (tests/security/test_twisted_defects.py SEC-022 reads C{session._buffer},
    which is LineReceiver's unused buffer and always empty; these look at the
    buffers the session really uses.)
    """

    def test_endless_command_line_is_bounded_and_answered(self) -> None:
        """2 MB without LF in command mode: at most one chunk plus 12 KB is kept, then 500."""
        protocol, transport = Harness().connect()
        worst = 0
        for _ in range(32):
            protocol.dataReceived(b"z" * 65536)
            worst = max(worst, len(protocol._input))
        self.assertLessEqual(worst, 65536 + 12_288)
        protocol.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(reply_codes(transport), [220, 500, 250])

    def test_endless_data_line_is_bounded(self) -> None:
        """2 MB without CRLF in DATA over a 100 KB limit: nothing stored, input empty."""
        harness = Harness(max_message_size=100_000)
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE)
        for _ in range(32):
            protocol.dataReceived(b"z" * 65536)
            self.assertEqual(len(protocol._input), 0)
        assert protocol.session.tx.body is not None
        self.assertEqual(protocol.session.tx.body.stored, 0)
        protocol.dataReceived(b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(reply_codes(transport)[-2:], [552, 250])


class PipeliningUnderLoadTests(SynchronousTestCase):
    """Replies stay in order and input is throttled while a command waits."""

    def test_input_paused_while_delivering_and_resumed_after(self) -> None:
        """With a slow provider and >64 KB pipelined behind the dot, reading pauses; when
        the provider answers, reading resumes and every command is answered in order."""
        harness = Harness()
        slow: defer.Deferred[None] = defer.Deferred()
        harness.provider.outcomes.append(slow)
        protocol, transport = harness.connect()
        noops = PAUSE_INPUT_AT // 6 + 100
        protocol.dataReceived(SHORT_ENVELOPE + message() + b".\r\n" + b"NOOP\r\n" * noops)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        slow.callback(None)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354, 250] + [250] * noops)

    def test_auth_delay_holds_pipelined_commands(self) -> None:
        """A second wrong password is answered after the delay, and a NOOP pipelined
        behind it is answered after the 535, not before; the idle timer does not fire
        during the delay."""
        harness = Harness(auth=True, command_timeout=0.5)
        protocol, transport = harness.connect()
        bad = b"AUTH PLAIN " + BAD_PLAIN + b"\r\n"
        protocol.dataReceived(b"EHLO c\r\n" + bad + bad + b"NOOP\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 535])
        harness.clock.advance(0.9)
        self.assertEqual(reply_codes(transport), [220, 250, 535])
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(0.2)
        self.assertEqual(reply_codes(transport), [220, 250, 535, 535, 250])

    def test_auth_after_failed_auth_and_cancel(self) -> None:
        """A cancelled exchange (501), then a wrong password (535), then the right one
        (235 after the delay) and mail goes through."""
        harness = Harness(auth=True)
        protocol, transport = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN " + BAD_PLAIN + b"\r\n"
            b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n" + SHORT_ENVELOPE[len(b"EHLO c\r\n") :]
        )
        harness.clock.advance(5)
        protocol.dataReceived(message() + b".\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 334, 501, 535, 235, 250, 250, 354, 250])
        self.assertEqual(len(harness.provider.emails), 1)

    def test_auth_odd_responses(self) -> None:
        """PLAIN with '=' is 501; LOGIN with an empty ('=') password is a plain failure
        (535); a too-long SASL line that does end in CRLF is 501; the session survives."""
        harness = Harness(auth=True)
        protocol, transport = harness.connect()
        protocol.dataReceived(b"EHLO c\r\nAUTH PLAIN =\r\n")
        protocol.dataReceived(b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n=\r\n")
        protocol.dataReceived(b"AUTH PLAIN\r\n" + b"QUFB" * 2500 + b"\r\nNOOP\r\n")
        harness.clock.advance(5)
        self.assertEqual(reply_codes(transport), [220, 250, 501, 334, 334, 535, 334, 501, 250])

    def test_third_auth_failure_closes_and_releases_the_slot(self) -> None:
        """The third wrong password gets 421 and the connection's guard slot is freed."""
        harness = Harness(auth=True)
        protocol, transport = harness.connect()
        self.assertEqual(harness.factory.guard.connections.total, 1)
        protocol.dataReceived(b"EHLO c\r\n" + (b"AUTH PLAIN " + BAD_PLAIN + b"\r\n") * 3)
        harness.clock.pump([1.0] * 10)
        self.assertEqual(reply_codes(transport), [220, 250, 535, 535, 421])
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(harness.factory.guard.connections.total, 0)


class ProviderMisbehaviourTests(SynchronousTestCase):
    """Providers that fail at once or raise get the right reply, and the session goes on."""

    def test_deferred_already_failed(self) -> None:
        """A provider returning an already-failed Deferred: 451 with its status, then NOOP."""
        harness = Harness()
        harness.provider.outcomes.append(TransientDeliveryError("busy", "4.4.1"))
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE + message() + b".\r\nNOOP\r\n")
        self.assertEqual(reply_lines(transport)[-2:], ["451 4.4.1 busy", "250 2.0.0 OK"])

    def test_send_raises_synchronously(self) -> None:
        """A provider whose send() raises: logged, 451 4.3.0 without details, session goes on."""

        class Raising(RecordingProvider):
            def send(self, email: Email) -> defer.Deferred[None]:
                raise RuntimeError("provider internals")

        protocol, transport = Harness(provider=Raising()).connect()
        protocol.dataReceived(SHORT_ENVELOPE + message() + b".\r\nNOOP\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        last = reply_lines(transport)[-2:]
        self.assertTrue(last[0].startswith("451 4.3.0"), last)
        self.assertNotIn("internals", transport.value().decode())
        self.assertEqual(last[1], "250 2.0.0 OK")


class TransactionStateTests(SynchronousTestCase):
    """Exactly one delivery per transaction; RSET/HELO/EHLO reset mid-transaction."""

    def test_pipelined_dot_rset_data_delivers_once(self) -> None:
        """'. RSET DATA .' and '. DATA' behind a slow provider: one delivery, ordered replies."""
        harness = Harness()
        slow: defer.Deferred[None] = defer.Deferred()
        harness.provider.outcomes.append(slow)
        protocol, transport = harness.connect()
        protocol.dataReceived(
            SHORT_ENVELOPE + message() + b".\r\nRSET\r\nDATA\r\n.\r\nDATA\r\nQUIT\r\n"
        )
        self.assertEqual(len(harness.provider.emails), 1)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        slow.callback(None)
        self.assertEqual(
            reply_codes(transport), [220, 250, 250, 250, 354, 250, 250, 503, 500, 503, 221]
        )
        self.assertEqual(len(harness.provider.emails), 1)

    def test_reset_commands_mid_transaction(self) -> None:
        """After MAIL+RCPT, each of RSET, HELO and EHLO forgets the transaction (RCPT: 503),
        and a full transaction afterwards delivers only its own recipient."""
        for reset_command in (b"RSET\r\n", b"HELO c\r\n", b"EHLO c\r\n"):
            harness = Harness()
            protocol, transport = harness.connect()
            protocol.dataReceived(
                b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<old@example.org>\r\n"
                + reset_command
                + b"RCPT TO:<x@example.org>\r\nMAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<new@example.org>\r\nDATA\r\n" + message() + b".\r\n"
            )
            self.assertEqual(
                reply_codes(transport), [220, 250, 250, 250, 250, 503, 250, 250, 354, 250]
            )
            [email] = harness.provider.emails
            self.assertEqual(email.envelope_to, ("new@example.org",))

    def test_oversize_then_next_transaction_gets_only_its_recipients(self) -> None:
        """A 552'd message leaves nothing behind: the next transaction is delivered
        once, with only its own recipients and body."""
        harness = Harness(max_message_size=100)
        protocol, transport = harness.connect()
        protocol.dataReceived(SHORT_ENVELOPE + body_of_size(500) + b".\r\n")
        protocol.dataReceived(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
            + body_of_size(60)
            + b".\r\n"
        )
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354, 552, 250, 250, 354, 250])
        [email] = harness.provider.emails
        self.assertEqual(email.envelope_to, ("c@example.org",))
        self.assertEqual(email.raw, body_of_size(60))


class SlotAccountingTests(TestCase):
    """Every admitted connection gives its guard slot back, however it ends."""

    @async_test
    async def test_slots_released_after_every_kind_of_disconnect(self) -> None:
        """RST in DATA, FIN during a slow delivery, QUIT, a refused over-cap connection,
        TLS garbage after STARTTLS: the connection counters return to zero."""
        relay = start_relay(self, guard=dataclasses.replace(OPEN, max_connections_per_ip=2))
        slow: defer.Deferred[None] = defer.Deferred()
        relay.provider.outcomes.append(slow)

        def first_phase(port: int) -> list[str]:
            seen: list[str] = []
            a = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            b = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            seen += read_replies(a, 1) + read_replies(b, 1)
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
                seen += read_replies(c, 1)  # over the per-IP cap: 421
            a.sendall(ENVELOPE + b"half a body")
            seen += read_replies(a, 4)
            reset(a)
            b.sendall(ENVELOPE + message() + b".\r\n")
            seen += read_replies(b, 4)
            b.close()  # FIN while the provider is still working
            return seen

        def second_phase(port: int) -> list[str]:
            seen: list[str] = []
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as d:
                seen += read_replies(d, 1)
                d.sendall(b"EHLO c\r\nSTARTTLS\r\n")
                seen += read_replies(d, 2)
                d.sendall(b"this is not a ClientHello\r\n" * 8)
                with contextlib.suppress(ConnectionResetError):
                    d.recv(100)
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as e:
                seen += read_replies(e, 1)
                e.sendall(b"QUIT\r\n")
                seen += read_replies(e, 1)
            return seen

        guard = relay.factory.guard
        seen = await in_thread(first_phase, relay.port)
        self.assertEqual(codes(seen), [220, 220, 421, 250, 250, 250, 354, 250, 250, 250, 354])
        self.assertTrue(await wait_until(lambda: guard.connections.total == 0))
        seen = await in_thread(second_phase, relay.port)
        self.assertEqual(codes(seen), [220, 250, 220, 220, 221])
        released = await wait_until(lambda: guard.connections.total == 0)
        self.assertTrue(released, f"{guard.connections.total} slots still counted")
        self.assertEqual(len(guard.connections), 0)
        slow.callback(None)  # the delivery finishes after its client left
        self.assertEqual(len(relay.provider.emails), 1)
        # A closing session gives its slot back at once (issue 10); it has
        # ended too once its connection is gone.
        self.assertTrue(await wait_until(lambda: not relay.factory.sessions))

    @async_test
    async def test_proxy_header_wait_and_proxied_session(self) -> None:
        """A PROXY peer that hangs up mid-header never takes a slot; a proxied session
        over STARTTLS delivers mail and gives its slot back when reset."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)

        def proxied(number: int) -> list[str]:
            with socket.create_connection(("127.0.0.1", number), timeout=TIMEOUT) as half:
                half.sendall(b"PROXY TCP4 10.0.0.")
            raw = socket.create_connection(("127.0.0.1", number), timeout=TIMEOUT)
            raw.sendall(b"PROXY TCP4 10.0.0.9 127.0.0.1 40000 2525\r\nEHLO c\r\nSTARTTLS\r\n")
            replies = read_replies(raw, 3)
            sock = client_tls().wrap_socket(raw)
            sock.sendall(ENVELOPE + message() + b".\r\n")
            replies += read_replies(sock, 5)
            reset(sock)
            return replies

        replies = await in_thread(proxied, port)
        self.assertEqual(codes(replies), [220, 250, 220, 250, 250, 250, 354, 250])
        self.assertEqual(len(relay.provider.emails), 1)
        released = await wait_until(lambda: relay.factory.guard.connections.total == 0)
        self.assertTrue(released)
        self.assertEqual(relay.factory.sessions, set())


class StartTLSStateTests(TestCase):
    """STARTTLS in the middle of a transaction forgets it."""

    @async_test
    async def test_starttls_mid_transaction_resets_it(self) -> None:
        """MAIL before STARTTLS does not survive it: inside TLS, RCPT is 503 even after EHLO."""
        relay = start_relay(self)

        def run(port: int) -> list[str]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            replies = read_replies(raw, 1)
            raw.sendall(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nSTARTTLS\r\n")
            replies += read_replies(raw, 3)
            with client_tls().wrap_socket(raw) as sock:
                sock.sendall(b"EHLO c\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n")
                replies += read_replies(sock, 3)
            return replies

        replies = await in_thread(run, relay.port)
        self.assertEqual(codes(replies), [220, 250, 250, 220, 250, 503, 221])
