"""Requests in flight per mailbox: a slot gate that costs nothing when a slot is free.

Twisted's C{DeferredSemaphore} makes a Deferred for every acquisition, and
the provider then armed a timer on it (the message's time budget) for every
request that had to wait.  Under load most requests wait a little (20 SMTP
sessions share 4 slots), so that was a Deferred, a timer and its
cancellation per message (see docs/performance.md, "Graph path CPU").

L{SlotGate} hands out a free slot at once (L{SlotGate.take} answers None:
no Deferred at all).  A request that has to wait gets a Deferred, fired when
a slot is handed to it, first come first served; the waiters' deadlines
share B{one} timer per gate, armed for the earliest of them while anyone
waits, instead of one timer each.  A waiter whose deadline passes fails with L{SlotTimeoutError}; a
cancelled waiter (the message was cancelled) leaves the queue.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class SlotTimeoutError(Exception):
    """The deadline passed before a slot came free."""


class _Waiter:
    """One request waiting for a slot, and when it stops waiting."""

    __slots__ = ("deadline", "waiting")

    def __init__(self, deadline: float, waiting: Deferred[None]) -> None:
        self.deadline = deadline
        self.waiting = waiting


class SlotGate:
    """At most C{limit} holders at once; waiters served in order, each until its deadline."""

    def __init__(self, limit: int, reactor: IReactorTime) -> None:
        self._free = limit
        self._reactor = reactor
        self._queue: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0

    @property
    def free(self) -> int:
        """Slots free now."""
        return self._free

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    def take(self, deadline: float) -> Deferred[None] | None:
        """Take a slot: None when one was free (it is the caller's now), else a Deferred.

        The Deferred fires once a slot is handed over, or fails with
        L{SlotTimeoutError} at C{deadline} (at once when it has passed already).
        Cancelling it gives up the place in the queue.
        """
        if self._free > 0 and not self._queue:
            self._free -= 1
            return None
        waiter = _Waiter(deadline, Deferred(lambda d: self._leave(waiter)))
        if deadline <= self._reactor.seconds():
            waiter.waiting.errback(SlotTimeoutError())
            return waiter.waiting
        self._queue.append(waiter)
        self._arm(deadline)
        return waiter.waiting

    def release(self) -> None:
        """Give a slot back: to the first waiter, else to the free ones."""
        if self._queue:
            waiter = self._queue.popleft()
            if not self._queue:
                self._disarm()
            waiter.waiting.callback(None)
        else:
            self._free += 1

    def _leave(self, waiter: _Waiter) -> None:
        # Deferred's canceller: the Deferred then fails with CancelledError.
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        if not self._queue:
            self._disarm()

    def _disarm(self) -> None:
        """Nobody waits: no timer left behind (an idle relay keeps no timers)."""
        timer = self._timer
        self._timer = None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm(self, deadline: float) -> None:
        """Have the timer fire no later than C{deadline}."""
        timer = self._timer
        if timer is not None and timer.active():
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._reactor.callLater(
            max(0.0, deadline - self._reactor.seconds()), self._expire
        )

    def _expire(self) -> None:
        """Fail the waiters whose deadline passed; re-arm for the next one."""
        self._timer = None
        now = self._reactor.seconds()
        expired = [w for w in self._queue if w.deadline <= now]
        if expired:
            self._queue = deque(w for w in self._queue if w.deadline > now)
        if self._queue:
            self._arm(min(w.deadline for w in self._queue))
        for waiter in expired:
            waiter.waiting.errback(SlotTimeoutError())
