"""One connection to the upstream: Twisted's ESMTP client, with its defects closed.

L{RelayClient} keeps Twisted's C{ESMTPClient} for the greeting, EHLO,
STARTTLS and the SASL exchange, and replaces what does not fit a relay
(each replacement names the defect it closes; tests/providers/smtp has a
regression test for each):

  - Twisted keeps a log of every line it sends (C{debug = True}), AUTH
    lines included, and its errors print that log: the password (base64)
    would reach our logs.  Off here.
  - Replies are read strictly and within bounds (L{wire.ReplyReader}).
  - EHLO keywords are compared without case (L{wire.parse_capabilities}).
  - A failed C{startTLS} stops the session; Twisted logs the error and
    sends EHLO anyway.
  - AUTH PLAIN is tried once: Twisted answers a refused C{AUTH PLAIN} with
    a second login attempt, which doubles every failure against the
    upstream's brute-force limits and reports the second reply.
  - With credentials configured, an upstream that offers no usable AUTH
    fails the session instead of getting mail unauthenticated.
  - After login the client does not pull messages (C{getMailFrom}) and
    QUIT when there are none: it waits, and L{RelayClient.deliver} runs one
    transaction at a time on the same connection, RSET between, commands
    pipelined when the upstream offers PIPELINING, with the ESMTP
    parameters (SIZE, BODY, SMTPUTF8, DSN) and the body encoded by
    L{wire.plan}, not by C{quoteaddr} and C{transformChunk}.
  - A timeout aborts the connection (a TLS C{loseConnection} waits for a
    peer that stopped answering) and says what was being waited for.
"""

from __future__ import annotations

import base64
import io
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.mail.smtp import (
    AUTHDeclinedError,
    AUTHRequiredError,
    EHLORequiredError,
    ESMTPClient,
    LOGINAuthenticator,
    SMTPConnectError,
    SMTPTimeoutError,
    TLSError,
    TLSRequiredError,
)
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from smtpproxy.errors import DeliveryError, TransientDeliveryError
from smtpproxy.providers.result import Handover, SendCancelledError
from smtpproxy.providers.smtp import wire
from smtpproxy.providers.smtp.trust import tls_problem

log = Logger(namespace="smtpproxy.smtp")


