"""The submission API's stop (smtpproxy.web.api.drain) on a Clock: refuse, wait, give up, bound."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api.drain import GIVE_UP_GRACE, STOPPING_RETRY_AFTER, Flights
from smtpproxy.web.api.problems import ApiError


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
        self.assertIsNone(self.successResultOf(flights.drain(10)))
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
        drained = flights.drain(10)
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
        drained = flights.drain(5)
        clock.advance(5)
        self.assertEqual(withdrawn, [True])
        self.failureResultOf(sending, defer.CancelledError)
        self.assertTrue(stuck.given_up)
        flights.end(queued)
        flights.end(direct)
        self.assertNoResult(drained)
        clock.advance(GIVE_UP_GRACE)
        self.successResultOf(drained)
        self.assertEqual(clock.getDelayedCalls(), [])
