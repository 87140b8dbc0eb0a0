"""The upstream SMTP conversation's pure parts: no sockets, no reactor.

What goes on the wire (MAIL and RCPT lines with their parameters, the body
with its line ends made CRLF and its dots stuffed), how the upstream's
capabilities and replies are read, and what its replies mean for our own
client (L{outcome}).  L{smtpproxy.providers.smtp.client} moves these bytes;
every decision about them is made here, where a test needs no server.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import (
    AllRefusedPermanentError,
    AllRefusedTemporaryError,
    PartlyDeferredError,
    RecipientRefusal,
    whole_message_deferral,
)

#: How much of an upstream reply's text is passed on to our client and logs.
MAX_REPLY_TEXT = 300
#: A reply longer than this many lines, or bytes, is a broken or hostile
#: upstream; the connection is dropped rather than the reply stored.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


# --- replies ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete (possibly multi-line) reply from the upstream.

    @ivar lines: the text of each line, after the code and separator.
    """

    code: int
    lines: tuple[bytes, ...] = ()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def status(self) -> str | None:
        """The enhanced status code (RFC 3463) the first line starts with, if any."""
        first = self.lines[0].decode("ascii", "replace") if self.lines else ""
        match = _STATUS.match(first)
        return ".".join(match.groups()) if match else None

    @property
    def text(self) -> str:
        """The reply's human text: one line of printable ASCII, clipped, status removed.

        The upstream is not ours to trust: its text reaches our client's
        reply and our log, so line breaks and control characters become
        blanks (no reply or log line can be split) and the length is
        bounded.
        """
        parts = []
        for number, raw in enumerate(self.lines):
            line = raw.decode("utf-8", "replace")
            match = _STATUS.match(line)
            if match and (number == 0 or ".".join(match.groups()) == self.status):
                line = line[match.end() :]
            parts.append(_UNPRINTABLE.sub(" ", line).strip())
        text = " ".join(part for part in parts if part)
        if len(text) > MAX_REPLY_TEXT:
            text = text[: MAX_REPLY_TEXT - 3] + "..."
        return text

    def __str__(self) -> str:
        status = self.status
        return f"{self.code} {status} {self.text}" if status else f"{self.code} {self.text}"


class ReplyError(ValueError):
    """The upstream broke the reply syntax; the connection cannot be trusted."""


class ReplyReader:
    """Assembles replies from lines (RFC 5321 4.2), strictly and within bounds.

    Twisted's client takes C{int(line[:3])} (so C{" 25"} or C{"+25"} pass as
    codes), never checks that a continuation keeps the code it started with,
    and appends continuation lines without limit.
    """

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, line: bytes) -> Reply | None:
        """Take one line (without its CRLF); the reply once its last line came."""
        head, separator = line[:3], line[3:4]
        if not (len(head) == 3 and head.isdigit() and head[:1] in b"2345"):
            raise ReplyError(f"not a reply line: {_shown(line)}")
        if separator not in (b"", b" ", b"-"):
            raise ReplyError(f"not a reply line: {_shown(line)}")
        code = int(head)
        if self._code is not None and code != self._code:
            raise ReplyError(f"reply code changed within a reply: {_shown(line)}")
        self._code = code
        self._size += len(line)
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES or self._size > MAX_REPLY_BYTES:
            raise ReplyError("reply too long")
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code, self._lines, self._size = None, [], 0
        return reply


def _shown(line: bytes) -> str:
    return _UNPRINTABLE.sub("?", line[:60].decode("ascii", "replace"))


