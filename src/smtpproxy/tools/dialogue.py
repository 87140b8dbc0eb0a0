"""The client side of an SMTP dialogue, without I/O: replies, capabilities, AUTH, DATA.

C{smtpproxy probe} and C{smtpproxy send} talk to servers over sockets; what
they make of the bytes lives here, as plain functions over plain values,
so every rule is tested without a socket:

  - L{ReplyAssembler} joins the lines of a multi-line reply (C{250-...},
    C{250 ...}) into one L{Reply}, bounded in lines and line length;
  - L{parse_ehlo} reads an EHLO reply into L{Capabilities} (SIZE,
    PIPELINING, AUTH mechanisms, STARTTLS, SMTPUTF8, CHUNKING, 8BITMIME,
    DSN, ...), where a raw list of lines would leave each caller to parse
    it again;
  - L{choose_mechanism}, L{plain_response} and L{login_responses} pick and
    encode SASL PLAIN or LOGIN as the server offers them, in UTF-8 (a
    password is text, not Latin-1);
  - L{dot_stuff} turns a message into the bytes DATA sends: CRLF line ends
    and a second dot before every line that starts with one (RFC 5321
    4.5.2), over the whole message at once, so no line escapes because it
    fell on a buffer boundary;
  - L{redact} keeps credentials out of a printed transcript.

Every function is linear in its input: string methods and bounded loops,
no regular expressions over server text.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "MAX_REPLY_LINES",
    "Capabilities",
    "Reply",
    "ReplyAssembler",
    "ReplyError",
    "choose_mechanism",
    "dot_stuff",
    "login_responses",
    "parse_ehlo",
    "plain_response",
    "redact",
]

#: A reply longer than this is not a server talking SMTP (RFC 5321's limit
#: for one reply line is 512 octets; EHLO replies run to a few dozen lines).
MAX_REPLY_LINES = 500
MAX_LINE_BYTES = 4096

#: The mechanisms the tools can use, best first: PLAIN sends everything in
#: one step (fewer round trips) and, like LOGIN, only ever over TLS.
MECHANISMS = ("PLAIN", "LOGIN")


class ReplyError(Exception):
    """The server sent something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply: its code and the text of each line (without the code)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The lines joined by spaces, for a one-line report."""
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def wire(self) -> list[str]:
        """The reply as the server sent it, one string per line (C{250-...}, C{250 ...})."""
        last = len(self.lines) - 1
        return [
            f"{self.code}{' ' if i == last else '-'}{line}".rstrip()
            for i, line in enumerate(self.lines)
        ]


class ReplyAssembler:
    """Feed it one line at a time; it returns a L{Reply} when the last line arrives.

    A reply line is three digits, then a space (last line) or a dash (more
    to come), then text.  A line without a code, a continuation whose code
    differs from the first line's, or more than L{MAX_REPLY_LINES} lines
    raise L{ReplyError}: the tools stop rather than guess.
    """

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[str] = []

    def feed(self, raw: bytes) -> Reply | None:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if len(line) > MAX_LINE_BYTES:
            raise ReplyError(f"reply line of {len(line)} bytes")
        head = line[:3]
        separator = line[3:4]
        if len(head) != 3 or not head.isdigit() or separator not in (b"", b" ", b"-"):
            raise ReplyError(f"not an SMTP reply line: {_shown(line)}")
        code = int(head)
        if self._code is not None and code != self._code:
            raise ReplyError(f"reply code changed from {self._code} to {code} within one reply")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ReplyError(f"a reply of more than {MAX_REPLY_LINES} lines")
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code, self._lines = None, []
        return reply


def _shown(line: bytes) -> str:
    """A server's line for an error message: short and printable."""
    text = line[:80].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an EHLO reply says the server can do.

    @ivar name: the host name the server gives in the first line.
    @ivar size: SIZE's limit in bytes; C{0} when SIZE names none, C{None}
        when SIZE is not offered.
    @ivar auth: the SASL mechanisms offered, upper case, in the server's order.
    @ivar other: every other keyword line as sent (VRFY, XCLIENT, ...).
    """

    name: str = ""
    size: int | None = None
    pipelining: bool = False
    starttls: bool = False
    auth: tuple[str, ...] = ()
    smtputf8: bool = False
    chunking: bool = False
    binarymime: bool = False
    eightbitmime: bool = False
    dsn: bool = False
    enhancedstatuscodes: bool = False
    requiretls: bool = False
    other: tuple[str, ...] = field(default=())

    def summary(self) -> list[str]:
        """The capabilities as short words, in a fixed order (for a one-line report)."""
        words: list[str] = []
        if self.size is not None:
            words.append(f"SIZE {self.size}" if self.size else "SIZE")
        flags = (
            ("PIPELINING", self.pipelining),
            ("STARTTLS", self.starttls),
            ("8BITMIME", self.eightbitmime),
            ("SMTPUTF8", self.smtputf8),
            ("CHUNKING", self.chunking),
            ("BINARYMIME", self.binarymime),
            ("DSN", self.dsn),
            ("ENHANCEDSTATUSCODES", self.enhancedstatuscodes),
            ("REQUIRETLS", self.requiretls),
        )
        words += [name for name, offered in flags if offered]
        if self.auth:
            words.append("AUTH " + " ".join(self.auth))
        return words + list(self.other)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "pipelining": self.pipelining,
            "starttls": self.starttls,
            "auth": list(self.auth),
            "smtputf8": self.smtputf8,
            "chunking": self.chunking,
            "binarymime": self.binarymime,
            "8bitmime": self.eightbitmime,
            "dsn": self.dsn,
            "enhancedstatuscodes": self.enhancedstatuscodes,
            "requiretls": self.requiretls,
            "other": list(self.other),
        }


_FLAGS = {
    "PIPELINING": "pipelining",
    "STARTTLS": "starttls",
    "SMTPUTF8": "smtputf8",
    "CHUNKING": "chunking",
    "BINARYMIME": "binarymime",
    "8BITMIME": "eightbitmime",
    "DSN": "dsn",
    "ENHANCEDSTATUSCODES": "enhancedstatuscodes",
    "REQUIRETLS": "requiretls",
}


def parse_ehlo(lines: Sequence[str]) -> Capabilities:
    """Read the lines of a 250 EHLO reply (as in L{Reply.lines}).

    Keywords are case-insensitive (RFC 5321 4.1.1.1).  C{AUTH=PLAIN LOGIN},
    the form some old servers send beside (or instead of) C{AUTH PLAIN
    LOGIN}, counts as the same offer.  A SIZE value that is not a number is
    kept as C{SIZE} without a limit rather than failing the whole reply.
    """
    if not lines:
        return Capabilities()
    name = lines[0].split(" ", 1)[0]
    found: dict[str, bool] = {}
    size: int | None = None
    auth: list[str] = []
    other: list[str] = []
    for line in lines[1:]:
        keyword, _, rest = line.strip().partition(" ")
        upper = keyword.upper()
        if upper.startswith("AUTH="):
            rest = upper[5:] + " " + rest
            upper = "AUTH"
        if upper in _FLAGS:
            found[_FLAGS[upper]] = True
        elif upper == "SIZE":
            value = rest.strip()
            size = int(value) if value.isdigit() and len(value) < 20 else 0
        elif upper == "AUTH":
            for mechanism in rest.upper().split():
                if mechanism not in auth:
                    auth.append(mechanism)
        elif upper:
            other.append(line.strip())
    return Capabilities(name=name, size=size, auth=tuple(auth), other=tuple(other), **found)


def choose_mechanism(offered: Iterable[str]) -> str | None:
    """The best of L{MECHANISMS} that the server offers, or C{None}."""
    wanted = {m.upper() for m in offered}
    for mechanism in MECHANISMS:
        if mechanism in wanted:
            return mechanism
    return None


def plain_response(user: str, password: str) -> bytes:
    """SASL PLAIN's one message (RFC 4616), base64: no authorization identity.

    An empty authorization identity asks to act as the user itself, which
    every server accepts; naming it again is refused by some.
    """
    message = b"\x00" + user.encode("utf-8") + b"\x00" + password.encode("utf-8")
    return base64.b64encode(message)


def login_responses(user: str, password: str) -> tuple[bytes, bytes]:
    """LOGIN's two answers (user name, then password), base64, UTF-8 inside."""
    return (
        base64.b64encode(user.encode("utf-8")),
        base64.b64encode(password.encode("utf-8")),
    )


def redact(line: str, *, in_auth: bool) -> str:
    """A client line fit for a transcript: credentials replaced.

    @param in_auth: the line answers a 334 challenge (a LOGIN user name or
        password, a PLAIN response sent after an empty challenge).
    """
    if in_auth:
        return "*** (credentials hidden)"
    verb, _, rest = line.partition(" ")
    if verb.upper() == "AUTH":
        mechanism, _, initial = rest.partition(" ")
        return f"AUTH {mechanism} ***" if initial else f"AUTH {mechanism}"
    return line


def dot_stuff(message: bytes) -> bytes:
    """The bytes DATA sends for C{message}, without the final C{.} line.

    Every line end becomes CRLF (a bare LF or bare CR too: a server reading
    them differently is how SMTP smuggling starts), every line that starts
    with a dot gets a second one, and the result ends with CRLF so that the
    terminating C{.CRLF} stands on a line of its own.
    """
    if not message:
        return b""
    # Normalise line ends: CRLF stays, then lone CR and lone LF become CRLF.
    normalised = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    stuffed = normalised.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed
