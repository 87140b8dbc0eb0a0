"""The HTTP API's decision when a direct-mode client disconnects before its answer, on a Clock.

The request's C{notifyFinish()} errbacks when the connection is lost; the
L{Submitter} then cancels a send the provider has not handed over (the
client will retry, and the retry must be the only copy), and leaves one
it has handed over to finish, naming it in a warning, as the SMTP side
does.  No sockets: a L{HandingProvider} whose hand-over and answer the
test fires, and a plain Deferred standing for C{notifyFinish()}.  The same
behaviour through the real twistd is in C{test_client_gone_http.py}.
"""

from __future__ import annotations

from typing import cast

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.web.api.drain import Flight
from smtpproxy.web.api.problems import ApiError
from smtpproxy.web.api.submit import Accepted, Submitter
from smtpproxy.web.metrics import Metrics
from tests.support import message
from tests.test_handover_at_stop import CLIENT_GONE, GONE_AFTER_HANDOVER, HandingProvider
from tests.web.test_ops import samples

CANCELLED = (
    "smtpproxy_messages_total",
    (("front_door", "http"), ("outcome", "cancelled"), ("provider", "recording")),
)


class SubmitterClientGoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.metrics = Metrics()
        globalLogPublisher.addObserver(self.metrics.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.metrics.observer)
        self.clock = Clock()
        self.provider = HandingProvider()
        self.submitter = Submitter(self.provider, self.clock, MessageParser(self.clock))
        self.ended: defer.Deferred[None] = defer.Deferred()
        data = message("gone-http")
        self.answer = self.submitter.submit(
            "a@example.com",
            ["b@example.org"],
            data,
            {"request_id": "r1", "client": "127.0.0.1", "key_id": "app"},
            parsed=parse_message("a@example.com", ["b@example.org"], data),
            ended=self.ended,
        )
        self.assertEqual(len(self.provider.emails), 1)
        self.assertNoResult(self.answer)

    def logged(self, text: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_format") == text]

    def leave(self) -> None:
        self.ended.errback(Failure(ConnectionDone("the client closed its socket")))

    def test_send_not_handed_over_is_cancelled_and_logged_once(self) -> None:
        """The client leaves while the provider has not handed the message over: the
        send is cancelled, one info line (SMTP's own words, front_door http) says the
        message was not delivered, /metrics counts it as cancelled, and the flight ends."""
        self.leave()
        self.assertTrue(self.provider.cancelled)
        [line] = self.logged(CLIENT_GONE)
        self.assertEqual(line["front_door"], "http")
        self.assertEqual(line["outcome"], "not delivered")
        self.assertEqual(line["ended_by"], "cancel")
        self.assertEqual(self.logged(GONE_AFTER_HANDOVER), [])
        self.assertIsInstance(self.failureResultOf(self.answer).value, ApiError)
        self.assertEqual(len(self.submitter.flights), 0)
        self.assertEqual(samples(self.metrics).get(CANCELLED), 1.0)

    def test_send_handed_over_is_left_to_finish_and_named(self) -> None:
        """The provider had handed the message over: a cancel could not take it back,
        so the send goes on (its answer is logged as delivered) and a warning names it."""
        self.provider.hand_over.callback(None)
        self.leave()
        self.assertFalse(self.provider.cancelled)
        [warning] = self.logged(GONE_AFTER_HANDOVER)
        self.assertEqual((warning["front_door"], warning["request_id"]), ("http", "r1"))
        self.provider.answer.callback(None)
        accepted = self.successResultOf(self.answer)
        self.assertIsInstance(accepted, Accepted)
        self.assertEqual(warning["id"], accepted.id)
        self.assertEqual(len(self.logged("message delivered")), 1)
        self.assertEqual(self.logged(CLIENT_GONE), [])
        self.assertIsNone(samples(self.metrics).get(CANCELLED))

    def test_answer_written_first_cancels_nothing(self) -> None:
        """The request finished normally (notifyFinish's callback): nothing is cancelled
        and no client-gone line is written."""
        self.provider.hand_over.callback(None)
        self.provider.answer.callback(None)
        self.successResultOf(self.answer)
        self.ended.callback(None)
        self.assertFalse(self.provider.cancelled)
        self.assertEqual(self.logged(CLIENT_GONE) + self.logged(GONE_AFTER_HANDOVER), [])


class FlightClientGoneTests(SynchronousTestCase):
    def test_not_started_yet_is_marked_and_never_sent(self) -> None:
        """Still being parsed (no send yet): the flight is marked gone, which the
        submitter checks before it starts the send."""
        flight = Flight()
        flight.client_gone()
        self.assertTrue(flight.gone)
        self.assertFalse(flight.cancelled)

    def test_queue_mode_is_left_to_the_store(self) -> None:
        """Queue mode (an enqueue, withdrawable): the client leaving changes nothing,
        as on the SMTP side; the store's commit decides."""
        flight = Flight()
        withdrawn: list[bool] = []

        def withdraw() -> bool:
            withdrawn.append(True)
            return True

        flight.withdraw = withdraw
        flight.client_gone()
        self.assertFalse(flight.gone)
        self.assertEqual(withdrawn, [])

    def test_cancelled_once_even_if_the_stop_gives_up_later(self) -> None:
        """A send cancelled for a gone client is not cancelled again at the stop."""
        flight = Flight()
        cancels: list[bool] = []
        sending: defer.Deferred[None] = defer.Deferred(lambda d: cancels.append(True))
        flight.sending = sending
        flight.client_gone()
        flight.give_up()
        self.assertEqual(cancels, [True])
        self.assertEqual(flight.heard, "gone")
        self.failureResultOf(sending, defer.CancelledError)
