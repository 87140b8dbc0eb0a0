"""The Twisted side of C{smtpproxy send}: the stock ESMTP client, told about one message.

Kept apart from L{smtpproxy.tools.send} because C{twisted.mail.smtp} has no
annotations: this glue is checked with untyped calls allowed (see
pyproject.toml), the message builder and the command are not.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.mail import smtp
from zope.interface import implementer

from smtpproxy.tools import connect
from smtpproxy.tools.dialogue import dot_stuff, parse_ehlo, redact

__all__ = ["BuiltMessage", "Outcome", "SendClient", "SendOptions", "deliver"]

#: Kept from the dialogue for the report; DATA's content is never listed.
MAX_TRANSCRIPT = 400


@dataclass(frozen=True, slots=True)
class BuiltMessage:
    """The message's bytes (CRLF, not yet dot-stuffed) and its envelope."""

    data: bytes
    message_id: str
    envelope_from: str
    recipients: tuple[str, ...]


@implementer(smtp.IClientAuthentication)
class PlainAuthenticator:
    """SASL PLAIN without an authorization identity (RFC 4616: act as yourself)."""

    def __init__(self, user: bytes) -> None:
        self._user = user

    def getName(self) -> bytes:
        return b"PLAIN"

    def challengeResponse(self, secret: bytes, chal: object = 1) -> bytes:
        return b"\x00" + self._user + b"\x00" + secret


@dataclass
class Outcome:
    """What happened: the replies per recipient, DATA's reply, or why it stopped."""

    recipients: list[tuple[str, int, str]] = field(default_factory=list)
    code: int = -1
    reply: str = ""
    accepted: int = 0
    error: str | None = None
    tls: connect.TLSFacts | None = None
    transcript: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error is not None or not 200 <= self.code < 300 or not self.accepted:
            return "failed"
        return "sent" if self.accepted == len(self.recipients) else "partial"


@implementer(IHandshakeListener)
class SendClient(smtp.ESMTPClient):
    """The stock ESMTP client with one message, a transcript and a result Deferred."""

    # Twisted's line log would keep AUTH's base64 lines and print them in
    # error messages; the transcript below hides them instead.
    debug = False

    def __init__(
        self,
        message: BuiltMessage,
        done: Deferred[Outcome],
        *,
        user: str | None,
        password: str | None,
        context: object | None,
        require_tls: bool,
        helo: str,
        timeout: float,
    ) -> None:
        secret = password.encode("utf-8") if password is not None else None
        super().__init__(secret, context, helo)
        self._idle = timeout
        self.requireTransportSecurity = require_tls
        self.heloFallback = not require_tls and user is None
        if user is not None:
            self.requireAuthentication = True
            self.registerAuthenticator(PlainAuthenticator(user.encode("utf-8")))
            self.registerAuthenticator(smtp.LOGINAuthenticator(user.encode("utf-8")))
        self._message = message
        self._done = done
        self._sent = False
        self._in_auth = False
        self.outcome = Outcome()

    # Transcript: every line each side sends (credentials hidden).
    def sendLine(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self._note("C", redact(text, in_auth=self._in_auth))
        super().sendLine(line)

    def lineReceived(self, line: bytes) -> object:
        text = line.decode("utf-8", "replace")
        self._note("S", text)
        if text[3:4] != "-":
            self._in_auth = text.startswith("334")
            if text.startswith("354"):
                self._note("C", f"(the message: {len(self._message.data)} bytes, dot-stuffed)")
        return super().lineReceived(line)

    def connectionMade(self) -> None:
        super().connectionMade()
        # SMTPClient's idle timer, re-armed by every reply and by each chunk of DATA.
        self.setTimeout(self._idle)

    def handshakeCompleted(self) -> None:
        handle = cast(connect.HasHandle, self.transport).getHandle()
        self.outcome.tls = connect.session_facts(handle)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        capabilities = parse_ehlo(resp.decode("utf-8", "replace").splitlines())
        size = capabilities.size
        if size and len(self._message.data) > size:
            self._note("!", f"the message ({len(self._message.data)} bytes) is over SIZE {size}")
        super().esmtpState_serverConfig(code, resp)

    # The one message.
    def getMailFrom(self) -> str | None:
        if self._sent:
            return None
        self._sent = True
        return self._message.envelope_from

    def getMailTo(self) -> Sequence[str]:
        return self._message.recipients

    def getMailData(self) -> io.BytesIO:
        return io.BytesIO(dot_stuff(self._message.data))

    def transformChunk(self, chunk: bytes) -> bytes:
        # Already CRLF and dot-stuffed as a whole (see the module docstring).
        self.resetTimeout()
        return chunk

    def sentMail(
        self, code: int, resp: bytes | str, numOk: int, addresses: list[Any], log: object
    ) -> None:
        outcome = self.outcome
        outcome.code = code
        outcome.reply = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else resp
        outcome.accepted = numOk
        outcome.recipients = [
            (_text(address), rcode, _text(rresp)) for address, rcode, rresp in addresses
        ]
        if code < 0:  # no RCPT was accepted, so there was no DATA
            outcome.error = outcome.reply
        # The result is reported once the client has said QUIT and the
        # connection is gone (connectionLost), so the transcript is whole.

    def sendError(self, exc: Exception) -> None:
        # After DATA's reply the message's fate is known; a later error
        # (RSET or QUIT unanswered) does not change it.
        if self.outcome.error is None and self.outcome.code < 0:
            code = getattr(exc, "code", -1)
            resp = getattr(exc, "resp", b"")
            shown = _text(resp) if resp else type(exc).__name__
            self.outcome.error = f"{code} {shown}" if isinstance(code, int) and code > 0 else shown
        super().sendError(exc)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self.outcome.error is None and self.outcome.code < 0 and reason is not None:
            why = connect.describe_error(reason.value, 0)
            if "certificate" in why or "Verification" in type(reason.value).__name__:
                why += (
                    " (the certificate is not valid for this host: give --ca-file, or see it with "
                    "smtpproxy probe)"
                )
            self.outcome.error = "connection lost: " + why
        self._finish()

    def _finish(self) -> None:
        if not self._done.called:
            self._done.callback(self.outcome)

    def _note(self, who: str, text: str) -> None:
        if len(self.outcome.transcript) < MAX_TRANSCRIPT:
            self.outcome.transcript.append((who, text))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass
class SendOptions:
    target: connect.Target
    mode: str
    helo: str
    timeout: float
    ca_file: str | None = None
    verify: bool = True
    user: str | None = None
    password: str | None = None


async def deliver(reactor: IReactorTime, message: BuiltMessage, options: SendOptions) -> Outcome:
    """Connect, run one transaction, return what happened (never raises for the server's doing)."""
    host = options.target.host
    tls = None
    if options.mode != "plain":
        tls = (
            connect.verifying_tls(host, options.ca_file)
            if options.verify
            else connect.observing_tls(host)
        )
    done: Deferred[Outcome] = Deferred()

    def build() -> SendClient:
        return SendClient(
            message,
            done,
            user=options.user,
            password=options.password,
            context=tls if options.mode == "starttls" else None,
            require_tls=options.mode == "starttls",
            helo=options.helo,
            timeout=options.timeout,
        )

    factory = Factory.forProtocol(build)
    where = connect.endpoint(
        reactor, options.target, options.timeout, tls if options.mode == "tls" else None
    )
    started = time.perf_counter()
    try:
        await where.connect(factory)
    except Exception as e:
        return Outcome(error="connect: " + connect.describe_error(e, options.timeout))
    outcome = await done
    outcome.seconds = time.perf_counter() - started
    return outcome
