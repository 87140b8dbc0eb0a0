"""A small SMTP client protocol for the probe: send a line, wait for the reply.

Why not Twisted's C{twisted.mail.smtp.ESMTPClient}?  It is a machine for
delivering one message: it moves to the next state by itself, turns every
refusal into an error that ends the session, and keeps what the server
said only in a short log of raw lines.  The probe needs the opposite: to
stop after each step and look (the raw greeting, both EHLO replies, the
TLS session the handshake produced), to carry on after an AUTH refusal so
the report still ends with QUIT, and to time each step.  So the probe
drives this protocol from an C{async} function, one command at a time;
C{smtpproxy send}, which does deliver a message, uses the stock client
(L{smtpproxy.tools.send}).

The protocol is a L{LineReceiver}; replies are assembled by the pure
L{smtpproxy.tools.dialogue.ReplyAssembler}.  Every wait is bounded by the
caller's timeout, and a lost connection fails whatever is waiting.
"""

from __future__ import annotations

from typing import Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpproxy.tools.connect import TLSFacts, session_facts
from smtpproxy.tools.dialogue import MAX_LINE_BYTES, Reply, ReplyAssembler, ReplyError, redact

__all__ = ["ProbeProtocol", "Transcript"]

#: Lines of dialogue kept for the report; a server that talks more is cut.
MAX_TRANSCRIPT = 400


class TLSCapableTransport(Protocol):
    """What the probe uses of its transport: TCP's, TLS's once started."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def startTLS(self, contextFactory: IOpenSSLClientConnectionCreator) -> None: ...
    def getHandle(self) -> object: ...


class ProbeError(Exception):
    """The connection ended or misbehaved while a step waited for it."""


Transcript = list[tuple[str, str]]


@implementer(IHandshakeListener)
class ProbeProtocol(LineReceiver):
    """Lines in, L{Reply} values out; commands sent one at a time."""

    # Servers end lines with CRLF; splitting at LF and dropping the CR also
    # copes with one that sends a bare LF, which a probe should report on
    # rather than hang over.
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_BYTES + 2

    def __init__(self) -> None:
        self.transcript: Transcript = []
        self._assembler = ReplyAssembler()
        self._replies: list[Reply] = []
        self._waiting: Deferred[Reply] | None = None
        self._handshake: Deferred[TLSFacts | None] | None = None
        self._ended: Failure | BaseException | None = None
        self._in_auth = False

    # -- Twisted's side ------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = self._assembler.feed(line)
        except ReplyError as e:
            self._note("S", line.rstrip(b"\r").decode("utf-8", "replace")[:200])
            self._end(ProbeError(str(e)))
            self.tcp.loseConnection()
            return
        if reply is None:
            return
        for text in reply.wire():
            self._note("S", text)
        self._in_auth = reply.code == 334
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._end(ProbeError(f"the server sent a line longer than {MAX_LINE_BYTES} bytes"))
        self.tcp.loseConnection()

    def handshakeCompleted(self) -> None:
        if self._handshake is not None:
            waiting, self._handshake = self._handshake, None
            waiting.callback(session_facts(self.tcp.getHandle()))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._end(reason if reason is not None else ConnectionDone())

    @property
    def tcp(self) -> TLSCapableTransport:
        """The transport, typed as what this protocol uses of it."""
        return cast(TLSCapableTransport, self.transport)

    # -- the probe's side ----------------------------------------------------

    def expect_handshake(self) -> Deferred[TLSFacts | None]:
        """Fires with the session's facts once the TLS handshake completes."""
        self._handshake = Deferred()
        return self._handshake

    def next_reply(self) -> Deferred[Reply]:
        """The next complete reply (the greeting, or the answer to a command)."""
        if self._replies:
            return succeed(self._replies.pop(0))
        if self._ended is not None:
            failed: Deferred[Reply] = Deferred()
            failed.errback(self._ended)
            return failed
        self._waiting = Deferred()
        return self._waiting

    def command(self, line: str, *, shown: str | None = None) -> Deferred[Reply]:
        """Send one command line and wait for its reply.

        @param shown: the line as the transcript should show it (credentials
            hidden); by default L{redact} decides.
        """
        self._note("C", shown if shown is not None else redact(line, in_auth=self._in_auth))
        self.sendLine(line.encode("utf-8"))
        return self.next_reply()

    def start_tls(self, creator: IOpenSSLClientConnectionCreator) -> Deferred[TLSFacts | None]:
        """Switch the connection to TLS (after a 220 to STARTTLS); fires after the handshake."""
        handshake = self.expect_handshake()
        self.tcp.startTLS(creator)
        return handshake

    def _note(self, who: str, text: str) -> None:
        if len(self.transcript) < MAX_TRANSCRIPT:
            self.transcript.append((who, text))

    def _end(self, reason: Failure | BaseException) -> None:
        if self._ended is None:
            self._ended = reason
        for waiting in (self._waiting, self._handshake):
            if waiting is not None:
                waiting.errback(reason)
        self._waiting = self._handshake = None

    # LineReceiver splits at LF; a CRLF-terminated command needs the CR.
    def sendLine(self, line: bytes) -> None:
        self.tcp.write(line + b"\r\n")


class ProbeFactory(Factory):
    protocol = ProbeProtocol
