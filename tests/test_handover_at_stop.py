"""A forced stop in direct mode, on a Clock: cancel what was not handed over, wait for what was.

Review 5: once a provider has handed a message to its backend (the upstream
has the final dot, Graph the send request), cancelling its send cannot take
the message back, only cut off the answer; the client that then hears 421
(or HTTP 503) retries a message that is delivered.  These tests drive the
decision without sockets: L{smtpproxy.providers.result.watched} and
L{current_handover}, the SMTP session's L{force_close} over a
StringTransport, and the HTTP API's L{Flights}.  The same behaviour with the
real twistd and a real upstream is in C{tests/test_review5_shutdown_direct.py}.
"""

from __future__ import annotations

from typing import cast

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import Handover, SendCancelledError, current_handover, watched
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.web.api.drain import GIVE_UP_MARGIN, Flights
from tests.smtp.test_protocol_edges import Harness, reply_codes
from tests.support import RecordingProvider, message

#: The default SMTP_SHUTDOWN_HANDOVER_GRACE, read from its one declaration, and
#: how long the API's give-up then waits for the answers.
COMMIT_GRACE = Config().smtp_shutdown_handover_grace
GIVE_UP_GRACE = COMMIT_GRACE + GIVE_UP_MARGIN

#: The log lines these tests look for (docs/operations.md has each).
UNANSWERED = (
    "delivery cancelled at shutdown after the provider had the message: "
    "it may be delivered, and the client got no reply"
)
CLIENT_GONE = "delivery cancelled, the client disconnected before its answer: message not delivered"
GONE_AFTER_HANDOVER = (
    "client disconnected after the provider had the message: "
    "it may be delivered, and the client will send it again"
)


class HandingProvider(RecordingProvider):
    """A provider whose send hands the message over when told, then answers when told.

    C{hand_over} fires the first step (the message reaches the backend, and
    the send marks its caller's L{Handover}); C{answer} the backend's reply.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hand_over: defer.Deferred[None] = defer.Deferred()
        self.answer: defer.Deferred[None] = defer.Deferred()
        self.cancelled = False

    def send(self, email: Email) -> defer.Deferred[None]:
        self.emails.append(email)
        return defer.Deferred.fromCoroutine(self._send())

    async def _send(self) -> None:
        handover = current_handover()
        try:
            await self.hand_over
            handover.mark()
            await self.answer
        except defer.CancelledError:
            # As a real provider says it (smtpproxy.providers.result).
            self.cancelled = True
            raise SendCancelledError(handover.handed_over) from None


def _session_in_delivery(
    harness: Harness, provider: HandingProvider
) -> tuple[RelayProtocol, StringTransport, defer.Deferred[None]]:
    """A client whose message is with C{provider}; the factory's stop begun (30 s)."""
    protocol, transport = harness.connect()
    protocol.dataReceived(
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        + message("handed").replace(b"\n", b"\r\n")
        + b".\r\n"
    )
    harness.clock.advance(0)
    assert provider.emails, "the provider was never asked"
    stopped = harness.factory.shutdown(timeout=30)
    return protocol, transport, stopped


class WatchedTests(SynchronousTestCase):
    def test_the_provider_marks_its_callers_handover_after_awaiting(self) -> None:
        """A coroutine provider finds its caller's Handover however many awaits later
        (Deferred.fromCoroutine runs it in a copy of the caller's context), and a send
        started outside L{watched} marks a loose one nobody reads."""
        provider = HandingProvider()
        sending, handover = watched(
            lambda: provider.send(Email("a@example.com", ("b@example.org",), b"x"))
        )
        self.assertFalse(handover.handed_over)
        provider.hand_over.callback(None)
        self.assertTrue(handover.handed_over)
        provider.answer.callback(None)
        self.successResultOf(sending)
        self.assertIsNot(current_handover(), current_handover())
        self.assertFalse(Handover().handed_over)