# --- capabilities -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the upstream's EHLO reply offers (keywords compared without case).

    @ivar size: SIZE's value: the largest message in bytes, 0 for "no
        fixed limit", None when SIZE was not offered.
    """

    keywords: frozenset[str] = frozenset()
    size: int | None = None
    auth: tuple[str, ...] = ()

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def eight_bit(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords


def parse_capabilities(lines: Sequence[bytes]) -> Capabilities:
    """The capabilities in an EHLO reply's lines (the first, the server's name, skipped).

    RFC 5321 makes keywords case-insensitive; Twisted's client looks up
    C{b"STARTTLS"} and C{b"AUTH"} as written, so a server announcing
    C{starttls} looks to it as if it had no TLS.  The pre-standard
    C{AUTH=PLAIN LOGIN} form some servers still send counts as AUTH.
    """
    keywords: set[str] = set()
    size: int | None = None
    auth: list[str] = []
    for raw in lines[1:]:
        words = raw.decode("ascii", "replace").split()
        if not words:
            continue
        keyword = words[0].upper()
        if keyword.startswith("AUTH="):
            words = ["AUTH", keyword[5:], *words[1:]]
            keyword = "AUTH"
        keywords.add(keyword)
        if keyword == "SIZE":
            size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        elif keyword == "AUTH":
            auth += [w.upper() for w in words[1:] if w.upper() not in auth]
    return Capabilities(frozenset(keywords), size, tuple(auth))


# --- the transaction --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transaction:
    """One message as the upstream will see it: commands and the encoded body.

    @ivar whole_message: the caller cannot retry recipients one by one
        (direct mode, and the default, as for L{Email.per_recipient_retry}):
        while any recipient is deferred, the body must not be sent to the
        others (L{held_back}).
    """

    mail: bytes
    recipients: tuple[str, ...]
    rcpts: tuple[bytes, ...]
    body: bytes = field(repr=False)
    whole_message: bool = True


def plan(email: Email, capabilities: Capabilities) -> Transaction:
    """The commands and body that relay C{email} to an upstream with C{capabilities}.

    @raise PermanentDeliveryError: the message cannot go to this upstream
        as it is: larger than its SIZE, 8-bit content where it has no
        8BITMIME, or UTF-8 addresses where it has no SMTPUTF8.  Converting
        the message would break the promise to relay it unchanged, so it is
        refused before anything is sent (RFC 6152 3, RFC 6531 3.5).
    """
    size = len(email.raw)
    if capabilities.size and size > capabilities.size:
        raise PermanentDeliveryError(
            f"message of {size} bytes exceeds the upstream's limit of {capabilities.size}",
            "5.3.4",
            552,
        )
    addresses = (email.envelope_from, *email.envelope_to)
    utf8_addresses = not all(address.isascii() for address in addresses)
    if utf8_addresses and not capabilities.smtputf8:
        raise PermanentDeliveryError(
            "the upstream does not accept internationalised addresses (no SMTPUTF8)",
            "5.6.7",
            553,
        )
    eight_bit = not email.raw.isascii()
    if eight_bit and not capabilities.eight_bit:
        raise PermanentDeliveryError(
            "the message has 8-bit content and the upstream does not accept it (no 8BITMIME)",
            "5.6.3",
            554,
        )
    parameters = []
    if capabilities.size is not None:
        parameters.append(f"SIZE={size}")
    if eight_bit:
        parameters.append("BODY=8BITMIME")
    if capabilities.smtputf8 and (utf8_addresses or _utf8_header(email.raw)):
        parameters.append("SMTPUTF8")
    dsn = email.dsn if capabilities.dsn else None
    if dsn is not None:
        if dsn.ret:
            parameters.append(f"RET={dsn.ret}")
        if dsn.envid:
            parameters.append(f"ENVID={xtext(dsn.envid)}")
    mail = _command("MAIL FROM:", email.envelope_from, parameters)
    by_address = {r.address: r for r in dsn.recipients} if dsn is not None else {}
    rcpts = tuple(
        _command("RCPT TO:", address, _recipient_parameters(by_address.get(address)))
        for address in email.envelope_to
    )
    return Transaction(
        mail,
        tuple(email.envelope_to),
        rcpts,
        encode_body(email.raw),
        whole_message=not email.per_recipient_retry,
    )


def _command(verb: str, address: str, parameters: Sequence[str]) -> bytes:
    # The address goes out as the client gave it (already checked by our
    # server): Twisted's quoteaddr() runs it through email.utils.parseaddr,
    # which turns "a b"@example.com into a b@example.com and cannot encode
    # a UTF-8 address at all.
    line = f"{verb}<{address}>"
    if parameters:
        line += " " + " ".join(parameters)
    return line.encode("utf-8")


def _recipient_parameters(dsn: RecipientDsn | None) -> list[str]:
    if dsn is None:
        return []
    parameters = []
    if dsn.notify:
        parameters.append(f"NOTIFY={','.join(dsn.notify)}")
    if dsn.orcpt is not None:
        kind, original = dsn.orcpt
        # xtext carries octets; an ORCPT of type utf-8 (RFC 6533) has its
        # own encoding and is left out rather than mis-encoded.
        if original.isascii() and kind != "utf-8":
            parameters.append(f"ORCPT={kind};{xtext(original)}")
    return parameters


def xtext(text: str) -> str:
    """RFC 3461 4 xtext: C{!} to C{~} but C{+} and C{=} as themselves, others as C{+HH}."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else f"+{byte:02X}"
        for char in text
        for byte in char.encode("utf-8")
    )


def _utf8_header(raw: bytes) -> bool:
    """Does the header block hold UTF-8 (an RFC 6532 message, which needs SMTPUTF8)?"""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    if head.isascii():
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False  # raw 8-bit of some other charset: not RFC 6532
    return True


