"""An accepted submission into the relay's one delivery pipeline, queued or direct.

The SMTP front door and this one end in the same places: with a queue
(C{QUEUE_URL}) the envelope and the bytes go to L{QueueFront.enqueue} and
the worker delivers them later, exactly as for a message that came over
SMTP; without one the bytes are parsed by the shared L{MessageParser} (or,
for a message the API built itself, their parsed view is written down from
the request: L{smtpproxy.web.api.direct}) and handed to the provider by
L{smtpproxy.delivery.send_email}, which logs the one C{message delivered}
line.  What failed becomes an HTTP answer
here, from the same exception types the SMTP side turns into replies
(L{smtpproxy.errors.reply_for_failure}).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.delivery import log_cancelled, log_not_retried, new_message_id, send_email
from smtpproxy.errors import reply_for_failure
from smtpproxy.logsafe import clip, clip_list
from smtpproxy.mime.message import Email
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers import Provider
from smtpproxy.providers.result import (
    PartlyRefused,
    RecipientRefusal,
    SendCancelledError,
    watched,
)
from smtpproxy.queue.front import QueueFront, meta_json
from smtpproxy.queue.model import (
    EnqueueWithdrawnError,
    Envelope,
    QueueBusyError,
    QueueFullError,
    QueueReadOnlyError,
)
from smtpproxy.web.api.drain import Flight, Flights, stopping_error
from smtpproxy.web.api.problems import ApiError

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "LONGEST_RETRY_AFTER",
    "Accepted",
    "Submitter",
    "error_for_failure",
]

log = Logger(namespace="smtpproxy.delivery")

#: Seconds a client is told to wait after a temporary failure that named no time.
DEFAULT_RETRY_AFTER = 30
#: The longest C{Retry-After} the API gives: a day, the longest a sending
#: budget holds mail back.  A provider's wait is a float from outside (a
#: backend's header): the answer must stay an integer a client can use.
LONGEST_RETRY_AFTER = 86_400
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message is with the provider (C{delivered}) or durable in the queue (C{queued})."""

    id: str
    status: str
    #: Recipients the provider refused while it took the message for the
    #: others (direct mode only: a queue retries or fails each itself).
    not_delivered: tuple[RecipientRefusal, ...] = ()


