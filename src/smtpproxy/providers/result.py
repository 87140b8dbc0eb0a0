"""What a provider's C{send} may fire with: nothing, or which recipients it refused.

Most backends take a message for every recipient or for none (Graph, the
mailbox, stdout): their C{send} fires with None, and a refusal is the
L{smtpproxy.errors.DeliveryError} it fails with.  An SMTP upstream answers
each RCPT on its own and may take the message for some recipients while
refusing others; L{SmtpProvider} then fires with a L{PartlyRefused}, so
that the caller decides what the refused recipients are owed (the queue
retries the temporary ones and dead-letters the permanent ones; direct
mode can only log them, see docs/upstream-smtp.md) instead of a log line
being the only trace.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import CancelledError

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.logsafe import MAX_REASON, clip


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
