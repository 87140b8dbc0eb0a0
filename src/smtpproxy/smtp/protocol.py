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

The class is assembled from parts, one module each (L{smtpproxy.smtp.base}
lists them); this module holds the connection's start and end, the command
dispatch, the effects table and STARTTLS.  L{smtpproxy.smtp.factory} builds
the sessions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.logger import LogLevel
from twisted.mail.smtp import ESMTP
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpproxy import tlsevents
from smtpproxy.errors import Reply
from smtpproxy.policy.rules import client_name
from smtpproxy.smtp.base import log
from smtpproxy.smtp.closing import Closing, cancel_for_gone_client
from smtpproxy.smtp.commands import CommandError, split_command
from smtpproxy.smtp.envelope import Envelope
from smtpproxy.smtp.idle import IdleTimer
from smtpproxy.smtp.inputloop import InputLoop, looks_like_bdat
from smtpproxy.smtp.intake import Intake
from smtpproxy.smtp.logins import Logins
from smtpproxy.smtp.output import Output
from smtpproxy.smtp.sendnow import writer_for
from smtpproxy.smtp.session import (
    ERROR,
    Abandon,
    CheckAuthBlocked,
    CheckRecipient,
    CheckSender,
    Close,
    Greeted,
    Login,
    OpenData,
    Outcome,
    ReadChunk,
    Say,
    Session,
    StartTLS,
    ValidateRecipient,
)

# Re-exported: the settings are built with the listener's factory.
from smtpproxy.smtp.session import SessionSettings as SessionSettings
from smtpproxy.smtp.session import session_settings as session_settings

if TYPE_CHECKING:
    from smtpproxy.smtp.factory import RelayFactory

# RFC 5321 4.5.3.1.4: 512 octets including CRLF.  AUTH lines may be longer
# (see smtpproxy.smtp.inputloop.MAX_AUTH_LINE) since they carry base64
# credentials.
MAX_COMMAND_LINE = 510


_sessions = itertools.count(1)


@implementer(IHandshakeListener)
class RelayProtocol(Logins, Intake, Envelope, Closing, InputLoop, Output, IdleTimer):
    """One SMTP session."""

    # Stock SMTP logs every sender and recipient through the legacy logger
    # when noisy; we log one structured line per message instead.
    noisy = False
    #: The front door whose TLS handshake is under way (L{tlsevents}), if any.
    _tls_door: str | None = None

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
        # attributes declared in smtpproxy.smtp.base (a session is built per
        # connection, so each assignment saved counts).
        self._input = bytearray()
        self.session = Session(settings, "")
        self._pending: list[bytes] = []

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
            self._tls_door = "smtps"
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

        Also called after STARTTLS, where there is nothing to do but count it.
        """
        if self._tls_door is not None:
            tlsevents.completed(self._tls_door, self._tcp)
            self._tls_door = None
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
        if self._tls_door is not None:
            tlsevents.ended(self._tls_door, reason)
        self._abandon(self.session.tx)
        self._ended = True
        # Closing first: a delivery given up below answers at once, and a
        # closing session neither replies nor re-arms its timer then.
        self._closing = True
        pending = self._delivering
        self._give_up_delivery()
        cancel_for_gone_client(self.id, pending)
        self._drop_avatar()
        self.setTimeout(None)
        self._release_slot()
        self.factory.load_changed()
        self.factory.session_ended(self)
        if self.settings.log_sessions:
            log.debug("session closed", session=self.id, client=self._peer)

    # -- commands ---------------------------------------------------------

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
        if self._stopping and verb != "QUIT" and self._stop_if_shutting_down():
            return
        name = _HANDLERS.get(verb)
        if name is None:
            self._refuse_line(line, Reply(500, "5.5.2", "Command not recognized"))
            return
        getattr(self, name)(argument)

    def _refuse_line(self, line: bytes, reply: Reply) -> None:
        """A command line turned down before any handler saw it: a client mistake."""
        if looks_like_bdat(line):
            self._refuse_bdat_line(reply)
            return
        self.reply(reply, counts_as=ERROR)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return self.session.extensions()

    def _run(self, outcome: Outcome) -> None:
        """Carry out what the session decided: send its replies, run its effects."""
        for action in outcome:
            if type(action) is not Say:
                _EFFECTS[type(action)](self, action)
            elif action.counts_as is None:
                # Most replies: a line formatted once, no budget to charge
                # (EHLO's with its keyword lines).
                self._send(self._said(action) if action.keywords else action.wire)
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

    def do_RCPT(self, argument: str) -> None:
        self._run(self.session.rcpt(argument))

    def do_DATA(self, argument: str) -> None:
        self._run(self.session.data(argument))

    def do_BDAT(self, argument: str) -> None:
        """Read the announced chunk, then answer: every readable BDAT consumes its octets."""
        self._run(self.session.bdat(argument))

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
        self._tls_door = "starttls"
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
