"""What a provider's C{send} may fire with: nothing, or which recipients it refused.

Most backends take a message for every recipient or for none (Graph, the
mailbox, stdout): their C{send} fires with None, and a refusal is the
L{smtpproxy.errors.DeliveryError} it fails with.  An SMTP upstream answers
each RCPT on its own and may take the message for some recipients while
refusing others; L{SmtpProvider} then fires with a L{PartlyRefused}, so
that the caller decides what the refused recipients are owed (the queue
retries the temporary ones and dead-letters the permanent ones) instead of a
log line being the only trace.

Only a caller that can retry recipients one by one (the queue) may be
handed a message that went to some recipients while others were refused
temporarily.  Every other caller (direct mode: the client's one reply after
DATA covers every recipient) asks for the whole message or nothing: a
backend that can still hold the message back does so when
L{whole_message_deferral} says so, and fails with L{PartlyDeferredError},
so that the client's retry reaches everyone once (docs/upstream-smtp.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import CancelledError

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.logsafe import MAX_REASON, clip

_T = TypeVar("_T")

#: How many refused recipients a reply to our client names (the log names up to 20).
NAMED_IN_REPLY = 3
#: The longest text about them in that reply: with C{451 4.x.x } (or
#: C{250 2.0.0 OK: delivered as <id> }) and CRLF it stays inside RFC 5321's
#: 512 octets per reply line.
MAX_DEFERRAL_TEXT = 400


@dataclass(frozen=True, slots=True)
class RecipientRefusal:
    """One recipient the backend refused, with its reply (C{450 4.2.1 Mailbox busy}).

    @ivar status: the enhanced status code, or C{""} when the backend gave none.
    """

    address: str
    code: int
    status: str
    text: str

    @property
    def permanent(self) -> bool:
        """A 5xx: retrying cannot help.  Anything else is worth another try."""
        return 500 <= self.code < 600

    @property
    def reply(self) -> str:
        """The reply as one clipped line, for logs and the queue's history."""
        parts = [str(self.code), self.status, self.text]
        return clip(" ".join(p for p in parts if p), MAX_REASON)


@dataclass(frozen=True, slots=True)
class PartlyRefused:
    """The backend took the message for C{accepted} and refused C{refused} (both non-empty)."""

    accepted: tuple[str, ...]
    refused: tuple[RecipientRefusal, ...]

    @property
    def temporary(self) -> tuple[RecipientRefusal, ...]:
        return tuple(r for r in self.refused if not r.permanent)

    @property
    def permanent(self) -> tuple[RecipientRefusal, ...]:
        return tuple(r for r in self.refused if r.permanent)

    @property
    def summary(self) -> str:
        """Who did not get the message, in a few words for the client's C{250} reply.

        Direct mode answers a partly delivered message with 250 (the
        accepted recipients have it); this text, after the message id, is
        what keeps that answer honest for a client or an operator reading
        the client's log: C{to 2 of 3 recipients; not delivered to:
        <gone@example.org> 550 5.1.1 No such user}.  Bounded like
        L{PartlyDeferredError}'s reason.
        """
        total = len(self.accepted) + len(self.refused)
        return clip(
            f"to {len(self.accepted)} of {total} recipients; "
            f"not delivered to: {_named(self.refused)}",
            MAX_DEFERRAL_TEXT,
        )


class AllRefusedTemporaryError(TransientDeliveryError):
    """The backend refused every recipient, at least one of them with a 4xx.

    Our client hears the temporary refusal (retrying can still help that
    recipient); the queue reads C{refused} and fails the 5xx recipients at
    once, retrying only the others (L{smtpproxy.queue.policy.after_partial}).
    """

    def __init__(
        self, reason: str, status: str | None, code: int, refused: tuple[RecipientRefusal, ...]
    ) -> None:
        super().__init__(reason, status, code)
        self.refused = refused


class AllRefusedPermanentError(PermanentDeliveryError):
    """The backend refused every recipient, each with a 5xx: nothing is worth retrying."""

    def __init__(
        self, reason: str, status: str | None, code: int, refused: tuple[RecipientRefusal, ...]
    ) -> None:
        super().__init__(reason, status, code)
        self.refused = refused


class PartlyDeferredError(TransientDeliveryError):
    """The backend would take the message for some recipients and deferred others (4xx).

    Raised only for a caller that cannot retry recipients one by one
    (direct mode), before the backend has the message: nobody got it, and
    the client's retry, once the backend takes every recipient, delivers
    it to each of them once.  C{refused} names every refusal (5xx ones
    too), C{accepted} the recipients that would have had it.
    """

    def __init__(
        self,
        reason: str,
        status: str | None,
        accepted: tuple[str, ...],
        refused: tuple[RecipientRefusal, ...],
    ) -> None:
        super().__init__(reason, status, 451)
        self.accepted = accepted
        self.refused = refused


