"""The SMTP front end: Twisted's ESMTP with its known defects closed.

L{RelayProtocol} is the shell around L{smtpproxy.smtp.session.Session}: the
session decides (which reply for which state, what to check next), the
shell carries that out (the transport, timers, the guard, the portal, the
delivery avatar, the spool), and every reply goes out through its one
L{RelayProtocol.reply}.  It keeps Twisted's ESMTP structure (C{do_*}
command methods, C{extensions()}, the cred portal, C{IMessageDelivery}) but
owns its input loop, because most of stock Twisted's defects live there:

 - Input is processed one command at a time.  While a command waits on
   something asynchronous (delivery after DATA, an AUTH check, a MAIL
   validation) the rest of the pipelined input waits in the buffer, so
   replies come out in order and C{.<CRLF>QUIT} can never answer 221 before
   the 250 (twisted#8126).  That is what makes advertising PIPELINING honest.
 - DATA is read by the chunk-based L{DataReader}: an over-long line can never
   drop back into command mode, memory stays bounded by the size limit, and
   only CRLF.CRLF ends a message.
 - STARTTLS throws away plaintext pipelined behind it and forgets HELO, the
   transaction and any authentication (RFC 3207 4.2).
 - Delivery failures map to 4xx or 5xx through L{reply_for_failure}, not a
   blanket 550 (twisted#4904).
 - Malformed commands, AUTH exchanges and addresses get a 5xx reply and the
   session continues; nothing reaches the client as a traceback.
 - Under implicit TLS (L{smtpproxy.smtp.listeners}) the greeting waits for the
   handshake, and every close sends TLS's close_notify at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.cred import error as cred_error
from twisted.cred.credentials import Anonymous
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.smtp import (
    ESMTP,
    SMTPServerError,
    User,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpproxy.errors import DeliveryError, Reply, reply_for_failure
from smtpproxy.logsafe import LoginNames, clip
from smtpproxy.logsummary import LogSummary
from smtpproxy.policy.guard import Guard
from smtpproxy.policy.pressure import ENTER, IdleLimits, idle_limits, stressed
from smtpproxy.policy.rules import client_name
from smtpproxy.smtp.chunking import ChunkReader
from smtpproxy.smtp.commands import (
    CommandError,
    split_command,
)
from smtpproxy.smtp.dotreader import DataReader
from smtpproxy.smtp.sendnow import writer_for
from smtpproxy.smtp.session import (
    ERROR,
    GO_AHEAD,
    REFUSAL,
    Abandon,
    Budget,
    CheckAuthBlocked,
    CheckRecipient,
    CheckSender,
    Close,
    Greeted,
    Login,
    OpenData,
    Outcome,
    ParsedAddress,
    ReadChunk,
    ReplyBudget,
    Say,
    Session,
    StartTLS,
    Transaction,
    ValidateRecipient,
    wire,
)

# Re-exported: the settings are built with the listener's factory.
from smtpproxy.smtp.session import SessionSettings as SessionSettings
from smtpproxy.smtp.session import session_settings as session_settings
from smtpproxy.spool import InflightBudget, MessageBody, Spool

log = Logger(namespace="smtpproxy.smtp")

COMMAND, DATA, AUTH = "COMMAND", "DATA", "AUTH"
# Reading the octets announced by a BDAT command (RFC 3030).
CHUNK = "CHUNK"

# RFC 5321 4.5.3.1.4: 512 octets including CRLF.  AUTH lines may be longer
# (RFC 4954 4 allows 12288) since they carry base64 credentials.
MAX_COMMAND_LINE = 510
MAX_AUTH_LINE = 12_288
# Input waiting behind a slow command is capped; past this we stop reading
# from the socket until the command finishes (TCP pushes back on the client).
PAUSE_INPUT_AT = 64 * 1024
# A closed session whose peer does not take our last bytes (or never
# finishes a TLS handshake) is cut off after this many seconds.
CLOSE_GRACE = 10.0
# At shutdown, sessions forced closed get this long to report their end;
# after that the stop goes ahead without them (see RelayFactory._give_up).
FORCE_GRACE = 2.0
# DATA must keep up this average rate once SMTP_DATA_TIMEOUT has passed
# (Postfix's smtpd_min_data_rate idea): a client trickling a byte at a time
# cannot hold a session for ever by resetting the idle timer.
MIN_DATA_RATE = 500.0
# DATA's go-ahead, formatted once.
_GO_AHEAD = Say(GO_AHEAD)
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")


_sessions = itertools.count(1)


def _not_connected(data: bytes) -> None:
    raise RuntimeError("reply before the connection was made")


@implementer(IHandshakeListener)
class RelayProtocol(ESMTP):
    """One SMTP session."""

    # Stock SMTP logs every sender and recipient through the legacy logger
    # when noisy; we log one structured line per message instead.
    noisy = False

    def __init__(self, factory: RelayFactory) -> None:
        settings, portal, reactor = factory.settings, factory.portal, factory.reactor
        ESMTP.__init__(self, chal=None, contextFactory=factory.tls_options)
        # Every session belongs to the factory that built it (its listener):
        # the caps, the guard, the spool and the shutdown all go through it.
        self.factory = factory
        self.settings = settings
        self.host = settings.hostname.encode("ascii")
        self.portal = portal  # type: ignore[assignment]
        self._portal = portal
        self.timeout = settings.command_timeout  # type: ignore[assignment]
        # Timers go through the injected reactor so tests can drive time
        # with a Clock.
        self.callLater = reactor.callLater  # type: ignore[method-assign, assignment]
        self._clock = reactor
        self.id = f"s{next(_sessions)}"
        # Only the mutable state is made here; the rest starts as the class
        # attributes below (a session is built per connection, so each
        # assignment saved counts).
        self._input = bytearray()
        self.session = Session(settings, "")
        self._pending: list[bytes] = []

    # Per-session state and its starting values.
    factory: RelayFactory
    mode = COMMAND
    user: str | None = None
    timeOut: float | None = None  # type: ignore[assignment]
    _deadline: float | None = None
    _timer: IDelayedCall | None = None
    _busy = False
    _paused = False
    _write_blocked = False
    _data_started = 0.0
    _closing = False
    _stopping = False
    _discarding_line = False
    # Implicit TLS before its handshake has completed: replies wait in
    # _early (the greeting, or a refusal) and no close can start.
    _handshaking = False
    # A finished body between its final dot and its delivery's answer.
    _delivering: tuple[MessageBody, list[Any]] | None = None
    # That delivery was given up (421 at shutdown, or the client left): its
    # answer, when it comes, is not sent.
    _gave_up = False
    _early: list[bytes]
    # A command arrived since the greeting (or since STARTTLS): the idle
    # limit is then the command timeout, before it the greeting timeout.
    _commanded = False
    # Mistakes and refusals so far (see ReplyBudget), from the first one.
    _budget: ReplyBudget | None = None
    # The dialogue's state and decisions (see smtpproxy.smtp.session).
    session: Session
    # BDAT (RFC 3030): the chunk being read now (the transaction's reader,
    # or one that only counts a refused chunk), with its LAST flag and the
    # refusal to send once it is read.
    _chunk: ChunkReader | None = None
    _chunk_last = False
    _chunk_refusal: Say | None = None
    _nodelay = False
    _peer = ""
    _admitted = False
    _auth_failures = 0
    # connectionLost ran: a login finishing now is logged out at once.
    _ended = False
    _write: Callable[[bytes], None] = staticmethod(_not_connected)
    # While a batch of input is handled, its replies are collected and sent
    # in one write: pipelined commands get one segment back.
    _corked = False
    _pending_size = 0

    @property
    def _tcp(self) -> Any:
        # The transport is several interfaces at once (ITCPTransport,
        # ITLSTransport, IPushProducer); no single type names that.
        return self.transport

    # -- connection lifecycle -------------------------------------------

    def connectionMade(self) -> None:
        self._peer = self.session.peer = client_name(self._tcp.getPeer())
        self._helo = (None, self._peer.encode("ascii", "replace"))
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            # Implicit TLS: the session is encrypted from the start.  What
            # we write before the handshake would sit in the TLS layer, which
            # then pauses us as its producer, and a paused session stops
            # reading the very ClientHello it waits for (issue 10): the
            # greeting (or refusal) waits here for handshakeCompleted.
            self._handshaking = True
            self._early = []
            self._write = self._early.append
            self.session.tls_active = True
        else:
            self._write = writer_for(self.transport)
            tls = ITLSTransport.providedBy(self.transport) and self.ctx is not None
            self.session.tls_available = tls
        # As the transport's producer we hear when our replies back up (a
        # client that pipelines but never reads) and stop taking commands.
        self._tcp.registerProducer(self, True)
        self.factory.sessions.add(self)
        if self.settings.log_sessions:
            log.debug("session opened", session=self.id, client=self._peer)
        if self.factory.stopping:
            self.reply(421, "4.3.2", f"{self.settings.hostname} shutting down, try later")
            self._close()
            return
        refusal, self.session.needs_auth = self.factory.guard.connect(self._peer)
        if refusal is not None:
            # A refused client may reconnect in a loop: summarised per address.
            self.factory.log_summary.emit(
                LogLevel.info,
                "connection refused",
                self._peer,
                session=self.id,
                reply=f"{refusal.code} {refusal.status}",
                reason=refusal.text,
            )
            self.reply(refusal)
            self._close()
            return
        self._admitted = True
        self.factory.load_changed()
        self.reply(self.factory.greeting)
        # Under implicit TLS this limit covers the handshake too.
        self.setTimeout(self._limits().greeting)

    def handshakeCompleted(self) -> None:
        """Twisted's TLS finished a handshake: under implicit TLS, greet now.

        Also called after STARTTLS, where there is nothing to do.
        """
        if not self._handshaking:
            return
        self._handshaking = False
        self._write = writer_for(self.transport)
        early, self._early = self._early, []
        if early:
            self._write(b"".join(early))
        if self._closing:
            # Refused (or shut down) before the handshake: the reply is out,
            # the close that _close held back can start.
            self._lose_connection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._abandon(self.session.tx)
        self._ended = True
        # Closing first: a delivery given up below answers at once, and a
        # closing session neither replies nor re-arms its timer then.
        self._closing = True
        self._give_up_delivery()
        self._drop_avatar()
        self.setTimeout(None)
        self._release_slot()
        self.factory.load_changed()
        self.factory.session_ended(self)
        if self.settings.log_sessions:
            log.debug("session closed", session=self.id, client=self._peer)

    # -- the idle timer ------------------------------------------------------

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

    def _limits(self) -> IdleLimits:
        return self.factory.idle_limits

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

    def timeoutConnection(self) -> None:
        if self._closing:
            # The grace period of _close ran out: the peer is not taking
            # our last bytes (or never finished a TLS handshake).
            self._tcp.abortConnection()
            return
        if self._handshaking:
            # Implicit TLS and no complete handshake within the greeting
            # limit: nothing can be said to this client, so it is cut off.
            self.factory.log_summary.emit(
                LogLevel.info, "TLS handshake timed out", self._peer, session=self.id
            )
            self._closing = True
            self._release_slot()
            self._tcp.abortConnection()
            return
        self.reply(421, "4.4.2", f"{self.settings.hostname} idle too long, closing connection")
        self._close(grace=1.0)

    def shutdown(self) -> None:
        """The service is stopping: close now unless a message is on its way.

        Only a session inside DATA or waiting on its delivery holds the
        shutdown up.  One that has merely named a sender or recipients has
        handed us nothing yet; 421 loses nothing and the client retries.
        """
        self._stopping = True
        if not self._in_transaction():
            self.reply(421, "4.3.2", f"{self.settings.hostname} shutting down, try later")
            self._close()

    def force_close(self) -> None:
        """Shutdown timed out: say so if we still can, abort after a short grace."""
        if not self._closing:
            self.reply(421, "4.3.2", "Shutting down, message not accepted, try later")
        self._close(grace=1.0)
        self._give_up_delivery()

    def _give_up_delivery(self) -> None:
        """The client was told "not accepted", or is gone: a delivery not started stays so.

        A body can wait after its final dot, for room in the memory budget
        or for its turn to be parsed; delivering it after its client heard
        421 (or lost the connection) would make the client's retry a
        duplicate.  One already with the provider is left alone.
        """
        pending, self._delivering = self._delivering, None
        if pending is None:
            return
        self._gave_up = True
        body, messages = pending
        for message in messages:
            abandon = getattr(message, "abandon", None)
            if abandon is not None:
                abandon()
        if body.claim_pending:
            body.close()  # cancels the wait; the delivery's answer then goes nowhere

    def _in_transaction(self) -> bool:
        return self._busy or self.mode in (DATA, CHUNK) or self.session.tx.chunks is not None

    def _close(self, grace: float = CLOSE_GRACE) -> None:
        """Close after our last reply is sent, or cut off after C{grace} seconds.

        C{loseConnection} waits for pending output (and, inside TLS, for the
        handshake); a peer that never reads or never finishes the handshake
        would otherwise keep its session and connection slot for ever.

        A closing session no longer counts against the connection caps: a
        client that opens a new session as soon as it has read C{221} must
        not be refused because the old one is still being torn down.
        """
        already_closing = self._closing
        self._closing = True
        self._release_slot()
        if self._handshaking:
            # Refused (or shut down) before an implicit-TLS handshake: no cap
            # counts this connection any more, so a client that never sends
            # its ClientHello must not keep it for the whole grace.  A second
            # is enough to finish a handshake and read the refusal.
            grace = min(grace, 1.0)
        self._input.clear()
        self._flush()
        # Before an implicit-TLS handshake the reply waits for it and
        # handshakeCompleted closes; the timer below cuts off a client that
        # never completes it.
        if not already_closing and not self._handshaking:
            self._lose_connection()
        # Even with nothing left in Twisted's buffer the close can stall: the
        # kernel's send queue may be full of replies the peer never reads,
        # and the socket then never turns writable.  So there is always a
        # timer: the idle timer becomes the grace timer (timeoutConnection
        # aborts a closing session); a second close may only make it shorter.
        if not already_closing or self.timeOut is None or grace < self.timeOut:
            self.setTimeout(grace)

    def _lose_connection(self) -> None:
        """Start the transport's close once the last reply has been written.

        Twisted's TLS layer does not start its shutdown (close_notify, then
        the TCP close) while a producer is registered, so the session stops
        being one; and a session that had paused reading resumes it, since
        the peer's close_notify or FIN must be read.  Without this every TLS
        session waited out the close grace and was then aborted (issue 10).

        Twisted's TLS then closes TCP only once the peer has answered with
        its own close_notify, which many clients never send (they read EOF
        and wait for the server to close).  RFC 8446 6.1 lets the side that
        closes stop without waiting for the answer, as Postfix does; telling
        OpenSSL that the answer has come makes Twisted close TCP right
        behind our close_notify.  That is only done when all our output has
        gone into the TLS layer (nothing held back there, which would have
        paused us), so no reply is cut off.
        """
        held_back = self._write_blocked
        self._tcp.unregisterProducer()
        if self._paused:
            self._paused = False
            self._tcp.resumeProducing()
        if self.session.tls_active and not held_back:
            # ISystemHandle: the TLS transports give their OpenSSL connection.
            handle = getattr(self._tcp, "getHandle", lambda: None)()
            if isinstance(handle, SSL.Connection):
                handle.set_shutdown(handle.get_shutdown() | SSL.RECEIVED_SHUTDOWN)
        self._tcp.loseConnection()

    def _release_slot(self) -> None:
        """Stop counting this session against the connection caps (once).

        The stress state (L{RelayFactory.load_changed}) is re-derived when
        the session has ended, not here: idle sessions cut together in one
        storm must all be cut, not spared once the first few are closing.
        """
        if self._admitted:
            self._admitted = False
            self.factory.guard.disconnect(self._peer)

    def _stop_if_shutting_down(self) -> bool:
        """Between transactions during shutdown: say 421 and close. True if closed."""
        if self._stopping and not self._in_transaction():
            self.reply(421, "4.3.2", f"{self.settings.hostname} shutting down, try later")
            self._close()
            return True
        return False

    # -- flow control: IPushProducer for the transport ---------------------

    def pauseProducing(self) -> None:
        """Our replies are not being read: stop reading and handling commands."""
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if not self._closing:
            self._process()

    def stopProducing(self) -> None:
        self._write_blocked = True

    def _update_reading(self) -> None:
        """Pause the socket while replies back up or a waiting command's input piles up."""
        want_pause = self._write_blocked or (self._busy and len(self._input) > PAUSE_INPUT_AT)
        if want_pause and not self._paused:
            self._paused = True
            self._tcp.pauseProducing()
        elif self._paused and not want_pause:
            self._paused = False
            self._tcp.resumeProducing()

    # -- input loop -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._corked = True
        try:
            ready = not self._input and not self._busy and not self._write_blocked
            if ready and self.mode == DATA:
                # Fast path: body bytes go straight to the reader, no copy.
                self.resetTimeout()
                self._feed_data(data)
            elif ready and self.mode == CHUNK:
                self.resetTimeout()
                self._feed_chunk(data)
            elif (
                ready
                and self.mode == COMMAND
                and not self._discarding_line
                and data.endswith(b"\n")
                and data.find(b"\n") == len(data) - 1
            ):
                # Fast path: exactly one whole command line, as clients that
                # wait for each reply send them; no buffering.
                line = data[:-2] if data.endswith(b"\r\n") else data[:-1]
                self.resetTimeout()
                self._command(line)
            else:
                self._input += data
            self._process_input()
        finally:
            self._uncork()

    def _process(self) -> None:
        """Handle buffered input, sending the replies it produces together."""
        if self._corked:
            self._process_input()
            return
        self._corked = True
        try:
            self._process_input()
        finally:
            self._uncork()

    def _process_input(self) -> None:
        while self._input and not self._busy and not self._write_blocked and not self._closing:
            if self.mode == DATA:
                data = bytes(self._input)
                self._input.clear()
                self.resetTimeout()
                self._feed_data(data)
                continue
            if self.mode == CHUNK:
                assert self._chunk is not None
                take = min(self._chunk.remaining, len(self._input))
                data = bytes(self._input[:take])
                del self._input[:take]
                self.resetTimeout()
                self._feed_chunk(data)
                continue
            end = self._input.find(b"\n")
            if end < 0:
                if len(self._input) > MAX_AUTH_LINE:
                    # Keep nothing of an endless line; answer when it ends.
                    if self.mode != AUTH and _looks_like_bdat(self._input):
                        self._refuse_bdat_line(Reply(500, "5.5.2", "Line too long"))
                        break
                    self._input.clear()
                    self._discarding_line = True
                break
            line = bytes(self._input[:end])
            del self._input[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self.resetTimeout()
            if self._discarding_line:
                self._discarding_line = False
                if self.mode == AUTH:
                    self._end_auth()
                self.reply(500, "5.5.2", "Line too long", counts_as=ERROR)
                continue
            if self.mode == AUTH:
                self._auth_step(self.session.auth_response(line))
            else:
                self._command(line)
        if not self._closing:
            self._update_reading()

    def _command(self, line: bytes) -> None:
        if not self._commanded:
            self._commanded = True
            self.setTimeout(self._limits().command)
        try:
            verb, argument = split_command(line)
        except CommandError as e:
            self._refuse_line(line, e.reply)
            return
        if len(line) > MAX_COMMAND_LINE and verb != "AUTH":
            self._refuse_line(line, Reply(500, "5.5.2", "Line too long"))
            return
        if verb != "QUIT" and self._stop_if_shutting_down():
            return
        name = _HANDLERS.get(verb)
        if name is None:
            self._refuse_line(line, Reply(500, "5.5.2", "Command not recognized"))
            return
        getattr(self, name)(argument)

    def _refuse_line(self, line: bytes, reply: Reply) -> None:
        """A command line turned down before any handler saw it: a client mistake."""
        if _looks_like_bdat(line):
            self._refuse_bdat_line(reply)
            return
        self.reply(reply, counts_as=ERROR)

    def _refuse_bdat_line(self, reply: Reply) -> None:
        """A BDAT line we cannot read: its chunk's end is unknown, so close.

        The octets of the chunk follow the line at once; read as commands
        they would run as commands (the SMTP smuggling shape).  RFC 3030
        leaves the case open; as for a size that cannot be read
        (L{smtpproxy.smtp.chunking.ChunkSizeError}) the only safe answer is
        the reply, then the end of the connection.
        """
        self.reply(Reply(reply.code, reply.status, f"{reply.text}; closing connection"))
        self._close()

    def _busy_with(
        self,
        d: defer.Deferred[Any],
        on_result: Callable[[Any], object] | None = None,
    ) -> None:
        """Hold further input until C{d} fires; C{on_result} then sends the reply.

        C{on_result} gets C{d}'s result, a L{Failure} included.  One
        callback does everything here: on the hot path each extra Deferred
        callback is a measurable share of the cost of a message.
        """
        self._busy = True
        # When d has already fired (most validations do), the input loop that
        # called us carries on by itself; recursing into it here would nest
        # one stack frame per pipelined command.  Only a command that really
        # waits stops the idle timer (a slow backend is not an idle client).
        synchronous = True

        def done(result: object) -> None:
            try:
                if on_result is not None:
                    on_result(result)
                elif isinstance(result, Failure):
                    self._unexpected(result)
            except Exception:
                self._unexpected(Failure())
            self._busy = False
            if self._closing or self._stop_if_shutting_down():
                return
            if not synchronous:
                self.setTimeout(self._limits().command)
                self._process()

        d.addBoth(done)
        synchronous = False
        if self._busy:
            self.setTimeout(None)

    def _unexpected(self, failure: Failure) -> None:
        """Our own bug: log it with its traceback, tell the client to retry."""
        log.failure("unexpected error in session", failure, session=self.id)
        self.reply(451, "4.3.0", "Local error in processing")

    # -- replies ----------------------------------------------------------

    def reply(
        self,
        reply: Say | Reply | int,
        status: str = "",
        text: str = "",
        *,
        counts_as: Budget | None = None,
    ) -> None:
        """Send a reply: the one way anything is said to the client.

        @param reply: what the session said (a L{Say}), or a L{Reply}, or
            its code with C{status} ("" for none) and C{text}; line breaks
            in the text are never sent.
        @param counts_as: (not with a L{Say}, which carries its own)
            L{ERROR} for a client's mistake, L{REFUSAL} for a policy
            refusal: the reply counts against that budget
            (C{SMTP_MAX_ERRORS}, C{SMTP_MAX_REFUSALS}); when it is spent, a
            421 goes out instead and the session closes.

        Replies are batched by L{_send} while a batch of input is handled.
        """
        if type(reply) is Say:
            counts_as = reply.counts_as
            if counts_as is None:
                # Most of the session's replies: formatted once, no budget.
                self._send(self._said(reply))
                return
        elif isinstance(reply, int):
            reply = Reply(reply, status, text)
            if counts_as is None:
                # The shell's own replies (250 delivered, 235, ...).
                self._send(wire(reply))
                return
        elif not isinstance(reply, Reply):
            counts_as = reply.counts_as
        if counts_as is not None:
            if self._budget is None:
                self._budget = ReplyBudget(self.settings.max_errors, self.settings.max_refusals)
            last = self._budget.charge(counts_as)
            if last is not None:
                self._send(wire(last))
                self._close()
                return
        self._send(self._said(reply) if isinstance(reply, Say) else wire(reply))

    def _said(self, say: Say) -> bytes:
        """A L{Say} as sent: EHLO's greeting becomes the first line of a multi-line reply."""
        if say.keywords:
            return b"%d-%s%s" % (say.reply.code, say.wire[4:], self._extension_reply())
        return say.wire

    def _send(self, data: bytes) -> None:
        if not self._corked:
            self._write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > PAUSE_INPUT_AT:
            # A client pipelining faster than it reads: hand the replies to
            # the transport now so that its flow control can stop us.
            self._flush()

    def _uncork(self) -> None:
        self._corked = False
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        self._write(data)

    # -- commands ---------------------------------------------------------

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return self.session.extensions()

    def _extension_reply(self) -> bytes:
        """EHLO's keyword lines as sent, built once per listener for each state they depend on."""
        session = self.session
        key = (session.tls_available and not session.tls_active, session.auth_offered())
        cache = self.factory.ehlo_cache
        lines = cache.get(key)
        if lines is None:
            keywords = self.listExtensions().splitlines()
            lines = b"".join(b"250-%s\r\n" % line for line in keywords[:-1])
            lines += b"250 %s\r\n" % keywords[-1]
            cache[key] = lines
        return lines

    def _run(self, outcome: Outcome) -> None:
        """Carry out what the session decided: send its replies, run its effects."""
        for action in outcome:
            if type(action) is not Say:
                _EFFECTS[type(action)](self, action)
            elif action.counts_as is None and not action.keywords:
                # Most replies: a line formatted once, no budget to charge.
                self._send(action.wire)
            else:
                self.reply(action)

    def _greeted(self, action: Greeted) -> None:
        self._helo = (action.name.encode("ascii"), self._peer.encode("ascii", "replace"))

    def do_HELO(self, argument: str) -> None:
        self._run(self.session.helo(argument, extended=False))

    def do_EHLO(self, argument: str) -> None:
        self._run(self.session.helo(argument, extended=True))

    def do_NOOP(self, argument: str) -> None:
        self._run(self.session.noop(argument))

    def do_VRFY(self, argument: str) -> None:
        self._run(self.session.vrfy(argument))

    def do_EXPN(self, argument: str) -> None:
        self._run(self.session.expn(argument))

    def do_HELP(self, argument: str) -> None:
        self._run(self.session.help(argument))

    def do_RSET(self, argument: str) -> None:
        self._run(self.session.rset(argument))

    def do_QUIT(self, argument: str) -> None:
        self._run(self.session.quit(argument))

    def do_MAIL(self, argument: str) -> None:
        self._run(self.session.mail(argument))

    def _check_sender(self, action: CheckSender) -> None:
        """The guard, then the delivery avatar (logged in anonymously if need be)."""
        parsed = action.arguments
        guard = self.factory.guard
        refusal = guard.sender(parsed.sender) or guard.message(self._peer, self.user)
        if refusal is not None:
            self.factory.log_summary.emit(
                LogLevel.info,
                "sender refused",
                self._peer,
                session=self.id,
                user=self.user,
                sender=clip(parsed.sender),
                reply=f"{refusal.code} {refusal.status}",
            )
            self.reply(refusal, counts_as=REFUSAL)
            return
        origin = ParsedAddress(parsed.sender, parsed)

        def accepted(result: object) -> None:
            self._run(self.session.sender_accepted(origin))

        if self.delivery is None:
            # First MAIL of a session without AUTH: log in anonymously through
            # the portal (what stock validateFrom does, minus a second pass).
            def logged_in(result: object) -> object:
                if isinstance(result, Failure):
                    self._refused(result, "sender")
                    return None
                login: tuple[Any, Any, Callable[[], None]] = result  # type: ignore[assignment]
                _, delivery, logout = login
                self._take_avatar(delivery, logout)
                try:
                    checked = delivery.validateFrom(self._helo, origin)
                except Exception:
                    # Raising (SMTPBadSender, say) is how a delivery refuses.
                    self._refused(Failure(), "sender")
                    return None
                if isinstance(checked, defer.Deferred):
                    return checked.addCallbacks(accepted, self._refused, errbackArgs=("sender",))
                accepted(checked)
                return None

            # An anonymous checker answers at once; handling that answer
            # here rather than through more callbacks and a busy wait is a
            # measurable share of a message's cost.
            early: list[object] = []

            def first(result: object) -> object:
                if synchronous:
                    early.append(result)
                    return None
                return logged_in(result)

            synchronous = True
            d = self._portal.login(Anonymous(), None, IMessageDelivery).addBoth(first)
            synchronous = False
            if not early:
                self._busy_with(d)
                return
            waiting = logged_in(early[0])
            if isinstance(waiting, defer.Deferred):
                self._busy_with(waiting)
        else:
            self._validate(self.delivery.validateFrom, (self._helo, origin), accepted, "sender")

    def _validate(
        self,
        check: Callable[..., Any],
        args: tuple[Any, ...],
        accepted: Callable[[Any], None],
        what: str,
    ) -> None:
        """Run a delivery avatar's check; wait (holding input) only if it returns a Deferred.

        Avatars answer at once nearly always; going through Deferreds for
        those would be a sizeable share of the cost of a message.
        """
        try:
            result = check(*args)
        except Exception:
            self._refused(Failure(), what)
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(accepted, self._refused, errbackArgs=(what,))
            self._busy_with(result)
        else:
            accepted(result)

    def _refused(self, failure: Failure, what: str) -> None:
        """A delivery avatar turned a sender or recipient down (or broke)."""
        error = failure.value
        if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            self.reply(530, "5.7.0", "Authentication required")
        elif isinstance(error, SMTPServerError):
            self.reply(Reply(error.code, "5.7.1", str(error.resp)))
        elif isinstance(error, DeliveryError):
            # A provider's refusal at MAIL or RCPT (providers.envelope_refusal).
            self.reply(reply_for_failure(error))
        else:
            log.failure(f"{what} validation failed", failure, session=self.id)
            self.reply(451, "4.3.0", "Local error in processing")

    def do_RCPT(self, argument: str) -> None:
        self._run(self.session.rcpt(argument))

    def _check_recipient(self, action: CheckRecipient) -> None:
        parsed = action.arguments
        refusal = self.factory.guard.recipient(parsed.recipient)
        if refusal is not None:
            self.factory.log_summary.emit(
                LogLevel.info,
                "recipient refused",
                self._peer,
                session=self.id,
                recipient=clip(parsed.recipient),
            )
            self.reply(refusal, counts_as=REFUSAL)
            return
        self._run(self.session.recipient_allowed(parsed))

    def _validate_recipient(self, action: ValidateRecipient) -> None:
        user = User(action.address, self._helo, self, self.session.tx.sender)

        def accepted(factory: Callable[[], Any]) -> None:
            self._run(self.session.recipient_accepted(user, factory, action.key))

        self._validate(self.validateTo, (user,), accepted, "recipient")

    def do_DATA(self, argument: str) -> None:
        self._run(self.session.data(argument))

    def _open_data(self, action: OpenData) -> None:
        failure = self._open_message()
        if failure is not None:
            self.reply(failure)
            return
        tx = self.session.tx
        tx.reader = DataReader(self.settings.max_message_size, tx.body)
        self.mode = DATA
        self.setTimeout(self.settings.data_timeout)
        self.reply(_GO_AHEAD)

    def _open_message(self) -> Reply | None:
        """Build the transaction's message and an empty body; the reply if that failed."""
        messages: list[Any] = []
        try:
            for _, factory in self.session.tx.recipients:
                message = factory()
                if not any(message is seen for seen in messages):
                    messages.append(message)
        except Exception as e:
            for message in messages:
                message.connectionLost()
            self._reset_transaction()
            return reply_for_failure(e)
        self.session.tx.messages = messages
        self.session.tx.body = self.factory.spool.body()
        self._data_started = self._clock.seconds()
        return None

    def _feed_data(self, data: bytes) -> None:
        reader = self.session.tx.reader
        assert reader is not None
        if self._too_slow(reader):
            self._cut_off_slow()
            return
        end = reader.feed(data)
        if end is None:
            return
        if end < len(data):
            self._input[:0] = data[end:]
        self._end_of_data()

    def _cut_off_slow(self) -> None:
        self._abandon(self.session.tx)
        self.mode = COMMAND
        self._reset_transaction()
        self.reply(421, "4.4.2", "Data arriving too slowly, closing connection")
        self._close(grace=1.0)

    def _too_slow(self, reader: DataReader | ChunkReader) -> bool:
        """Past the DATA timeout, has the body fallen below the minimum average rate?"""
        elapsed = self._clock.seconds() - self._data_started
        allowed = self.settings.data_timeout + reader.size / MIN_DATA_RATE
        return elapsed > allowed

    def _end_of_data(self) -> None:
        tx = self.session.tx
        reader, messages, body = tx.reader, tx.messages, tx.body
        assert reader is not None and body is not None
        tx.reader = tx.body = None
        tx.messages = []
        self.mode = COMMAND
        self.setTimeout(self._limits().command)
        self._complete(messages, body, reader.oversize, reader.size)

    def _complete(self, messages: list[Any], body: MessageBody, oversize: bool, size: int) -> None:
        """The whole body is in (final dot or BDAT LAST): refuse it, or deliver it and answer."""
        if not oversize:
            body.finish()
        if oversize or body.error is not None:
            body.close()
            for message in messages:
                message.connectionLost()
            self._reset_transaction()
            if oversize:
                self.reply(self._too_big())
            else:
                self._spool_failed(body, size)
            self._stop_if_shutting_down()
            return
        for message in messages:
            message.bodyReceived(body)
        self._reset_transaction()
        self._delivering = (body, messages)
        # A spooled body is read back into memory only when the shared
        # budget has room for it (see smtpproxy.spool.InflightBudget).
        waiting = body.claim()
        d: defer.Deferred[Any]
        if waiting is None:
            d = self._deliver(messages)
        else:
            d = waiting.addCallback(lambda _: self._deliver(messages))

        def answer(result: object) -> None:
            # Delivered, refused or failed: the body (its file, its share
            # of the memory budget) is released here and nowhere later.
            self._delivering = None
            body.close()
            if self._gave_up:
                # The client already heard 421 (or is gone): nothing more to say.
                return
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, defer.FirstError):
                    error = error.subFailure.value
                assert error is not None
                self.reply(reply_for_failure(error))
                return
            if self._budget is not None:
                self._budget.delivered()
            ids = result if isinstance(result, list) else [result]
            names = " ".join(str(i) for i in ids if isinstance(i, str))
            self.reply(250, "2.0.0", f"OK: delivered as {names}" if names else "OK: delivered")

        if not isinstance(d, defer.Deferred):
            d = defer.succeed(d)
        self._busy_with(d, answer)

    def _deliver(self, messages: list[Any]) -> defer.Deferred[Any]:
        if len(messages) == 1:
            # Our own delivery always makes one message per transaction.
            try:
                d: defer.Deferred[Any] = messages[0].eomReceived()
            except Exception:
                log.failure("delivery could not start", session=self.id)
                d = defer.fail()
            return d
        results = [defer.maybeDeferred(message.eomReceived) for message in messages]
        return defer.gatherResults(results, consumeErrors=True)

    def _spool_failed(self, body: MessageBody, size: int) -> None:
        """The disk refused the body: the client may retry; nothing was accepted."""
        error = body.error
        log.warn(
            "message body could not be spooled",
            session=self.id,
            client=self._peer,
            size=size,
            reason=(error.strerror or str(error)) if error is not None else None,
        )
        self.reply(SPOOL_FULL)

    def _too_big(self) -> Reply:
        size = self.settings.max_message_size
        return Reply(552, "5.3.4", f"Message too big: this server accepts at most {size} bytes")

    # -- BDAT (RFC 3030) ------------------------------------------------------

    def do_BDAT(self, argument: str) -> None:
        """Read the announced chunk, then answer: every readable BDAT consumes its octets."""
        self._run(self.session.bdat(argument))

    def _read_chunk(self, action: ReadChunk) -> None:
        if not self._nodelay:
            self._no_delay()
        chunk, refusal = action.chunk, action.refusal
        tx = self.session.tx
        if refusal is None and tx.chunks is None:
            failure = self._open_message()
            if failure is not None:
                refusal = Say(failure)
            else:
                tx.chunks = ChunkReader(self.settings.max_message_size, tx.body)
        if refusal is None:
            assert tx.chunks is not None
            reader = tx.chunks
        else:
            # A refused chunk is read and dropped; its own time counts.
            reader = ChunkReader(0)
            self._data_started = self._clock.seconds()
        reader.expect(chunk.size)
        self._chunk, self._chunk_last, self._chunk_refusal = reader, chunk.last, refusal
        if chunk.size == 0:
            self._end_of_chunk()
            return
        self.mode = CHUNK
        self.setTimeout(self.settings.data_timeout)

    def _no_delay(self) -> None:
        """Send small replies at once (no Nagle) from the first BDAT on.

        A chunk's reply is written when its last byte is read, usually in
        another read than the next one's, so a pipelined message's replies
        leave as several small writes.  With Nagle's algorithm each waits
        for the client to acknowledge the one before, and a client that has
        sent everything and only reads acknowledges late (delayed ACK): the
        reply to the message came 20-40 ms late on loopback.  Replies are
        whole lines, so nothing is gained by holding them back.
        """
        self._nodelay = True
        set_no_delay = getattr(self._tcp, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError as e:  # not a TCP socket after all: nothing to gain there
                log.debug("TCP_NODELAY not set", session=self.id, error=repr(e))

    def _feed_chunk(self, data: bytes) -> None:
        reader = self._chunk
        assert reader is not None
        if self._too_slow(reader):
            self._cut_off_slow()
            return
        taken = reader.feed(data)
        if taken < len(data):
            self._input[:0] = data[taken:]
        if reader.remaining == 0:
            self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        """The announced octets are in: answer the chunk, deliver after LAST."""
        reader, last, refusal = self._chunk, self._chunk_last, self._chunk_refusal
        assert reader is not None
        self._chunk = self._chunk_refusal = None
        self.mode = COMMAND
        self.setTimeout(self._limits().command)
        if refusal is not None:
            self._run(self.session.chunk_refused(refusal.reply, last))
            self.reply(refusal)
            if not self._closing:
                self._stop_if_shutting_down()
            return
        tx = self.session.tx
        body = tx.body
        assert body is not None
        if last:
            messages = tx.messages
            tx.chunks, tx.body, tx.messages = None, None, []
            self._complete(messages, body, reader.oversize, reader.size)
            return
        if reader.oversize:
            self.reply(self._too_big())
            self._run(self.session.chunk_refused(self._too_big(), last))
        elif body.error is not None:
            self._spool_failed(body, reader.size)
            self._run(self.session.chunk_refused(SPOOL_FULL, last))
        else:
            self.reply(250, "2.0.0", f"{reader.size} octets received")

    def _abandon_transaction(self, action: Abandon) -> None:
        self._abandon(action.transaction)

    def _abandon(self, tx: Transaction) -> None:
        """Release what a dropped transaction holds: its avatar messages, its body."""
        for message in tx.messages:
            try:
                message.connectionLost()
            except Exception:
                log.failure("message cleanup failed", session=self.id)
        tx.messages = []
        tx.reader = tx.chunks = self._chunk = None
        if tx.body is not None:
            # Connection lost, timed out or cut off at shutdown mid-DATA:
            # the spool file goes now, not when the session is collected.
            tx.body.close()
            tx.body = None

    def _reset_transaction(self) -> None:
        self._run(self.session.reset())

    # -- STARTTLS -----------------------------------------------------------

    def ext_STARTTLS(self, argument: str) -> None:
        self._run(self.session.starttls(argument))

    def _start_tls(self, action: StartTLS) -> None:
        assert self.ctx is not None  # tls_available says so
        try:
            # Built and cached at start-up (tls.server_context); should
            # OpenSSL refuse it here all the same, the plain session is
            # still intact and can say so.  Inside startTLS the same
            # refusal left the transport half-switched and the session
            # never ended (issue 9, L2).
            self.ctx.getContext()
        except Exception as e:
            log.warn("TLS context refused", session=self.id, client=self._peer, error=repr(e))
            self.reply(454, "4.7.0", "TLS not available due to temporary reason")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # Anything the client pipelined behind STARTTLS arrived in plaintext
        # and must not run inside the TLS session (CVE-2011-0411 class).
        self._input.clear()
        self._flush()  # the 220 must leave in plaintext, before the handshake
        try:
            self._tcp.startTLS(self.ctx)
        except Exception as e:
            # Not expected once the context exists; if it happens the
            # transport may be half-switched and never report the end, so
            # the session releases itself.
            log.warn("STARTTLS failed", session=self.id, client=self._peer, error=repr(e))
            self.connectionLost(None)
            self._tcp.abortConnection()
            return
        # The handshake and the new EHLO must come within the greeting
        # limit: a client that stalls mid-handshake is idle before a command.
        self._commanded = False
        self.setTimeout(self._limits().greeting)
        # RFC 3207 4.2: forget everything learned before TLS.
        self._run(self.session.tls_started())
        self._helo = (None, self._peer.encode("ascii", "replace"))
        self.user = None
        self._drop_avatar()
        self.deliveryFactory = None

    # -- AUTH -----------------------------------------------------------------

    def ext_AUTH(self, argument: str) -> None:
        self._run(self.session.auth(argument))

    def _check_auth_blocked(self, action: CheckAuthBlocked) -> None:
        if self.factory.guard.auth_blocked(self._peer):
            self.reply(421, "4.7.0", "Too many failed logins from your address, try later")
            self._close()
            return
        self._auth_step(self.session.auth_start(action.argument))

    def _auth_step(self, outcome: Outcome) -> None:
        """Input goes to the SASL exchange while the session has one open."""
        self.mode = AUTH if self.session.sasl is not None else COMMAND
        self._run(outcome)

    def _end_auth(self) -> None:
        self.mode = COMMAND
        self.session.sasl = None

    def _log_in(self, action: Login) -> None:
        creds = action.credentials
        username = creds.username.decode("utf-8", "replace")

        def succeeded(result: tuple[Any, Any, Callable[[], None]]) -> None:
            _, avatar, logout = result
            self._take_avatar(avatar, logout)
            self.deliveryFactory = None
            self.session.authenticated = True
            self.user = username
            log.info("authenticated", session=self.id, client=self._peer, username=username)
            self.reply(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> defer.Deferred[None] | None:
            if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
                return self._auth_failed(username)
            log.failure("authentication error", failure, session=self.id)
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None

        d = self._portal.login(creds, None, IMessageDelivery)
        d.addCallbacks(succeeded, failed)
        self._busy_with(d)

    # -- the logged-in avatar -------------------------------------------------

    def _take_avatar(self, avatar: IMessageDelivery, logout: Callable[[], None]) -> None:
        """Use a freshly logged-in avatar; the one it replaces is logged out first.

        A login that completes after the connection was lost is logged out
        at once: nothing else would ever release it.
        """
        self._drop_avatar()
        if self._ended:
            self._logout(logout)
            return
        self.delivery = avatar
        self._onLogout = logout

    def _drop_avatar(self) -> None:
        """Forget the avatar (STARTTLS, a new login, the end): its logout runs once."""
        logout, self._onLogout = self._onLogout, None
        self.delivery = None
        if logout is not None:
            self._logout(logout)

    def _logout(self, logout: Callable[[], None]) -> None:
        try:
            logout()
        except Exception:
            # An identity backend's bug must not stop the session's cleanup.
            log.failure("avatar logout failed", session=self.id)

    def _auth_failed(self, username: str) -> defer.Deferred[None] | None:
        """Answer a wrong password slowly; after too many, close the session."""
        self._auth_failures += 1
        delay, blocked = self.factory.guard.auth_failed(self._peer, self._auth_failures)
        names = self.factory.login_names
        # Each failure is its own line: the guard's delays and address ban
        # already bound how many one address can cause.  The name appears
        # only when it is a configured user (a password typed into the user
        # name prompt must not reach the log), otherwise as a keyed hash.
        log.warn(
            "authentication failed",
            session=self.id,
            client=self._peer,
            **names.fields(username),
            failures=self._auth_failures,
            blocked=blocked,
        )

        def answer() -> None:
            if blocked or self._auth_failures >= self.settings.max_auth_failures:
                self.reply(421, "4.7.0", "Too many failed logins, closing connection")
                self._close()
            else:
                self.reply(535, "5.7.8", "Authentication credentials invalid")

        if delay <= 0:
            answer()
            return None
        # The session stays busy (input held) until the answer goes out.
        return task.deferLater(self._clock, delay, answer)


def _handlers(protocol: type[ESMTP]) -> dict[str, str]:
    """Verb -> method name, resolved once: what ESMTP.lookupMethod finds per command."""
    found = {name[4:]: name for name in dir(protocol) if name.startswith("ext_")}
    found.update({name[3:]: name for name in dir(protocol) if name.startswith("do_")})
    found.pop("UNKNOWN", None)
    return {verb: name for verb, name in found.items() if verb.isalpha() and verb.isupper()}


_HANDLERS = _handlers(RelayProtocol)
# What carries out each effect a Session returns (see RelayProtocol._run).
_EFFECTS: dict[type, Callable[[RelayProtocol, Any], None]] = {
    Close: lambda protocol, action: protocol._close(),
    Abandon: RelayProtocol._abandon_transaction,
    Greeted: RelayProtocol._greeted,
    CheckSender: RelayProtocol._check_sender,
    CheckRecipient: RelayProtocol._check_recipient,
    ValidateRecipient: RelayProtocol._validate_recipient,
    OpenData: RelayProtocol._open_data,
    ReadChunk: RelayProtocol._read_chunk,
    StartTLS: RelayProtocol._start_tls,
    CheckAuthBlocked: RelayProtocol._check_auth_blocked,
    Login: RelayProtocol._log_in,
}


class RelayFactory(ServerFactory):
    """Builds sessions and knows every live one, for graceful shutdown."""

    def __init__(
        self,
        settings: SessionSettings,
        portal: Portal,
        tls_options: Any,
        reactor: IReactorTime,
        guard: Guard,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.portal = portal
        self.tls_options = tls_options
        self.reactor = reactor
        self.sessions: set[RelayProtocol] = set()
        # One budget for the body bytes held in memory by all sessions.
        self.spool = Spool(
            settings.spool_threshold,
            settings.spool_dir or None,
            InflightBudget(settings.max_inflight_bytes),
        )
        # The 220 greeting, the same for every session of this listener.
        self.greeting = Say(Reply(220, "", f"{settings.hostname} ESMTP smtpproxy ready"))
        # EHLO's keyword lines by (STARTTLS offered, AUTH offered).
        self.ehlo_cache: dict[tuple[bool, bool], bytes] = {}
        self.stopping = False
        self._drained: list[defer.Deferred[None]] = []
        self._give_up_call: IDelayedCall | None = None
        # Connection storms: see smtpproxy.pressure for the rule.
        self.stressed = False
        self.idle_limits = idle_limits(settings.greeting_timeout, settings.command_timeout, False)
        # Events a client can repeat at will are logged once per address
        # and interval, with a count (see smtpproxy.logsummary).
        self.log_summary = LogSummary(log, reactor)
        self.login_names = LoginNames(settings.auth_users)

    def stopFactory(self) -> None:
        """The last listener closed: write the refusals counted so far, stop the timer."""
        self.log_summary.stop()

    def buildProtocol(self, addr: IAddress | None) -> RelayProtocol:  # type: ignore[override]
        return RelayProtocol(self)

    def session_ended(self, session: RelayProtocol) -> None:
        self.sessions.discard(session)
        # Nothing to finish unless a drain is under way (most sessions end
        # with none).
        if not self.sessions and (self._drained or self._give_up_call is not None):
            self._finish_drain()

    def _finish_drain(self) -> None:
        if self._give_up_call is not None and self._give_up_call.active():
            self._give_up_call.cancel()
        self._give_up_call = None
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def load_changed(self) -> None:
        """A session was admitted or released: enter or leave the stressed state.

        On a change every open session re-derives its idle limit once; the
        gap between entering and leaving (L{smtpproxy.policy.pressure}) keeps that
        from happening on every connection at the threshold.
        """
        counter = self.guard.connections
        if not self.stressed and counter.total < ENTER * counter.max_total:
            # Calm and below the threshold, as nearly always: no change.
            return
        now = stressed(counter.total, counter.max_total, self.stressed)
        if now == self.stressed:
            return
        self.stressed = now
        s = self.settings
        self.idle_limits = idle_limits(s.greeting_timeout, s.command_timeout, now)
        log.warn(
            "session table nearly full: idle limits shortened"
            if now
            else "session table has room again: idle limits restored",
            sessions=counter.total,
            max_sessions=counter.max_total,
            greeting_timeout=self.idle_limits.greeting,
            command_timeout=self.idle_limits.command,
        )
        for session in list(self.sessions):
            session.apply_idle_limits()

    def shutdown(self, timeout: float) -> defer.Deferred[None]:
        """Close idle sessions now, the rest after their transaction; force after C{timeout}.

        The result fires at most C{timeout} + L{FORCE_GRACE} seconds later,
        whatever state the sessions are in (see L{_give_up}).
        """
        self.stopping = True
        for session in list(self.sessions):
            _guarded(session, session.shutdown)
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        timer = self.reactor.callLater(timeout, self._force_close)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        d.addCallback(cancel_timer)
        return d

    def _force_close(self) -> None:
        self._give_up_call = self.reactor.callLater(FORCE_GRACE, self._give_up)
        for session in list(self.sessions):
            log.warn("closing session still busy at shutdown", session=session.id)
            _guarded(session, session.force_close)

    def _give_up(self) -> None:
        """Stop waiting for sessions that were aborted but never reported their end.

        An aborted TCP connection reports its end on the next reactor turn,
        so this only happens when a transport is broken (as a TLS layer that
        failed to start once was); waiting for it would keep the process
        from ever exiting.
        """
        if not self.sessions:
            return
        log.warn("stopping without sessions that did not end", sessions=len(self.sessions))
        for session in list(self.sessions):
            _guarded(session, session._tcp.abortConnection)
        self.sessions.clear()
        self._finish_drain()


def _guarded(session: RelayProtocol, action: Callable[[], object]) -> None:
    """Run a shutdown step for one session; its failure must not stop the others."""
    try:
        action()
    except Exception as e:
        log.warn("session shutdown step failed", session=session.id, error=repr(e))


def _looks_like_bdat(line: bytes | bytearray) -> bool:
    """Does this command line (however malformed) start with the verb BDAT?"""
    return bytes(line[:16]).lstrip(b" \t")[:4].upper() == b"BDAT"
