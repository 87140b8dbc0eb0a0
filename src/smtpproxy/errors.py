"""Delivery failures, and the single place they become SMTP replies.

Providers raise (or fail their Deferred with) one of the two delivery errors
below.  Nothing else in the code base chooses a reply code for a failed
delivery: the SMTP layer asks L{reply_for_failure}, so a provider author only
decides "retry later" versus "never", which is the decision they can make.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpproxy.queue.model import QueueBusyError, QueueFullError, QueueReadOnlyError


class DeliveryError(Exception):
    """A provider could not deliver a message.

    @ivar reason: operator-facing text; it is also shown to the SMTP client,
        so it must never contain secrets or message content.
    @ivar status: an RFC 3463 enhanced status code such as C{"4.4.1"}.
    @ivar retry_after: seconds the backend asked us to wait before trying
        again (Graph's C{Retry-After}), if it did; the queue honours it.
    @ivar request_id: the backend's id for the failed request (Graph's
        C{request-id}), kept in the queue's attempt history.
    @ivar not_attempted: the provider held the message back without trying
        (a sending budget was used up): the queue retries it after
        C{retry_after} exactly, rather than on its growing back-off.
    """

    default_status = "4.3.0"
    retry_after: float | None = None
    request_id: str | None = None
    not_attempted: bool = False

    def __init__(self, reason: str, status: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status or self.default_status


class TransientDeliveryError(DeliveryError):
    """The client should retry later (4xx): throttling, outages, our own misconfiguration.

    @ivar code: 451 unless the cause has a code of its own (452: out of
        storage, such as a full sending mailbox).
    """

    default_status = "4.3.0"

    def __init__(self, reason: str, status: str | None = None, code: int = 451) -> None:
        super().__init__(reason, status)
        self.code = code


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help (5xx): the backend rejected this message for good."""

    default_status = "5.6.0"

    def __init__(self, reason: str, status: str | None = None, code: int = 554) -> None:
        super().__init__(reason, status)
        self.code = code


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code, enhanced status and human text."""

    code: int
    status: str
    text: str

    def render(self) -> bytes:
        """The reply's text as sent on the wire (without the code)."""
        line = f"{self.status} {self.text}" if self.status else self.text
        # A reply must never smuggle a line break onto the wire.
        return line.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def reply_for_failure(error: BaseException) -> Reply:
    """Map any exception raised while delivering to the SMTP reply for the client.

    Unknown exceptions are bugs or surprises; we cannot know that retrying is
    pointless, so they become a transient C{451} rather than a bounce.
    """
    if isinstance(error, PermanentDeliveryError):
        code = error.code if error.code in (550, 552, 553, 554) else 554
        return Reply(code, _clean_status(error.status, "5"), error.reason)
    if isinstance(error, QueueFullError):
        return Reply(452, "4.3.1", "Insufficient system storage, try again later")
    if isinstance(error, QueueBusyError):
        return Reply(451, "4.3.0", "Queue busy, try again later")
    if isinstance(error, QueueReadOnlyError):
        # The cause (a read-only filesystem) is the operator's to read in the log.
        return Reply(451, "4.3.0", "Queue storage unavailable, try again later")
    if isinstance(error, TransientDeliveryError):
        code = error.code if error.code in (450, 451, 452) else 451
        return Reply(code, _clean_status(error.status, "4"), error.reason)
    if isinstance(error, DeliveryError):
        return Reply(451, _clean_status(error.status, "4"), error.reason)
    return Reply(451, "4.3.0", "Local error in processing, try again later")


def _clean_status(status: str, klass: str) -> str:
    """Force an enhanced status code's class to agree with the reply code."""
    parts = status.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return f"{klass}.3.0"
    return ".".join([klass, *parts[1:]])
