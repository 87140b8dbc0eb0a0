"""The submission API's stop (smtpproxy.web.api.drain) on a Clock: refuse, wait, give up, bound."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.queue.front import QueueFront
from smtpproxy.web.api.drain import GIVE_UP_MARGIN, STOPPING_RETRY_AFTER, Flights
from smtpproxy.web.api.problems import ApiError
from smtpproxy.web.api.submit import Accepted, Submitter
from tests.queue.memory import MemoryStore
from tests.support import RecordingProvider, message

#: The default SMTP_SHUTDOWN_HANDOVER_GRACE, from its one declaration.
GRACE = Config().smtp_shutdown_handover_grace


def _recorder(calls: list[bool]) -> Callable[[], bool]:
    """A withdraw that succeeds and records that it was asked."""

    def withdraw() -> bool:
        calls.append(True)
        return True

    return withdraw


class FlightsTests(SynchronousTestCase):
    def test_nothing_in_flight_drains_at_once_and_refuses_after(self) -> None:
        """With nothing in flight the stop does not wait; from then on a new submission
        is refused with 503 shutting_down and a Retry-After."""
        flights = Flights(Clock())
        self.assertIsNone(self.successResultOf(flights.drain(10, GRACE)))
        with self.assertRaises(ApiError) as caught:
            flights.start()
        error = caught.exception
        self.assertEqual(
            (error.status, error.code, error.retry_after),
            (503, "shutting_down", STOPPING_RETRY_AFTER),
        )

    def test_waits_for_the_flight_that_ends_in_time(self) -> None:
        """A submission that answers before the timeout ends the wait then, and is
        never given up (no withdraw, no cancel)."""
        clock = Clock()
        flights = Flights(clock)
        flight = flights.start()
        withdrawn: list[bool] = []
        flight.withdraw = _recorder(withdrawn)
        drained = flights.drain(10, GRACE)
        clock.advance(9)
        self.assertNoResult(drained)
        flights.end(flight)
        self.successResultOf(drained)
        self.assertEqual((withdrawn, flight.given_up, clock.getDelayedCalls()), ([], False, []))

    def test_past_the_timeout_withdraws_cancels_and_stays_bounded(self) -> None:
        """At the timeout a queued submission is withdrawn and a direct one's send is
        cancelled; one that still does not answer does not hold the stop past the grace."""
        clock = Clock()
        flights = Flights(clock)
        queued, direct, stuck = flights.start(), flights.start(), flights.start()
        withdrawn: list[bool] = []
        queued.withdraw = _recorder(withdrawn)
        sending: defer.Deferred[None] = defer.Deferred()
        direct.sending = sending
        drained = flights.drain(5, GRACE)
        clock.advance(5)
        self.assertEqual(withdrawn, [True])
        self.failureResultOf(sending, defer.CancelledError)
        self.assertTrue(stuck.given_up)
        flights.end(queued)
        flights.end(direct)
        self.assertNoResult(drained)
        clock.advance(GRACE + GIVE_UP_MARGIN)
        self.successResultOf(drained)
        self.assertEqual(clock.getDelayedCalls(), [])


class QueuedSubmissionsAtShutdownTests(SynchronousTestCase):
    """The Submitter in queue mode at the stop, on a Clock, with enqueues the test holds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(hold_enqueue=[])
        front = QueueFront(self.store, self.clock)
        self.submitter = Submitter(
            RecordingProvider(), self.clock, MessageParser(self.clock), front
        )

    def submit(self, subject: str) -> defer.Deferred[Accepted]:
        return self.submitter.submit(
            "a@example.com", ["b@example.org"], message(subject), {"client": "127.0.0.1"}
        )

    def test_withdrawn_is_503_committing_is_202_new_is_503(self) -> None:
        """Past the timeout a submission whose enqueue can still be withdrawn is, and
        hears 503 shutting_down with nothing stored; one whose commit is under way is
        waited for and hears 202 once stored (never 503 for a stored message); a new
        submission during the stop is refused at once."""
        withdrawn, committing = self.submit("withdrawn"), self.submit("committing")
        ids = list(self.store.withdrawable)
        self.store.sealed.add(ids[1])
        drained = self.submitter.flights.drain(5, GRACE)
        with self.assertRaises(ApiError) as caught:
            self.submit("late")
        self.assertEqual(caught.exception.code, "shutting_down")
        self.clock.advance(5)
        refused = self.failureResultOf(withdrawn, ApiError).value
        assert isinstance(refused, ApiError)
        self.assertEqual((refused.status, refused.code), (503, "shutting_down"))
        self.assertNoResult(committing)
        self.assertNoResult(drained)
        self.store.hold_enqueue = None
        self.store.withdrawable.pop(ids[1]).callback(None)  # the commit lands
        self.assertEqual(self.successResultOf(committing).status, "queued")
        self.successResultOf(drained)
        self.assertEqual(list(self.store.entries), [ids[1]])