class _Transport(Protocol):
    """What this client uses of its transport: TCP, or TLS over TCP."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def startTLS(self, context: object) -> None: ...


class StaleConnectionError(TransientDeliveryError):
    """A reused connection died before the upstream answered anything: try a fresh one."""


class RelayClient(ESMTPClient):
    """A session with the upstream that stays open for many messages.

    @ivar ready: fires with this client once it may deliver (after EHLO,
        STARTTLS and AUTH), or fails with the L{DeliveryError} that ended
        the session before that.
    @ivar capabilities: what the upstream's last EHLO offered.
    @ivar usable: False once the connection is gone or in an unknown state.
    """

    debug = False
    heloFallback = False

    def __init__(
        self,
        identity: str,
        username: str,
        password: str,
        context: IOpenSSLClientConnectionCreator | None,
        require_tls: bool,
        timeout: float,
        implicit_tls: bool = False,
    ) -> None:
        super().__init__(password.encode("utf-8") or None, context, identity)
        self._reply_timeout = timeout
        self.requireTransportSecurity = require_tls
        self.requireAuthentication = bool(username)
        # Plain HELO only where nothing that needs ESMTP was asked for.
        self.heloFallback = not require_tls and not username
        self._implicit_tls = implicit_tls
        self._used_before = False
        self._unsent: deque[bytes] = deque()
        self._username = username.encode("utf-8")
        self.ready: Deferred[RelayClient] = Deferred(self._cancel_setup)
        self.capabilities = wire.Capabilities()
        self.usable = False
        self.on_lost: Callable[[RelayClient], None] = lambda client: None
        self._reader = wire.ReplyReader()
        self._last = wire.Reply(0)
        self._used = False
        # The transaction in progress: one handler per reply still due.
        self._handlers: deque[Callable[[wire.Reply], None]] = deque()
        self._result: Deferred[wire.Delivered] | None = None
        self._replies_seen = 0
        self._sending: FileSender | None = None
        # The whole body, end of DATA included, has been written: from then
        # on a cancelled transaction may have been delivered all the same.
        self._handed_over = False
        # The caller's view of that moment (L{Handover}), for the transaction in progress.
        self._handover: Handover | None = None
        # Direct mode, a recipient deferred while DATA was already on its
        # way (pipelining): the body must not follow (wire.held_back).
        self._held: DeliveryError | None = None
        self._waiting_for = "the greeting"
        self._closing = False
        self._gone: list[Deferred[None]] = []
        self._lost = False

    @property
    def _wire(self) -> _Transport:
        return cast(_Transport, self.transport)

    # --- reading replies -------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            reply = self._reader.feed(line)
        except wire.ReplyError as e:
            self._broken(f"the upstream broke the protocol: {e}")
            return
        if reply is None:
            return
        self._last = reply
        if self._handlers:
            self._replies_seen += 1
            self._handlers.popleft()(reply)
            return
        joined = b"\n".join(reply.lines)
        if reply.code in self._expected:
            self._okresponse(reply.code, joined)
        else:
            self._failresponse(reply.code, joined)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._broken("the upstream sent a line longer than 16 KB")

    # --- setting up: EHLO, STARTTLS, AUTH --------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self._reply_timeout)
        self._tlsMode = self._tlsMode or self._implicit_tls
        self._waiting_for = "the greeting"

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        super().esmtpState_ehlo(code, resp)
        self._waiting_for = "the reply to EHLO"

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self.capabilities = wire.parse_capabilities(self._last.lines)
        items: dict[bytes, bytes | None] = {
            k.encode("ascii"): None for k in self.capabilities.keywords
        }
        self.tryTLS(code, resp, items)

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        if not self._tlsMode and self.requireTransportSecurity and b"STARTTLS" in items:
            self._waiting_for = "the reply to STARTTLS"
        super().tryTLS(code, resp, items)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        try:
            self._wire.startTLS(self.context)
        except Exception as e:  # any failure here ends the session
            self._setup_failed(
                TransientDeliveryError(f"could not start TLS: {type(e).__name__}", "4.7.0")
            )
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        if not self._username:
            self.smtpState_from(code, resp)
            return
        offered = self.capabilities.auth
        self._waiting_for = "the reply to AUTH"
        if "PLAIN" in offered:
            self._expected = [235]
            self._okresponse = self.smtpState_from
            self._failresponse = self.esmtpAUTHDeclined
            token = base64.b64encode(b"\0" + self._username + b"\0" + (self.secret or b""))
            self.sendLine(b"AUTH PLAIN " + token)
        elif "LOGIN" in offered:
            self._authinfo = LOGINAuthenticator(self._username)
            self._expected = [334]
            self._okresponse = self.esmtpState_challenge
            self._failresponse = self.esmtpAUTHDeclined
            self.sendLine(b"AUTH LOGIN")
        else:
            self.esmtpAUTHRequired()

    def smtpState_from(self, code: int, resp: bytes) -> None:
        # Twisted would ask getMailFrom() for a message now, and QUIT when
        # there is none; here the session is ready and waits.
        self._idle()
        self.usable = True
        if not self.ready.called:
            self.ready.callback(self)

    def _cancel_setup(self, ready: Deferred[RelayClient]) -> None:
        """The send waiting for this session gave up (a forced stop): close it now.

        Nobody else would: the session is not the pool's until it is
        ready, and it would otherwise go on through the greeting and EHLO
        and then sit idle, its timeout off, until the upstream drops it.
        """
        self.usable = False
        self._closing = True
        self._close_now()

    def sendError(self, exc: Exception) -> None:
        self._setup_failed(self._setup_error(exc))

    def _setup_error(self, exc: Exception) -> DeliveryError:
        reply = self._last
        if isinstance(exc, SMTPTimeoutError):
            return TransientDeliveryError(
                f"the upstream did not send {self._waiting_for} in time", "4.4.2"
            )
        if isinstance(exc, TLSRequiredError):
            return TransientDeliveryError(
                "the upstream does not offer STARTTLS, which RELAY_TLS=starttls requires", "4.7.0"
            )
        if isinstance(exc, AUTHRequiredError):
            offered = " ".join(self.capabilities.auth) or "none"
            return TransientDeliveryError(
                f"the upstream offers no AUTH mechanism we use (PLAIN, LOGIN); it offers {offered}",
                "4.7.0",
            )
        if isinstance(exc, EHLORequiredError):
            return TransientDeliveryError("the upstream refused EHLO: " + reply.text, "4.7.0")
        stage = "failed"
        if isinstance(exc, SMTPConnectError):
            stage = "refused the session"
        elif isinstance(exc, TLSError):
            stage = "refused STARTTLS"
        elif isinstance(exc, AUTHDeclinedError):
            stage = "refused our login"
        error = (
            wire.failure(reply, stage)
            if reply.code
            else TransientDeliveryError(f"upstream {stage}")
        )
        # Nothing the client sent decides any of these: our settings or the
        # upstream do.  Retrying later is right even after a 5xx (a refused
        # login is fixed by the operator, not by the sender).
        return TransientDeliveryError(error.reason, "4" + error.status[1:])

    def _setup_failed(self, error: DeliveryError) -> None:
        self.usable = False
        if not self.ready.called:
            self.ready.errback(error)
        elif self._result is not None:
            self._finish_failure(error)
        self._close_now()

    def timeoutConnection(self) -> None:
        error = TransientDeliveryError(
            f"the upstream did not send {self._waiting_for} in time", "4.4.2"
        )
        self._setup_failed(error)

    def _broken(self, why: str) -> None:
        log.warn("upstream connection dropped", reason=why)
        self._setup_failed(TransientDeliveryError(why, "4.4.2"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self.usable = False
        if self._sending is not None:
            self._sending.stopProducing()
            self._sending = None
        problem = tls_problem(reason)
        if problem is not None:
            log.error("upstream TLS certificate not accepted", problem=problem)
            error: DeliveryError = TransientDeliveryError(
                f"TLS with the upstream failed: {problem}", "4.7.5"
            )
        elif self._result is not None and self._replies_seen == 0 and self._used_before:
            error = StaleConnectionError("the upstream closed a reused connection", "4.4.2")
        else:
            error = TransientDeliveryError(
                f"the upstream closed the connection while we waited for {self._waiting_for}",
                "4.4.2",
            )
        if not self.ready.called:
            self.ready.errback(error)
        elif self._result is not None:
            self._finish_failure(error)
        self._lost = True
        self.on_lost(self)
        gone, self._gone = self._gone, []
        for waiting in gone:
            waiting.callback(None)

    def closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        if self._lost or self.transport is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._gone.append(waiting)
        return waiting

    def _close_now(self) -> None:
        if self.transport is not None:
            self._wire.abortConnection()

    # --- transactions -------------------------------------------------------

    def _idle(self) -> None:
        """Between transactions: anything the upstream says now (421 before closing) ends it."""
        self._waiting_for = "nothing"
        self._expected = []
        self._okresponse = self._failresponse = self._unsolicited
        self.setTimeout(None)

    def _unsolicited(self, code: int, resp: bytes) -> None:
        self.usable = False
        self._close_now()

    def deliver(
        self, transaction: wire.Transaction, handover: Handover | None = None
    ) -> Deferred[wire.Delivered]:
        """Run one transaction; fires with the outcome or fails with a L{DeliveryError}.

        @param handover: marked once the whole body, end of DATA included,
            has been written (the upstream may deliver from then on).
        """
        if not self.usable or self._result is not None:
            raise RuntimeError("deliver() on a client that is not idle")
        result: Deferred[wire.Delivered] = Deferred(self._cancel)
        self._result = result
        self._handed_over = False
        self._handover = handover
        self._held = None
        self._replies_seen = 0
        self._used_before = self._used
        self._used = True
        self.setTimeout(self._reply_timeout)
        replies: list[wire.Reply] = []
        commands: list[bytes] = []
        if self._used_before:
            commands.append(b"RSET")
            self._handlers.append(lambda reply: self._after_rset(reply, transaction, replies))
        commands.append(transaction.mail)
        self._handlers.append(lambda reply: self._after_mail(reply, transaction, replies))
        for index, rcpt in enumerate(transaction.rcpts):
            commands.append(rcpt)
            self._handlers.append(
                partial(self._after_rcpt, index=index, transaction=transaction, replies=replies)
            )
        commands.append(b"DATA")
        self._handlers.append(lambda reply: self._after_data(reply, transaction, replies))
        self._waiting_for = "the reply to MAIL"
        if self.capabilities.pipelining:
            # RFC 2920: the whole group in one write, DATA last.
            self._wire.write(b"".join(command + b"\r\n" for command in commands))
            self._unsent = deque()
        else:
            self._unsent = deque(commands)
            self.sendLine(self._unsent.popleft())
        return result

    def _cancel(self, result: Deferred[wire.Delivered]) -> None:
        """The caller gave up on the transaction (a forced shutdown): abort it.

        Cutting the connection before the end of DATA has left means the
        upstream discards the message (RFC 5321 4.1.1.4: it is only
        accepted at the final dot); after that, it may have been accepted,
        and the error says so.
        """
        if self._result is not result:
            return
        self._result = None
        self._handlers.clear()
        self.usable = False
        if self._sending is not None:
            self._sending.stopProducing()
            self._sending = None
        self._close_now()
        result.errback(SendCancelledError(handed_over=self._handed_over))

    def _next(self) -> None:
        if self._unsent:
            self.sendLine(self._unsent.popleft())

    def _after_rset(
        self, reply: wire.Reply, transaction: wire.Transaction, replies: list[wire.Reply]
    ) -> None:
        if not reply.positive:
            self._handlers.clear()
            self._finish_failure(wire.failure(reply, "refused RSET"))
            self._close_now()
            return
        self._next()

    def _after_mail(
        self, reply: wire.Reply, transaction: wire.Transaction, replies: list[wire.Reply]
    ) -> None:
        replies.append(reply)
        self._waiting_for = "the replies to RCPT"
        if not reply.positive and not self.capabilities.pipelining:
            # Nothing more to send: judge the transaction on this reply.
            self._handlers.clear()
            self._judge(transaction, replies, None, None)
            return
        self._next()

    def _after_rcpt(
        self,
        reply: wire.Reply,
        index: int,
        transaction: wire.Transaction,
        replies: list[wire.Reply],
    ) -> None:
        replies.append(reply)
        last = index == len(transaction.rcpts) - 1
        if last:
            self._held = wire.held_back(transaction, replies[0], replies[1:])
            if self._held is not None and not self.capabilities.pipelining:
                # DATA is not sent: the upstream has no message, and the
                # next transaction's RSET clears its envelope.
                held, self._held = self._held, None
                self._unsent.clear()
                self._idle()
                self._finish_failure(held)
                return
        if last and not self.capabilities.pipelining and not any(r.positive for r in replies[1:]):
            self._handlers.clear()
            self._judge(transaction, replies, None, None)
            return
        if last:
            self._waiting_for = "the reply to DATA"
        self._next()

    def _after_data(
        self, reply: wire.Reply, transaction: wire.Transaction, replies: list[wire.Reply]
    ) -> None:
        held, self._held = self._held, None
        if reply.code != 354:
            self._judge(transaction, replies, reply, None)
            return
        if held is not None:
            # The upstream waits for the body: going without the final dot
            # leaves it nothing to deliver (RFC 5321 4.1.1.4).  The
            # connection is in DATA and cannot be reused.
            self.usable = False
            self._closing = True  # no QUIT: it would be read as a line of the body
            self._close_now()
            self._finish_failure(held)
            return
        accepted = replies[0].positive and any(r.positive for r in replies[1:])
        self._waiting_for = "the reply after the message"
        self._handlers.append(lambda final: self._after_body(final, transaction, replies, reply))
        if not accepted:
            # A pipelining server that said 354 with no valid recipient
            # (RFC 2920 3.1): an empty message ends the DATA phase.
            self._wire.write(b".\r\n")
            return
        self._sending = FileSender()
        sent = self._sending.beginFileTransfer(
            io.BytesIO(transaction.body), self.transport, self._progress
        )
        sent.addCallbacks(self._body_sent, lambda failure: None)

    def _progress(self, chunk: bytes) -> bytes:
        # A large body to a slow upstream: progress counts as an answer.
        self.resetTimeout()
        return chunk

    def _body_sent(self, last: object) -> None:
        self._sending = None
        self._handed_over = True
        if self._handover is not None:
            self._handover.mark()

    def _after_body(
        self,
        final: wire.Reply,
        transaction: wire.Transaction,
        replies: list[wire.Reply],
        data: wire.Reply,
    ) -> None:
        if self._sending is not None:
            # The upstream answered before it had the whole body: whatever
            # it thinks happened, this connection is out of step.
            self._sending.stopProducing()
            self._sending = None
            self.usable = False
            self._close_now()
        self._judge(transaction, replies, data, final)

    def _judge(
        self,
        transaction: wire.Transaction,
        replies: list[wire.Reply],
        data: wire.Reply | None,
        final: wire.Reply | None,
    ) -> None:
        result, self._result = self._result, None
        self._idle()
        if result is None:
            return
        try:
            delivered = wire.outcome(transaction.recipients, replies[0], replies[1:], data, final)
        except DeliveryError as e:
            result.errback(e)
            return
        result.callback(delivered)

    def _finish_failure(self, error: DeliveryError) -> None:
        result, self._result = self._result, None
        self._handlers.clear()
        if result is not None:
            result.errback(error)

    def quit(self) -> None:
        """End the session politely; the connection closes after the reply (or the timeout)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.usable = False
        self._waiting_for = "the reply to QUIT"
        self._expected = list(range(200, 600))
        self._okresponse = self._failresponse = lambda code, resp: self._wire.loseConnection()
        self.setTimeout(min(self._reply_timeout, 5.0))
        self.sendLine(b"QUIT")
