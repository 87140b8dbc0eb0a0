"""The idle timer of an SMTP session: a deadline that input moves, one DelayedCall.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from smtpproxy.smtp.base import CHUNK, DATA, ShellBase


class IdleTimer(ShellBase):
    """C{TimeoutMixin}'s interface, over a deadline instead of a rescheduled timer."""

    # TimeoutMixin's timer is a DelayedCall reset on every line.  Moving a
    # DelayedCall sooner scans the reactor's whole heap of timers, and this
    # session moves between a 300 s command timeout, a 600 s DATA timeout
    # and a 10 s close grace several times per message.  Here activity only
    # moves a deadline; the one DelayedCall, when it fires early, re-arms
    # for what is left, and is replaced only when the deadline comes sooner.

    def setTimeout(self, period: float | None) -> None:
        """Time out after C{period} seconds without input; None stops the timer."""
        self.timeOut = period
        if period is None:
            self._deadline = None
            self._cancel_timer()
            return
        self._deadline = self._clock.seconds() + period
        timer = self._timer
        if timer is not None and timer.getTime() > self._deadline:
            self._cancel_timer()
            timer = None
        if timer is None:
            self._timer = self.callLater(period, self._idle_check)

    def resetTimeout(self) -> None:
        """Input arrived: the idle period starts again."""
        if self.timeOut is not None:
            self._deadline = self._clock.seconds() + self.timeOut

    def apply_idle_limits(self) -> None:
        """The relay's stress changed: re-derive this session's idle limit.

        Only a session idling in command mode is affected (not one inside
        DATA, waiting on a delivery, or closing).  The time already idle
        counts: the deadline moves by the difference between the limits.
        """
        if self._closing or self._busy or self.mode in (DATA, CHUNK):
            return
        period = self._limits().command if self._commanded else self._limits().greeting
        if self.timeOut is None or self._deadline is None or period == self.timeOut:
            return
        self._deadline += period - self.timeOut
        self.timeOut = period
        timer = self._timer
        if timer is not None and timer.getTime() > self._deadline:
            self._cancel_timer()
            timer = None
        if timer is None:
            left = max(self._deadline - self._clock.seconds(), 0.0)
            self._timer = self.callLater(left, self._idle_check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _idle_check(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        left = self._deadline - self._clock.seconds()
        # A millisecond of slack: float sums of the same instants may differ
        # in the last bit, and a re-arm for 1e-13 s would never end a test
        # clock's advance to the deadline.
        if left > 0.001:
            self._timer = self.callLater(left, self._idle_check)
            return
        self.timeOut = self._deadline = None
        self.timeoutConnection()
