"""The per-mailbox slot gate on a Clock: free slots at once, waiters in order, deadlines."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.graph.slots import SlotGate


class Watch:
    """What became of a waiter's Deferred: "waiting", "granted" or the failure's class name."""

    def __init__(self, d: Deferred[None] | None) -> None:
        assert d is not None, "a slot was free: nothing to watch"
        self.d = d
        self.outcome = "waiting"
        d.addCallbacks(self._granted, self._failed)

    def _granted(self, _: object) -> None:
        self.outcome = "granted"

    def _failed(self, failure: Failure) -> None:
        self.outcome = type(failure.value).__name__


class SlotGateTests(SynchronousTestCase):
    def test_free_slots_need_no_deferred_or_timer(self) -> None:
        """While a slot is free, taking one answers None at once and arms no timer."""
        clock = Clock()
        gate = SlotGate(2, clock)
        self.assertIsNone(gate.take(10.0))
        self.assertIsNone(gate.take(10.0))
        self.assertEqual((gate.free, clock.getDelayedCalls()), (0, []))

    def test_waiters_served_in_order(self) -> None:
        """A released slot goes to the first waiter, then the next; then it is free again."""
        clock = Clock()
        gate = SlotGate(1, clock)
        self.assertIsNone(gate.take(10.0))
        first, second = Watch(gate.take(10.0)), Watch(gate.take(10.0))
        gate.release()
        self.assertEqual((first.outcome, second.outcome), ("granted", "waiting"))
        gate.release()
        self.assertEqual(second.outcome, "granted")
        gate.release()
        self.assertEqual((gate.free, gate.waiting, clock.getDelayedCalls()), (1, 0, []))

    def test_one_timer_for_all_waiters(self) -> None:
        """However many wait, the gate keeps one timer, set for the earliest deadline."""
        clock = Clock()
        gate = SlotGate(1, clock)
        gate.take(100.0)
        waiters = [gate.take(50.0 + n) for n in range(5)]
        early = gate.take(20.0)
        assert early is not None
        (timer,) = clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 20.0)
        self.assertEqual(len(waiters), 5)

    def test_deadline_fails_only_the_expired(self) -> None:
        """At a waiter's deadline it fails; the others still wait, until their own."""
        clock = Clock()
        gate = SlotGate(1, clock)
        gate.take(100.0)
        soon, later = Watch(gate.take(5.0)), Watch(gate.take(8.0))
        clock.advance(4.9)
        self.assertEqual((soon.outcome, later.outcome), ("waiting", "waiting"))
        clock.advance(0.1)
        self.assertEqual((soon.outcome, later.outcome), ("SlotTimeoutError", "waiting"))
        clock.advance(3.0)
        self.assertEqual(later.outcome, "SlotTimeoutError")
        self.assertEqual((gate.waiting, clock.getDelayedCalls()), (0, []))

    def test_deadline_already_past(self) -> None:
        """A request that must wait but has no time left fails at once, queueing nothing."""
        clock = Clock()
        clock.advance(10.0)
        gate = SlotGate(1, clock)
        gate.take(20.0)
        late = Watch(gate.take(10.0))
        self.assertEqual(late.outcome, "SlotTimeoutError")
        self.assertEqual((gate.waiting, clock.getDelayedCalls()), (0, []))

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A cancelled waiter never gets the slot; the next one does; no timer is left."""
        clock = Clock()
        gate = SlotGate(1, clock)
        gate.take(100.0)
        gone, next_ = Watch(gate.take(10.0)), Watch(gate.take(10.0))
        gone.d.cancel()
        self.assertEqual(gone.outcome, CancelledError.__name__)
        gate.release()
        self.assertEqual(next_.outcome, "granted")
        self.assertEqual((gate.waiting, clock.getDelayedCalls()), (0, []))