class _Bytes:
    """A body already in memory, as the queue's stores read one (L{BodySource})."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def chunks(self) -> Iterator[bytes]:
        view = memoryview(self._data)
        for start in range(0, len(view), _CHUNK):
            yield bytes(view[start : start + _CHUNK])


def error_for_failure(error: BaseException) -> ApiError:
    """The HTTP answer for a failed delivery or enqueue.

    Temporary (what SMTP answers 4xx) is 503 with C{Retry-After}: the
    client should send the same request again later.  A full queue is
    503 too, not 507: 507 belongs to WebDAV and generic HTTP clients do
    not retry it, while the right move is the same as for an outage.
    Permanent (5xx) is 502: the backend refused this message, and sending
    it again will not help.  The provider's reason is passed on, as SMTP
    passes it on in its reply (providers keep secrets and content out of it).
    """
    if isinstance(error, EnqueueWithdrawnError | defer.CancelledError):
        # Given up at shutdown (withdrawn before its commit, or its send cancelled).
        return stopping_error()
    reply = reply_for_failure(error)
    if isinstance(error, QueueFullError):
        return ApiError(
            503, "queue_full", "the queue is full, try again later", None, DEFAULT_RETRY_AFTER
        )
    if reply.code < 500:
        wait = getattr(error, "retry_after", None)
        seconds = (
            max(1, round(min(wait, LONGEST_RETRY_AFTER)))
            # NaN compares false, so only a positive number (inf too) gets here.
            if isinstance(wait, int | float) and wait > 0
            else DEFAULT_RETRY_AFTER
        )
        return ApiError(503, "temporary_failure", f"{reply.status} {reply.text}", None, seconds)
    return ApiError(502, "rejected", f"{reply.status} {reply.text}")


class Submitter:
    """Hands checked messages to the queue or the provider, like the SMTP side's avatar."""

    def __init__(
        self,
        provider: Provider,
        reactor: IReactorTime,
        parser: MessageParser,
        queue: QueueFront | None = None,
        *,
        log_delivered: bool = True,
    ) -> None:
        self._provider = provider
        self._reactor = reactor
        self._parser = parser
        self._queue = queue
        self._log_delivered = log_delivered
        # The submissions in flight, for the stop (smtpproxy.web.api.drain).
        self.flights = Flights(reactor)

    @property
    def queued(self) -> bool:
        return self._queue is not None

    def submit(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        fields: dict[str, Any],
        *,
        mailbox: str = "",
        parsed: Email | None = None,
        ended: defer.Deferred[None] | None = None,
    ) -> defer.Deferred[Accepted]:
        """Queue or deliver C{data}; fails with an L{ApiError} for the client.

        @param fields: what the outcome's log line carries besides the
            envelope (C{request_id}, C{key_id}, C{client}); never the body.
        @param mailbox: the key's sending mailbox (as an identity's policy
            C{mailbox}); empty for the provider's own choice.
        @param parsed: what the shared parser would make of C{data}, when the
            caller knows it already (it built C{data}); delivered without
            parsing.  The queue stores only the bytes and ignores it.
        @param ended: the request's C{notifyFinish()}; its errback (the
            client disconnected before its answer) cancels a direct-mode
            send the provider has not handed over yet (L{_client_left}).
        """
        started = self._reactor.seconds()
        flight = self.flights.start()  # 503 once the relay is stopping
        queue = self._queue
        message_id = new_message_id() if queue is None else queue.new_id()
        fields = {
            "id": message_id,
            **fields,
            "front_door": "http",
            "sender": clip(sender),
            "recipients": clip_list(recipients),
            "recipient_count": len(recipients),
            "size": len(data),
            "provider": self._provider.name,
        }
        if queue is not None:
            flight.withdraw = lambda: queue.withdraw(message_id)
            done = self._enqueue(queue, message_id, sender, recipients, data, fields, mailbox)
        else:
            done = self._deliver(
                message_id, sender, recipients, data, fields, started, mailbox, parsed, flight
            )
            if ended is not None:
                ended.addErrback(self._client_left, flight, fields)

        def landed(result: Accepted | Failure) -> Accepted | Failure:
            # One callback for both outcomes: each one more costs every request.
            self.flights.end(flight)
            if isinstance(result, Failure):
                return self._refusal(result)
            return result

        return done.addBoth(landed)

    def _enqueue(
        self,
        queue: QueueFront,
        message_id: str,
        sender: str,
        recipients: list[str],
        data: bytes,
        fields: dict[str, Any],
        mailbox: str,
    ) -> defer.Deferred[Accepted]:
        envelope = Envelope(
            sender,
            tuple(recipients),
            fields.get("client", ""),
            fields.get("key_id"),
            queue.route_for(mailbox),
            meta_json(None, mailbox),
        )
        fields["route"] = envelope.route

        def queued(_: None) -> Accepted:
            log.info("message queued", **fields)
            return Accepted(message_id, "queued")

        def failed(failure: Failure) -> Failure:
            if isinstance(failure.value, QueueFullError):
                log.warn("message not queued: the queue is full", **fields)
            elif isinstance(failure.value, EnqueueWithdrawnError):
                log.info("message withdrawn at shutdown, not queued", **fields)
            elif isinstance(failure.value, QueueBusyError):
                log.warn(
                    "message not queued: another process holds the queue's write lock",
                    error=str(failure.value),
                    **fields,
                )
            elif isinstance(failure.value, QueueReadOnlyError):
                log.error(
                    "message not queued: the queue's storage is read-only",
                    error=str(failure.value),
                    **fields,
                )
            else:
                log.failure("message could not be queued", failure, **fields)
            return failure

        try:
            stored = queue.enqueue(message_id, envelope, _Bytes(data))
        except Exception:
            stored = defer.fail()
        return stored.addCallbacks(queued, failed)

    def _deliver(
        self,
        message_id: str,
        sender: str,
        recipients: list[str],
        data: bytes,
        fields: dict[str, Any],
        started: float,
        mailbox: str,
        known: Email | None,
        flight: Flight,
    ) -> defer.Deferred[Accepted]:
        def send(email: Email) -> defer.Deferred[Accepted]:
            if flight.given_up or flight.gone:
                # The stop gave up on it, or its client left, while it was
                # being parsed: never sent.
                never = SendCancelledError(handed_over=False)
                log_cancelled(fields, never, flight.heard)
                return defer.fail(never)
            if mailbox:
                email = dataclasses.replace(email, mailbox=mailbox)
            sending, flight.handover = watched(
                lambda: send_email(
                    self._provider,
                    self._reactor,
                    email,
                    fields,
                    started,
                    log_delivered=self._log_delivered,
                )
            )
            flight.sending = sending
            flight.unanswered = lambda: log_cancelled(
                fields, SendCancelledError(handed_over=True), "nothing"
            )

            def after(result: PartlyRefused | Failure | None) -> Accepted | Failure:
                flight.sending = None
                if flight.cancelled:
                    log_cancelled(fields, result, flight.heard)
                if isinstance(result, Failure):
                    return result
                if result is not None:
                    # The provider took it for some recipients only; without a
                    # queue nothing retries the others (as on the SMTP side).
                    log_not_retried(message_id, fields, result)
                    return Accepted(message_id, "delivered", result.refused)
                return Accepted(message_id, "delivered")

            return sending.addBoth(after)

        if known is not None:
            return send(known)
        try:
            parsed = self._parser.parse(sender, recipients, data)
        except Exception:
            # The parser promises never to raise; if it does, it is our bug.
            log.failure("message could not be parsed", **fields)
            return defer.fail()
        if isinstance(parsed, defer.Deferred):
            return parsed.addCallback(send)
        return send(parsed)

    @staticmethod
    def _client_left(reason: Failure, flight: Flight, fields: dict[str, Any]) -> None:
        """Direct mode: the HTTP client disconnected before its answer, and will retry.

        As on the SMTP side (L{smtpproxy.smtp.closing.cancel_for_gone_client}):
        a send not yet handed over is cancelled, so that the retry is the
        only copy (L{log_cancelled} says so once, with C{heard} C{"gone"});
        one the provider already handed over cannot be taken back, so it
        is left to finish (its C{message delivered} line follows) and a
        warning names it, since the retry may be a duplicate.
        """
        sending = flight.sending
        if sending is not None and not sending.called and flight.handed_over:
            log.warn(
                "client disconnected after the provider had the message: "
                "it may be delivered, and the client will send it again",
                id=fields["id"],
                request_id=fields.get("request_id"),
                front_door=fields["front_door"],
            )
        flight.client_gone()

    @staticmethod
    def _refusal(failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, ApiError) or error is None:
            return failure
        raise error_for_failure(error) from None