def encode_body(raw: bytes) -> bytes:
    """C{raw} as sent after DATA: CRLF line ends, dots stuffed, the end marker added.

    Twisted's C{transformChunk} replaces every LF by CRLF, so a message
    that already has CRLF (every message received over SMTP) goes out with
    CR CR LF; it stuffs a dot only after a CRLF inside one chunk, missing a
    dot on the first line and one at the start of any later chunk.  Here
    the whole body is encoded at once.  A bare CR or LF becomes CRLF (RFC
    5321 2.3.8 forbids sending them): an upstream that ends lines at a bare
    LF would otherwise read C{LF . LF}, which our server took as content,
    as the end of the message (SMTP smuggling).  A message with CRLF line
    ends throughout is relayed byte for byte.
    """
    if not raw:
        return b".\r\n"
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raw = _LINE_ENDS.sub(b"\r\n", raw)
    stuffed = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n..")[2:]
    return stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")


def decode_body(data: bytes) -> bytes:
    """The inverse of L{encode_body} for CRLF bodies: what a server stores (for tests and sinks)."""
    if data.endswith(b"\r\n.\r\n"):
        data = data[:-3]
    elif data == b".\r\n":
        return b""
    return (b"\r\n" + data).replace(b"\r\n..", b"\r\n.")[2:]


# --- what the replies mean ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """The upstream took the message for these recipients; the others it refused."""

    accepted: tuple[str, ...]
    refused: tuple[tuple[str, Reply], ...]
    reply: Reply


def failure(reply: Reply, stage: str, refused: tuple[RecipientRefusal, ...] = ()) -> DeliveryError:
    """The delivery error that carries the upstream's C{reply} to our client.

    4xx (and anything odd) -> try again later with the upstream's text and
    status; 5xx -> the same class of permanent failure.  With C{refused}
    (every recipient refused), the error also names each recipient's reply
    (L{smtpproxy.providers.result.AllRefusedError}).
    """
    reason = f"upstream {stage}: {reply.text}" if reply.text else f"upstream {stage}: {reply.code}"
    status = reply.status
    if 500 <= reply.code < 600:
        status = status if status and status[0] == "5" else "5.0.0"
        if refused:
            return AllRefusedPermanentError(reason, status, reply.code, refused)
        return PermanentDeliveryError(reason, status, reply.code)
    status = status if status and status[0] == "4" else "4.0.0"
    if refused:
        return AllRefusedTemporaryError(reason, status, 451, refused)
    return TransientDeliveryError(reason, status)


def refusal(address: str, reply: Reply) -> RecipientRefusal:
    """One recipient's refusal, as providers report it."""
    return RecipientRefusal(address, reply.code, reply.status or "", reply.text)


def held_back(
    transaction: Transaction, mail: Reply, rcpts: Sequence[Reply]
) -> PartlyDeferredError | None:
    """Once every RCPT is answered: must the body be kept from the upstream?

    Only for a L{Transaction.whole_message} whose sender was accepted; the
    verdict is L{whole_message_deferral}'s over the recipients' replies.
    The client then ends the transaction before the end of DATA (RFC 5321
    4.1.1.4: the upstream keeps nothing it did not get the final dot for).
    """
    if not transaction.whole_message or not mail.positive:
        return None
    accepted = tuple(
        r for r, reply in zip(transaction.recipients, rcpts, strict=True) if reply.positive
    )
    refused = tuple(
        refusal(r, reply)
        for r, reply in zip(transaction.recipients, rcpts, strict=True)
        if not reply.positive
    )
    return whole_message_deferral(accepted, refused)


def outcome(
    recipients: Sequence[str],
    mail: Reply,
    rcpts: Sequence[Reply],
    data: Reply | None,
    final: Reply | None,
) -> Delivered:
    """Judge one transaction from its replies (None: that stage was never reached).

    @raise DeliveryError: nothing was delivered; the error carries the reply
        that decided it.  When every recipient was refused, a temporary
        refusal wins over a permanent one (our client hears 4xx: retrying
        can still help those; 5xx only when all were 5xx), and the error is
        an L{smtpproxy.providers.result.AllRefusedError} naming each recipient's
        reply, so the queue fails the 5xx ones at once and retries the rest.
    """
    if not mail.positive:
        raise failure(mail, "refused the sender")
    refused = tuple(
        (r, reply) for r, reply in zip(recipients, rcpts, strict=True) if not reply.positive
    )
    accepted = tuple(r for r, reply in zip(recipients, rcpts, strict=True) if reply.positive)
    if not accepted:
        temporary = [reply for _, reply in refused if reply.code < 500]
        raise failure(
            (temporary or [reply for _, reply in refused])[0],
            "refused every recipient",
            tuple(refusal(address, reply) for address, reply in refused),
        )
    if data is None or data.code != 354:
        raise failure(data or Reply(451, (b"no reply to DATA",)), "refused DATA")
    if final is None or not 200 <= final.code < 300:
        raise failure(final or Reply(451, (b"no reply after the message",)), "refused the message")
    return Delivered(accepted, refused, final)


def dsn_recipients(dsn: Dsn | None) -> int:
    """How many recipients carried DSN parameters (for the log)."""
    return 0 if dsn is None else len(dsn.recipients)