class _SessionCase(SynchronousTestCase):
    """A session on a Clock whose provider is a L{HandingProvider}; log events kept."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.provider = HandingProvider()
        self.harness = Harness(provider=self.provider)

    def logged(self, text: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_format") == text]


class SmtpForceCloseTests(_SessionCase):
    def _force(self) -> tuple[RelayProtocol, StringTransport, defer.Deferred[None]]:
        protocol, transport, stopped = _session_in_delivery(self.harness, self.provider)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.harness.clock.advance(30)  # the shutdown timeout: force_close
        return protocol, transport, stopped

    def test_handed_over_send_is_waited_for_and_its_250_told(self) -> None:
        """The provider has the message at the forced stop: no 421, no cancel; its 250,
        due within COMMIT_GRACE, is what the client hears, then 421 and the close."""
        self.provider.hand_over.callback(None)
        protocol, transport, stopped = self._force()
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.harness.clock.advance(COMMIT_GRACE / 2)
        self.provider.answer.callback(None)
        self.assertEqual(reply_codes(transport)[5], 250)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_handed_over_send_that_fails_has_its_error_told(self) -> None:
        """The backend that had the message refuses it within the grace: the client
        hears that refusal (a retry is then right), not a 421 of our own."""
        self.provider.hand_over.callback(None)
        _, transport, _ = self._force()
        self.provider.answer.errback(PermanentDeliveryError("no such user", "5.1.1"))
        self.assertEqual(reply_codes(transport)[5], 554)

    def test_send_not_handed_over_is_cancelled_and_421_told(self) -> None:
        """The provider has not handed the message over yet: the client hears 421 at
        once and the send is cancelled, so nothing is delivered behind its back."""
        _, transport, _ = self._force()
        self.assertEqual(reply_codes(transport)[5], 421)
        self.assertTrue(self.provider.cancelled)

    def test_grace_running_out_closes_without_a_reply(self) -> None:
        """The provider had the message but does not answer within the grace: the
        connection is cut with no reply (neither 250 nor 421 would be known true), the
        send is cancelled and one warning names the message as unanswered."""
        self.provider.hand_over.callback(None)
        _, transport, _ = self._force()
        self.harness.clock.advance(COMMIT_GRACE)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.assertTrue(transport.disconnected)
        self.assertTrue(self.provider.cancelled)
        lines = self.logged(UNANSWERED)
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["outcome"], "unknown")


class HandoverGraceSettingTests(SynchronousTestCase):
    """SMTP_SHUTDOWN_HANDOVER_GRACE (the session's C{handover_grace}) sets the wait."""

    def setUp(self) -> None:
        self.provider = HandingProvider()

    def _forced(
        self, grace: float
    ) -> tuple[Harness, RelayProtocol, StringTransport, defer.Deferred[None]]:
        harness = Harness(provider=self.provider, handover_grace=grace)
        protocol, transport, stopped = _session_in_delivery(harness, self.provider)
        self.provider.hand_over.callback(None)
        harness.clock.advance(30)  # the shutdown timeout: force_close
        return harness, protocol, transport, stopped

    def test_longer_grace_waits_past_the_default(self) -> None:
        """With a 10 s grace the session still waits 8 s after the forced stop (past
        the default 1.5 s and the factory's 2 s), the stop waits for it, and the
        answer that then comes is told: 250."""
        harness, protocol, transport, stopped = self._forced(10.0)
        harness.clock.advance(8)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(stopped)
        self.provider.answer.callback(None)
        self.assertEqual(reply_codes(transport)[5], 250)
        protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_longer_grace_still_ends(self) -> None:
        """Past a 10 s grace without an answer the connection is cut without a reply
        and the stop goes on."""
        harness, protocol, transport, stopped = self._forced(10.0)
        harness.clock.advance(10)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.assertTrue(transport.disconnected)
        self.assertTrue(self.provider.cancelled)
        protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_zero_grace_does_not_wait(self) -> None:
        """A grace of 0: a handed-over send is not waited for at all; the connection is
        cut without a reply on the forced stop's own turn."""
        harness, _, transport, _ = self._forced(0.0)
        harness.clock.advance(0)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])
        self.assertTrue(transport.disconnected)

    def test_default_is_the_old_grace(self) -> None:
        """The default settings wait 1.5 s, as the fixed grace did (and the API 2 s)."""
        self.assertEqual(Harness().factory.settings.handover_grace, 1.5)
        self.assertEqual(GIVE_UP_GRACE, 2.0)

    def test_http_flights_wait_the_grace(self) -> None:
        """The API's give-up waits the same grace for a handed-over send: with 10 s it is
        still waited for 8 s after the give-up, and its answer ends the stop; the
        default grace still waits 2 s, as before the setting."""
        clock = Clock()
        flights = Flights(clock)
        over = flights.start()
        sending: defer.Deferred[None] = defer.Deferred()
        over.sending, over.handover = sending, Handover(handed_over=True)
        drained = flights.drain(5, handover_grace=10.0)
        clock.advance(5)
        clock.advance(8)
        self.assertNoResult(drained)
        self.assertFalse(over.cancelled)
        sending.callback(None)
        flights.end(over)
        self.successResultOf(drained)
        self.assertEqual(clock.getDelayedCalls(), [])
        default = Flights(clock)
        waiting = default.start()
        waiting.sending, waiting.handover = defer.Deferred(), Handover(handed_over=True)
        ended = default.drain(5, COMMIT_GRACE)
        clock.advance(5)
        clock.advance(GIVE_UP_GRACE - 0.1)
        self.assertNoResult(ended)
        clock.advance(0.1)
        self.successResultOf(ended)