def whole_message_deferral(
    accepted: Sequence[str], refused: Sequence[RecipientRefusal]
) -> PartlyDeferredError | None:
    """Must a message be held back from C{accepted} because of C{refused}?  (Pure.)

    For a caller that owes every recipient the same answer (direct mode):
    when at least one recipient was accepted and at least one refused with
    a 4xx, sending would deliver to some now and leave the others to a
    retry nobody makes (or, if the client retries the whole message, give
    the accepted ones a second copy).  The answer is then an error saying
    so, a 451 whose status is the first deferral's own (C{4.2.1} for a busy
    mailbox, C{4.7.1} for greylisting; C{4.0.0} when it gave none) and
    whose text counts the deferred recipients and names the first
    L{NAMED_IN_REPLY} with their replies.  None: send, because every
    recipient was accepted, or the refusals are all permanent (retrying
    cannot help them, see docs/upstream-smtp.md), or nobody was accepted
    (the backend's own all-refused answer stands).
    """
    temporary = [r for r in refused if not r.permanent]
    if not accepted or not temporary:
        return None
    total = len(accepted) + len(refused)
    reason = clip(
        f"upstream deferred {len(temporary)} of {total} recipients, so the message was "
        f"sent to none of them; try again later: {_named(temporary)}",
        MAX_DEFERRAL_TEXT,
    )
    first = temporary[0].status
    status = first if first.startswith("4.") else "4.0.0"
    return PartlyDeferredError(reason, status, tuple(accepted), tuple(refused))


def _named(refused: Sequence[RecipientRefusal]) -> str:
    """The first L{NAMED_IN_REPLY} refusals with their replies, and how many more."""
    named = "; ".join(f"<{r.address}> {r.reply}" for r in refused[:NAMED_IN_REPLY])
    more = len(refused) - NAMED_IN_REPLY
    return named + (f"; and {more} more" if more > 0 else "")


#: The error of a backend that refused every recipient, each with its own reply.
AllRefusedError = AllRefusedTemporaryError | AllRefusedPermanentError


class SendCancelledError(CancelledError):
    """A C{send} stopped by its caller (the relay giving up at shutdown), and what it knows.

    Cancelling a provider's C{send} stops what has not happened yet; what
    it cannot undo is a backend that already has the message.  A provider
    fails a cancelled C{send} with this error to say which of the two it
    was: with C{handed_over} false nothing reached the backend, so nothing
    will be delivered; with it true the request (Graph's C{sendMail}, the
    upstream's end of DATA) had left, and whether the message is delivered
    is unknown.  A plain C{CancelledError} is read as unknown.
    """

    def __init__(self, handed_over: bool) -> None:
        super().__init__("delivery cancelled" + (" after hand-over" if handed_over else ""))
        self.handed_over = handed_over


@dataclass(slots=True)
class Handover:
    """Has a send's message left for the backend yet?  Marked by the provider, read by its caller.

    The moment that matters at a forced stop: before it, cancelling the
    send means the message is not delivered (the client may be told
    "not accepted"); after it (the upstream's end of DATA written, Graph's
    send request on its way) cancelling cannot take the message back and
    only cuts off the backend's answer, so the caller waits a bounded
    grace for that answer instead (docs/operator-guide.md, Stopping).
    A provider that never marks it is read as "not yet", as before.
    """

    handed_over: bool = False

    def mark(self) -> None:
        self.handed_over = True

    def clear(self) -> None:
        """The backend answered that it did not take the message (Graph's 503, say)."""
        self.handed_over = False


# The Handover of the send being started.  A context variable rather than a
# parameter of Provider.send, which every provider (and test fake) would then
# have to take: Deferred.fromCoroutine runs a provider's coroutine in a copy
# of the caller's context, so the coroutine finds its caller's Handover for
# its whole life, however many awaits later it hands the message over.
_HANDOVER: ContextVar[Handover | None] = ContextVar("send_handover", default=None)


def watched(send: Callable[[], _T]) -> tuple[_T, Handover]:
    """Call C{send} (which starts a provider's send) with a fresh L{Handover} to watch it by."""
    handover = Handover()
    token = _HANDOVER.set(handover)
    try:
        return send(), handover
    finally:
        _HANDOVER.reset(token)


def current_handover() -> Handover:
    """For a provider: the L{Handover} its caller watches (a loose one when none does)."""
    handover = _HANDOVER.get()
    return Handover() if handover is None else handover
