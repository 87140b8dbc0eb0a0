"""The submission API at shutdown: refuse new messages, finish (or give up) the ones in flight.

The HTTP listener is the last thing the relay stops (the probes must keep
answering), so a submission can arrive, or still be under way, while the
queue or the provider is closing behind it.  The SMTP side's rule applies
here too: from the moment the stop begins new messages are refused with a
retryable answer (503 with C{Retry-After}); those already accepted for
processing get until C{SMTP_SHUTDOWN_TIMEOUT}; past it each is given up the
way the SMTP side gives up its own (L{Flight.give_up}), and every client
hears the truth: 202/200 only for what is stored or delivered, 503 for what
is not, never 503 for a message that is then stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smtpproxy.delivery import Heard
from smtpproxy.providers.result import Handover
from smtpproxy.web.api.problems import ApiError

#: After giving up the submissions still in flight, their answers are
#: waited for the handover grace (SMTP_SHUTDOWN_HANDOVER_GRACE, as on the
#: SMTP side) and this much more: a withdrawn enqueue and a cancelled send
#: answer at once, a commit already under way and a send the provider had
#: already handed over (not cancelled) within the grace, and each answer
#: still has to be written.
GIVE_UP_MARGIN = 0.5
#: Retry-After (seconds) for a submission refused because the relay stops.
STOPPING_RETRY_AFTER = 30


def stopping_error() -> ApiError:
    """The answer for a submission the relay will not take because it is stopping."""
    return ApiError(
        503,
        "shutting_down",
        "the relay is shutting down; the message was not accepted, try again later",
        None,
        STOPPING_RETRY_AFTER,
    )


class Flight:
    """One submission between its acceptance for processing and its answer.

    @ivar withdraw: queue mode: stop the enqueue if it has not committed
        (True: it never will; False: the commit's outcome is coming).
    @ivar sending: direct mode: the provider's send, once started.
    @ivar handover: direct mode: whether that send has reached the backend.
    @ivar given_up: set at the forced stop; a send not started by then never is.
    @ivar unanswered: direct mode: called when the stop goes on without the
        answer of a send that was handed over (it logs the message as such).
    @ivar cancelled: the forced stop, or the client leaving, cancelled the
        send (its outcome is logged).
    @ivar heard: what the client of a cancelled send heard, for its log
        line (L{smtpproxy.delivery.log_cancelled}): C{"not accepted"} (503
        at the stop) or C{"gone"} (it disconnected before its answer).
    """

    def __init__(self) -> None:
        self.withdraw: Callable[[], bool] | None = None
        self.sending: defer.Deferred[Any] | None = None
        self.handover: Handover | None = None
        self.unanswered: Callable[[], None] | None = None
        self.given_up = False
        self.cancelled = False
        self.heard: Heard = "not accepted"

    @property
    def handed_over(self) -> bool:
        """Direct mode: has the provider handed the message to its backend yet?"""
        return self.handover is not None and self.handover.handed_over

    @property
    def gone(self) -> bool:
        """The client disconnected before its answer (L{client_gone})."""
        return self.heard == "gone"

    def client_gone(self) -> None:
        """Direct mode: the client disconnected before its answer; it will send again.

        A send not yet handed over is cancelled, so that the retry is the
        only copy (a send not started yet never is: the submitter checks
        L{gone}).  One the provider has handed over is left to finish: a
        cancel could not take the message back (the caller names it in a
        warning).  Queue mode is the store's business, as on the SMTP side.
        """
        if self.withdraw is not None or self.given_up:
            return
        self.heard = "gone"
        self._cancel_send()

    def give_up(self) -> None:
        """The stop's time is up: withdraw the enqueue, or cancel the provider's send.

        A send the provider has already handed to its backend is left to
        finish: cancelling it could not take the message back, only cut
        off the answer, and the client would retry what was delivered.
        Its real outcome comes within the handover grace (or the stop goes
        on without it and the client gets no answer, never a false 503).
        """
        self.given_up = True
        if self.withdraw is not None:
            self.withdraw()
        self._cancel_send()

    def _cancel_send(self) -> None:
        """Cancel the provider's send, unless it is over or the backend has the message."""
        sending = self.sending
        if sending is None or sending.called or self.handed_over or self.cancelled:
            return
        self.cancelled = True
        sending.cancel()

    def left_unanswered(self) -> None:
        """The stop goes on without this submission's answer: name a handed-over send.

        It is not cancelled (its client would hear a false 503 while the
        listener is still up); the process ends it, and the client gets no
        answer.  Only the log can say that the message may be delivered.
        """
        sending = self.sending
        if self.unanswered is not None and sending is not None and not sending.called:
            self.unanswered()


class Flights:
    """The submissions in flight, and the stop that waits for them (bounded)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._open: set[Flight] = set()
        self._drained: list[defer.Deferred[None]] = []
        self._timer: IDelayedCall | None = None
        self.stopping = False

    def __len__(self) -> int:
        return len(self._open)

    def start(self) -> Flight:
        """Track a new submission; L{stopping_error} once the stop has begun."""
        if self.stopping:
            raise stopping_error()
        flight = Flight()
        self._open.add(flight)
        return flight

    def end(self, flight: Flight) -> None:
        """The submission has its answer."""
        self._open.discard(flight)
        if not self._open:
            self._finish()

    def drain(self, timeout: float, handover_grace: float) -> defer.Deferred[None]:
        """Refuse new submissions; fire when those in flight have answered.

        After C{timeout} seconds those still in flight are given up, and
        after C{handover_grace} + L{GIVE_UP_MARGIN} more the result fires
        whatever is left (a store that never answers must not hold the
        stop up).
        """
        self.stopping = True
        if not self._open:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._drained.append(done)
        if self._timer is None:
            wait = handover_grace + GIVE_UP_MARGIN
            self._timer = self._clock.callLater(timeout, self._give_up, wait)
        return done

    def _give_up(self, wait: float) -> None:
        self._timer = self._clock.callLater(wait, self._finish)
        for flight in list(self._open):
            flight.give_up()

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for flight in list(self._open):
            flight.left_unanswered()
        drained, self._drained = self._drained, []
        for done in drained:
            done.callback(None)