class FlightsHandoverTests(SynchronousTestCase):
    def test_handed_over_send_is_not_cancelled_and_its_answer_ends_the_wait(self) -> None:
        """At the API's give-up a send the provider had handed over is left to finish
        (its 200 is the truth); one not yet handed over is cancelled (503 is)."""
        clock = Clock()
        flights = Flights(clock)
        over, early = flights.start(), flights.start()
        over_sending: defer.Deferred[None] = defer.Deferred()
        over.sending, over.handover = over_sending, Handover(handed_over=True)
        early_sending: defer.Deferred[None] = defer.Deferred()
        early.sending, early.handover = early_sending, Handover()
        drained = flights.drain(5, COMMIT_GRACE)
        clock.advance(5)
        self.assertNoResult(over_sending)
        self.assertFalse(over.cancelled)
        self.failureResultOf(early_sending, defer.CancelledError)
        self.assertTrue(early.cancelled)
        flights.end(early)
        clock.advance(GIVE_UP_GRACE / 2)
        self.assertNoResult(drained)
        over_sending.callback(None)
        flights.end(over)
        self.successResultOf(drained)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_handed_over_send_unanswered_past_the_grace_is_named_not_cancelled(self) -> None:
        """A handed-over send still unanswered when the grace ends is not cancelled (its
        client would hear a false 503 while the listener is up); the stop goes on, and
        the flight's C{unanswered} hook (which logs the message) is called once."""
        clock = Clock()
        flights = Flights(clock)
        over = flights.start()
        sending: defer.Deferred[None] = defer.Deferred()
        over.sending, over.handover = sending, Handover(handed_over=True)
        named: list[bool] = []
        over.unanswered = lambda: named.append(True)
        drained = flights.drain(5, COMMIT_GRACE)
        clock.advance(5)
        self.assertEqual(named, [])
        clock.advance(GIVE_UP_GRACE)
        self.successResultOf(drained)
        self.assertEqual(named, [True])
        self.assertNoResult(sending)
        self.assertFalse(over.cancelled)


class ClientGoneTests(_SessionCase):
    """Direct mode, no shutdown: the client disconnects while the provider works."""

    def setUp(self) -> None:
        super().setUp()
        self.protocol, transport = self.harness.connect()
        self.protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            + message("gone").replace(b"\n", b"\r\n")
            + b".\r\n"
        )
        self.harness.clock.advance(0)
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354])

    def test_send_not_handed_over_is_cancelled(self) -> None:
        """The client never heard 250 and will retry: a send the provider has not yet
        handed over is cancelled, so the retry is not a duplicate; one info line says
        the message was not delivered."""
        self.protocol.connectionLost(None)
        self.assertTrue(self.provider.cancelled)
        [line] = self.logged(CLIENT_GONE)
        self.assertEqual(line["outcome"], "not delivered")

    def test_send_handed_over_is_left_to_finish_and_named(self) -> None:
        """A send the provider has handed over cannot be taken back: it is left to
        finish (the backend's answer is logged as usual) and a warning names it."""
        self.provider.hand_over.callback(None)
        self.protocol.connectionLost(None)
        self.assertFalse(self.provider.cancelled)
        self.assertEqual(len(self.logged(GONE_AFTER_HANDOVER)), 1)
        self.provider.answer.callback(None)
        self.assertEqual(len(self.logged("message delivered")), 1)
        self.assertEqual(self.logged(CLIENT_GONE), [])
