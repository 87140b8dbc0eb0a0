"""From SMTP transaction to provider: the cred realm, delivery and message.

The protocol logs in (anonymously, or with SMTP AUTH) and gets a
L{RelayDelivery} avatar, Twisted's C{IMessageDelivery}.  Every recipient of a
transaction maps to the same L{RelayMessage}, so one message with fifty
recipients is one provider call, not fifty (stock Twisted builds one
C{IMessage} per recipient).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import Address, User
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from smtpproxy.dsn import Dsn, RecipientDsn, envelope_dsn
from smtpproxy.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    reply_for_failure,
)
from smtpproxy.logsafe import MAX_REASON, MAX_WARNING_LINES, clip, clip_list
from smtpproxy.mime.message import Email, Mailbox, parse_message
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.policy.fromsender import FromRule, head_of
from smtpproxy.providers import Provider, accepts_raw_mime, envelope_refusal
from smtpproxy.providers.result import Handover, PartlyRefused, SendCancelledError, watched
from smtpproxy.queue.front import QueueFront, meta_json
from smtpproxy.queue.model import (
    EnqueueWithdrawnError,
    Envelope,
    QueueBusyError,
    QueueFullError,
    QueueReadOnlyError,
)
from smtpproxy.smtp.commands import MailArguments, RcptArguments
from smtpproxy.spool import MessageBody

log = Logger(namespace="smtpproxy.delivery")
#: What the client of a send cancelled by its session heard (L{RelayMessage.cancel}).
Heard = Literal["not accepted", "nothing", "gone"]
# Message ids need to be distinct, not unguessable (see new_message_id).
_random_bits = random.Random().getrandbits  # noqa: S311


def new_message_id() -> str:
    """A short random id that ties the SMTP reply to the log line.

    It only has to be unique enough to find a message in the logs, not
    unguessable, so it comes from C{random} rather than the system's
    entropy source (one system call per message saved).
    """
    return f"{_random_bits(48):012x}"


@implementer(IMessageSMTP)
class RelayMessage:
    """One transaction's message: collects the body, then hands it to the provider.

    The protocol hands over the whole body at once (L{bodyReceived}), in
    memory or spooled to disk, and keeps ownership of it: it closes the body
    once delivery has finished.  C{lineReceived} is never called by
    smtpproxy's protocol; it is here because C{IMessageSMTP} requires it, and
    it works (into a body of this message's own) for any caller that feeds
    the message line by line as stock Twisted SMTP does.
    """

    def __init__(
        self,
        provider: Provider,
        reactor: IReactorTime,
        sender: str,
        recipients: list[str],
        client: str,
        user: str | None,
        log_delivered: bool = True,
        parser: MessageParser | None = None,
        dsn: Dsn | None = None,
        queue: QueueFront | None = None,
        mailbox: str = "",
        from_rule: FromRule | None = None,
    ) -> None:
        # A queued message's id must stay unique in a shared queue for
        # days (96 bits); a direct one only has to find its log lines.
        self.id = new_message_id() if queue is None else queue.new_id()
        self._queue = queue
        self._parser = parser or MessageParser(reactor)
        self._dsn = dsn
        self._log_delivered = log_delivered
        self._provider = provider
        self._reactor = reactor
        self._sender = sender
        self._recipients = recipients
        self._client = client
        self._user = user
        self._body: MessageBody | None = None
        self._abandoned = False
        # Direct mode: the provider's send while it is under way, and
        # whether the session cancelled it (forced shutdown, see cancel).
        self._sending: defer.Deferred[PartlyRefused | None] | None = None
        self._handover: Handover | None = None
        self._cancelled = False
        # What the client of a cancelled send heard (see cancel).
        self._heard: Heard = "not accepted"
        # The identity's sending mailbox (its policy's), empty for the provider's choice.
        self._mailbox = mailbox
        # The identity's allowed_senders, applied to the mailbox From would choose.
        self._from_rule = from_rule

    @property
    def queued(self) -> bool:
        """Queue mode: the body is stored as it is, never read back into memory here.

        The protocol then skips its memory claim for the body and answers
        C{queued as} rather than C{delivered as}.
        """
        return self._queue is not None

    def bodyReceived(self, body: MessageBody) -> None:
        """The complete body, read back by L{eomReceived}."""
        self._body = body

    def lineReceived(self, line: bytes) -> None:
        if self._body is None:
            self._body = MessageBody()
        self._body.write(line + b"\r\n")

    def connectionLost(self) -> None:
        """The transaction was abandoned: forget the body (its owner closes it)."""
        self._body = None

    def abandon(self) -> None:
        """The session ended (or was told "not accepted") before delivery started.

        A body still waiting for its turn to be read back and parsed must
        not reach the provider afterwards: its client was told nothing was
        accepted and will send it again.  Once the provider has it, this
        changes nothing (that is the queue's business, issue 12).
        """
        self._abandoned = True

    @property
    def handed_over(self) -> bool:
        """Direct mode: has the provider handed the message to its backend yet?

        From then on cancelling cannot take it back, so at a forced stop
        the session waits for the provider's answer instead (L{withdraw}).
        """
        return self._handover is not None and self._handover.handed_over

    def cancel(self, heard: Heard = "not accepted") -> None:
        """Forced shutdown in direct mode: the client hears 421, so stop the provider's send.

        A message delivered after its client was told "not accepted" is
        delivered twice once the client sends it again.  Cancelling stops
        what has not happened yet (waiting for a token, a slot, a retry;
        the upstream not yet given the end of DATA); a provider that had
        already handed the message over cannot take it back, and the
        outcome is then logged as unknown (L{_settled_after_cancel}).

        @param heard: what the client was told, for the log line:
            C{"not accepted"} (421); C{"nothing"}, the session closing
            without a reply (the provider had the message and did not
            answer within the grace); C{"gone"}, the client disconnected
            before its answer (it will retry, so a send not yet handed
            over is cancelled then too).
        """
        self._abandoned = True
        sending = self._sending
        if sending is None or sending.called:
            return
        self._cancelled = True
        self._heard = heard
        sending.cancel()

    def withdraw(self) -> bool:
        """Forced shutdown: stop queuing this message if the store still can.

        True: it will never be stored (the session says "not accepted");
        False: direct mode, or the queue is committing it and the answer
        to C{eomReceived} will tell.  (Direct mode's counterpart of a
        commit under way is L{handed_over}.)
        """
        return self._queue is not None and self._queue.withdraw(self.id)

    def eomReceived(self) -> defer.Deferred[str]:
        """Parse and deliver (or queue); fire with the message id once accepted (or durable).

        After a partial delivery the id is followed by who did not get it
        (the 250 reply reads C{delivered as <id> to 2 of 3 recipients; ...}).
        """
        started = self._reactor.seconds()
        body, self._body = self._body, None
        size = 0 if body is None else body.size
        fields: dict[str, Any] = {
            "id": self.id,
            "client": self._client,
            "user": self._user,
            "sender": clip(self._sender),
            # Client-chosen values, bounded so that the line is too.
            "recipients": clip_list(self._recipients),
            "recipient_count": len(self._recipients),
            "size": size,
            "provider": self._provider.name,
        }
        if self._queue is not None:
            return self._enqueue(self._queue, body, fields)
        try:
            parsed = self._parser.parse_body(
                self._sender, self._recipients, size, self._reader(body)
            )
        except Exception:
            # The parser promises never to raise; if it does, that is our
            # bug, and the client should retry rather than lose the message.
            log.failure("message could not be parsed", **fields)
            failed_parse: defer.Deferred[str] = defer.fail()
            return failed_parse
        if isinstance(parsed, defer.Deferred):
            # A long parse goes on in slices while other sessions are served.
            return parsed.addCallback(self._deliver, fields, started)
        return self._deliver(parsed, fields, started)

    def _reader(self, body: MessageBody | None) -> Callable[[], bytes]:
        """What reads the body back when its turn comes: nothing, if abandoned by then."""
        if body is None:
            return _empty

        def read() -> bytes:
            return b"" if self._abandoned else body.read()

        return read

    def _deliver(self, email: Email, fields: dict[str, Any], started: float) -> defer.Deferred[str]:
        """Hand the parsed C{email} to the provider; fire with the message id."""
        if self._abandoned:
            log.info("message abandoned before delivery", **fields)
            gone: defer.Deferred[str] = defer.fail(
                TransientDeliveryError("the session ended before the message was delivered")
            )
            return gone
        refused = self._from_refusal(email.from_, fields)
        if refused is not None:
            return refused
        if self._dsn is not None or self._mailbox:
            email = dataclasses.replace(email, dsn=self._dsn, mailbox=self._mailbox)
        sending, self._handover = watched(
            lambda: send_email(
                self._provider,
                self._reactor,
                email,
                fields,
                started,
                log_delivered=self._log_delivered,
            )
        )
        self._sending = sending
        return sending.addCallbacks(
            self._delivered,
            self._settled_after_cancel,
            callbackArgs=(fields,),
            errbackArgs=(fields,),
        )

    def _from_refusal(
        self, from_: Sequence[Mailbox], fields: dict[str, Any]
    ) -> defer.Deferred[str] | None:
        """A failed answer when From names a mailbox this login may not send as, else None."""
        if self._from_rule is None:
            return None
        refusal = self._from_rule.refusal(from_)
        if refusal is None:
            return None
        log.warn(
            "message not delivered",
            outcome="rejected",
            reply=f"{refusal.code} {refusal.status}",
            reason=clip(refusal.reason, MAX_REASON),
            duration_ms=0.0,
            **fields,
        )
        failed: defer.Deferred[str] = defer.fail(refusal)
        return failed

    def _delivered(self, result: PartlyRefused | None, fields: dict[str, Any]) -> str:
        """Direct mode: the client hears 250; recipients refused meanwhile are named.

        The client's RCPTs were all answered 250 before the upstream was
        asked, and the one reply after DATA cannot differ by recipient.
        The SMTP provider holds a message back while any recipient is
        deferred (4xx), so what reaches here is refused for good (5xx):
        the others have the message, and a 5xx now would make the client
        bounce it for them too.  Without a queue nothing sends a bounce
        for the refused ones, so the 250's text names them after the id
        (L{PartlyRefused.summary}) and an error line does too
        (docs/upstream-smtp.md).
        """
        self._sending = None
        if self._cancelled:
            # The provider did not stop: the message went out although its
            # client heard 421 (and may send it again).
            log_cancelled(fields, result, self._heard)
        if result is not None:
            log_not_retried(self.id, fields, result)
            return f"{self.id} {result.summary}"
        return self.id

    def _settled_after_cancel(self, failure: Failure, fields: dict[str, Any]) -> Failure:
        """A failed send: if the session cancelled it, log what became of the message (once)."""
        self._sending = None
        if self._cancelled:
            log_cancelled(fields, failure, self._heard)
        return failure

    def _enqueue(
        self, queue: QueueFront, body: MessageBody | None, fields: dict[str, Any]
    ) -> defer.Deferred[str]:
        """Queue mode: store envelope and body; fire with the id once they are durable."""
        if self._from_rule is not None:
            # Refused now, at the end of DATA, not bounced later: read only
            # the header block (the provider's parse reads no more of it).
            try:
                head = head_of(body.chunks()) if body is not None else b""
            except OSError:
                head = b""  # storing it fails too, and says so
            parsed = parse_message(self._sender, self._recipients, head)
            refused = self._from_refusal(parsed.from_, fields)
            if refused is not None:
                return refused
        envelope = Envelope(
            self._sender,
            tuple(self._recipients),
            self._client,
            self._user,
            queue.route_for(self._mailbox),
            meta_json(self._dsn, self._mailbox),
        )
        stored = queue.enqueue(self.id, envelope, body if body is not None else MessageBody())
        fields["route"] = envelope.route

        def queued(_: None) -> str:
            log.info("message queued", **fields)
            return self.id

        def failed(failure: Failure) -> Failure:
            if failure.check(QueueFullError):
                log.warn("message not queued: the queue is full", reply="452 4.3.1", **fields)
            elif failure.check(EnqueueWithdrawnError):
                log.info("message withdrawn at shutdown, not queued", reply="421 4.3.2", **fields)
            elif failure.check(QueueBusyError):
                log.warn(
                    "message not queued: another process holds the queue's write lock",
                    reply="451 4.3.0",
                    error=str(failure.value),
                    **fields,
                )
            elif failure.check(QueueReadOnlyError):
                log.error(
                    "message not queued: the queue's storage is read-only",
                    reply="451 4.3.0",
                    error=str(failure.value),
                    **fields,
                )
            else:
                log.failure("message could not be queued", failure, reply="451 4.3.0", **fields)
            return failure

        return stored.addCallbacks(queued, failed)


def log_not_retried(id: str, fields: dict[str, Any], result: PartlyRefused) -> None:
    """Direct mode (SMTP or HTTP): recipients the provider refused, whom nothing will retry.

    Without a queue this line is the refused recipients' only trace
    (docs/upstream-smtp.md), so it is an error.
    """
    log.error(
        "recipients refused and not retried (no queue)",
        id=id,
        message_id=fields.get("message_id"),
        accepted=len(result.accepted),
        refused=clip_list([f"<{r.address}> {r.reply}" for r in result.refused]),
        temporary=len(result.temporary),
    )


def log_cancelled(fields: dict[str, Any], result: object, heard: Heard = "not accepted") -> None:
    """One line per message whose delivery was cancelled at a forced shutdown.

    Its client was told it was not accepted (SMTP 421, HTTP 503) and will
    send it again; or, with C{heard} C{"nothing"}, the provider had the
    message and did not answer within the grace, and the client got no
    reply at all (it will send it again too); or, with C{heard} C{"gone"},
    the client disconnected first (not at a shutdown).
    C{result} is what the cancelled send fired with: a
    L{SendCancelledError} saying nothing was handed over, or the provider's
    own refusal (a Failure or the error itself), is "not delivered", the expected case; a success is
    "delivered" and anything else "unknown" (the provider had handed it
    over): the retry may then be a duplicate, so those are warnings naming
    the message (ids, never its body).

    C{ended_by} says whether the cancellation ended the send (C{"cancel"})
    or the provider finished on its own (C{"provider"}: delivered, or
    refused, which the C{message delivered} or C{message not delivered}
    line already counted); C{/metrics} counts the first kind
    (L{smtpproxy.web.metrics}).
    """
    error = result.value if isinstance(result, Failure) else result
    if not isinstance(error, BaseException):
        outcome = "delivered"
    elif isinstance(error, SendCancelledError) and not error.handed_over:
        outcome = "not delivered"
    elif isinstance(error, DeliveryError):
        outcome = "not delivered"  # the provider finished with its own refusal
    else:
        outcome = "unknown"
    line = {
        "id": fields.get("id"),
        "message_id": fields.get("message_id"),
        "provider": fields.get("provider"),
        "outcome": outcome,
        "ended_by": "cancel" if isinstance(error, defer.CancelledError) else "provider",
    }
    if "front_door" in fields:
        line["front_door"] = fields["front_door"]
    if outcome == "not delivered" and heard == "gone":
        log.info(
            "delivery cancelled, the client disconnected before its answer: message not delivered",
            **line,
        )
    elif outcome == "not delivered":
        log.info("delivery cancelled at shutdown, message not delivered", **line)
    elif outcome == "delivered":
        log.warn(
            "message delivered at shutdown although the client was told it was not accepted",
            **line,
        )
    elif heard != "not accepted":
        log.warn(
            "delivery cancelled at shutdown after the provider had the message: "
            "it may be delivered, and the client got no reply",
            **line,
        )
    else:
        log.warn(
            "delivery cancelled at shutdown after the provider had the message: "
            "it may be delivered although the client was told it was not accepted",
            **line,
        )


def send_email(
    provider: Provider,
    reactor: IReactorTime,
    email: Email,
    fields: dict[str, Any],
    started: float,
    *,
    log_delivered: bool = True,
    log_failure: bool = True,
) -> defer.Deferred[PartlyRefused | None]:
    """Hand a parsed C{email} to C{provider} and log the outcome: the one delivery pipeline.

    Direct mode calls it while the client waits, the queue's worker for
    each attempt; both get the same handling of an abandoned parse, the
    same parser warnings and the same C{message delivered} line (C{fields}
    carry what the caller adds, such as the queue time).  With
    C{log_failure} false the caller logs a failure in its own words (the
    worker's line says what happens next); a provider's unexpected
    exception is still logged here with its traceback.

    @param started: when the delivery began, for C{duration_ms}.
    @return: fires with what the provider's C{send} fired with: None, or
        the recipients it refused while taking the others.
    """
    if email.abandoned:
        raw_ok = accepts_raw_mime(provider)
        log.warn(
            "message parse abandoned",
            outcome="sent raw" if raw_ok else "rejected",
            reply=None if raw_ok else "554 5.6.0",
            **fields,
        )
        if not raw_ok:
            refused: defer.Deferred[PartlyRefused | None] = defer.fail(
                PermanentDeliveryError(
                    "message too complex to parse in time, and this relay's "
                    "provider cannot send it unparsed",
                    "5.6.0",
                )
            )
            return refused
    fields["message_id"] = None if email.message_id is None else clip(email.message_id)
    if email.warnings or email.warnings_omitted:
        _log_warnings(fields["id"], fields["message_id"], email.warnings, email.warnings_omitted)

    def delivered(result: PartlyRefused | None) -> PartlyRefused | None:
        if log_delivered:
            log.info(
                "message delivered",
                outcome="delivered" if result is None else "partly delivered",
                duration_ms=round((reactor.seconds() - started) * 1000, 1),
                **fields,
            )
        return result

    def failed(failure: Failure) -> Failure:
        assert failure.value is not None
        if failure.check(defer.CancelledError):
            # Cancelled by the caller (a forced shutdown): the caller logs it.
            return failure
        reply = reply_for_failure(failure.value)
        outcome = "deferred" if reply.code < 500 else "rejected"
        duration = round((reactor.seconds() - started) * 1000, 1)
        if reply.code == 451 and reply.status == "4.3.0" and not _known(failure):
            log.failure(
                "provider failed unexpectedly",
                failure,
                outcome=outcome,
                duration_ms=duration,
                **fields,
            )
        elif log_failure:
            log.warn(
                "message not delivered",
                outcome=outcome,
                reply=f"{reply.code} {reply.status}",
                reason=clip(str(failure.value), MAX_REASON),
                duration_ms=duration,
                **fields,
            )
        return failure

    # Providers return Deferreds; calling straight through (rather than
    # via maybeDeferred) saves a Deferred per message on the hot path,
    # and the except clause still turns a provider that raises into a
    # failed delivery rather than an exception in the session.
    sending: defer.Deferred[None] | defer.Deferred[PartlyRefused | None]
    try:
        sending = provider.send(email)
    except Exception:
        sending = defer.fail()
    if not isinstance(sending, defer.Deferred):
        # A provider breaking the contract by answering at once still
        # delivered; treat a plain value as success, never as our error.
        sending = defer.succeed(None)
    return sending.addCallbacks(delivered, failed)


def _log_warnings(
    message: str, message_id: str | None, warnings: Sequence[str], omitted: int
) -> None:
    """Log the parser's warnings: the first few, then how many more there were.

    A crafted message can have tens of thousands of defects; one line each,
    let alone each carrying the envelope, let one message write a gigabyte
    of log.  These lines carry the message's id and the warning only: the
    per-message outcome line has the envelope.
    """
    for warning in warnings[:MAX_WARNING_LINES]:
        log.warn(
            "message part kept as is",
            id=message,
            message_id=message_id,
            detail=clip(warning),
        )
    more = len(warnings) + omitted - MAX_WARNING_LINES
    if more > 0:
        log.warn("more message parts kept as is", id=message, message_id=message_id, count=more)


def _known(failure: Failure) -> bool:
    return failure.check(DeliveryError) is not None


@implementer(IMessageDelivery)
class RelayDelivery:
    """The avatar a session gets after logging in: builds one message per transaction."""

    def __init__(
        self,
        provider: Provider,
        reactor: IReactorTime,
        user: str | None,
        log_delivered: bool = True,
        parser: MessageParser | None = None,
        queue: QueueFront | None = None,
    ) -> None:
        self._provider = provider
        self._reactor = reactor
        self._queue = queue
        self.user = user
        # Set by the identity realm when the login's policy names a mailbox:
        # every message of this session is sent as it.
        self.mailbox = ""
        # Set by the identity realm for a login with allowed_senders and no
        # mailbox, with Graph: From must not choose a mailbox outside them.
        self.from_rule: FromRule | None = None
        self._log_delivered = log_delivered
        self._parser = parser
        self._sender = ""
        self._recipients: list[str] = []
        self._message: RelayMessage | None = None
        self._client = ""
        # DSN parameters (RFC 3461), when the protocol passed them along
        # on the addresses (smtpproxy.smtp.ParsedAddress.parameters).
        self._mail: MailArguments | None = None
        self._rcpt_dsn: list[RecipientDsn] = []
        # The provider's own say at MAIL and RCPT (the mailbox's chaos), if any.
        self._refusal = envelope_refusal(provider)

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: Address, recipients: list[User]
    ) -> None:
        # We relay into APIs that build their own trace headers; adding ours
        # would leak internal addresses and alter the message we promise to
        # keep byte-for-byte.
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        if self._refusal is not None:
            _refuse(self._refusal("sender"))
        # Not str(): Twisted's Address decodes as ASCII, and an SMTPUTF8
        # transaction's addresses are UTF-8 (validated before they got here).
        self._sender = bytes(origin).decode("utf-8")
        self._recipients = []
        self._message = None
        self._client = helo[1].decode("ascii", "replace") if helo[1] else ""
        parameters = getattr(origin, "parameters", None)
        self._mail = parameters if isinstance(parameters, MailArguments) else None
        self._rcpt_dsn = []
        return origin

    def validateTo(self, user: User) -> Callable[[], RelayMessage]:
        if self._refusal is not None:
            _refuse(self._refusal("recipient"))
        self._recipients.append(bytes(user.dest).decode("utf-8"))
        parameters = getattr(user.dest, "parameters", None)
        if isinstance(parameters, RcptArguments) and (parameters.notify or parameters.orcpt):
            self._rcpt_dsn.append(
                RecipientDsn(parameters.recipient, parameters.notify, parameters.orcpt)
            )
        return self._message_for_transaction

    def _message_for_transaction(self) -> RelayMessage:
        if self._message is None:
            self._message = RelayMessage(
                self._provider,
                self._reactor,
                self._sender,
                list(self._recipients),
                self._client,
                self.user,
                self._log_delivered,
                self._parser,
                self._dsn(),
                self._queue,
                self.mailbox,
                self.from_rule,
            )
        return self._message

    def _dsn(self) -> Dsn | None:
        mail = self._mail
        if mail is None:
            return envelope_dsn(None, None, self._rcpt_dsn)
        return envelope_dsn(mail.ret, mail.envid, self._rcpt_dsn)


def _refuse(refusal: DeliveryError | None) -> None:
    """Raise the provider's refusal: the protocol answers it as L{reply_for_failure} says."""
    if refusal is not None:
        raise refusal


@implementer(IRealm)
class RelayRealm:
    """Hands every logged-in (or anonymous) session a L{RelayDelivery}."""

    def __init__(
        self,
        provider: Provider,
        reactor: IReactorTime,
        log_delivered: bool = True,
        parser: MessageParser | None = None,
        queue: QueueFront | None = None,
    ) -> None:
        self._provider = provider
        self._reactor = reactor
        # Queue mode (QUEUE_URL set): messages are stored, not sent, here.
        self._queue = queue
        # One parser (and so one cooperator) for every session: parses in
        # progress share the reactor's turns fairly.
        self._parser = parser or MessageParser(reactor)
        # At log levels above info, building the "message delivered" event
        # only for the filter to drop it is measurable per message.
        self._log_delivered = log_delivered

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: object
    ) -> tuple[type[Interface], RelayDelivery, Callable[[], None]]:
        # Identity, not ==: comparing zope interfaces for equality is slow.
        if not any(interface is IMessageDelivery for interface in interfaces):
            raise NotImplementedError("smtpproxy only offers IMessageDelivery")
        user: str | None = None
        if isinstance(avatarId, bytes) and avatarId:
            user = avatarId.decode("utf-8", "replace")
        delivery = RelayDelivery(
            self._provider, self._reactor, user, self._log_delivered, self._parser, self._queue
        )
        return IMessageDelivery, delivery, _no_logout


def _no_logout() -> None:
    """Nothing to release when a session ends."""


def _empty() -> bytes:
    """The body of a message that never got one."""
    return b""
