"""The stdout provider: print each message instead of sending it.

It is the default, so that the relay is useful (and testable) before any
credentials exist.  Each message becomes one block (C{text}) or one JSON line
(C{json}) written with a single C{write} call, so messages delivered at the
same time never interleave, even when several relays share one terminal or
log collector.  Nothing here touches the network.

Whoever can send mail decides what the message says, so the text block must
not let a message pass for something the relay printed: the block is framed
by lines carrying a random marker no sender can know in advance, every body
line starts with C{"| "}, and every value taken from the message is one line
with its control characters replaced.  A reader (or a script) that trusts
only unprefixed lines and the marker of the opening line cannot be fooled by
a body holding a fake separator, fake header lines or terminal escapes.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable
from email.utils import quote
from html.parser import HTMLParser
from typing import IO, TYPE_CHECKING, cast

from twisted.internet.defer import Deferred, fail, succeed

from smtpproxy.config import STDOUT_FORMATS
from smtpproxy.dsn import Dsn
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email, Mailbox

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config

DEFAULT_MAX_BODY_CHARS = 4000
# However many parts or defects a message has, the block stays short: the
# first few are listed, the rest counted.
MAX_LISTED_ATTACHMENTS = 50
MAX_LISTED_WARNINGS = 10
BODY_PREFIX = "| "

# Everything that could move a terminal's cursor or change its colours, or
# split a line for a reader: C0 controls (but tab and line feed), DEL, the C1
# controls, the Unicode line and paragraph separators, and the bidirectional
# overrides that reorder what a terminal shows.  Message content is
# untrusted, and an operator's terminal should not run it.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# Lone surrogates (undecodable bytes kept by Python's surrogateescape) have
# no UTF-8 form, and JSON readers disagree on what they mean.
_SURROGATES = re.compile("[\ud800-\udfff]")
_BLANK_LINES = re.compile(r"\n{3,}")
# The same set for ASCII text, as bytes for the quick test in _excerpt.
_ASCII_CONTROLS = bytes([*range(0, 9), *range(11, 32), 127])


def _excerpt(text: str) -> str:
    """C{text} with LF line ends, control characters neutralised, trailing space gone."""
    if text.isascii():
        # Bytes split lines only at CR, LF and CRLF, exactly the line ends
        # to normalise, and do it several times faster than str.replace.
        raw = b"\n".join(text.encode("ascii").splitlines())
        if len(raw.translate(None, _ASCII_CONTROLS)) == len(raw):
            return raw.decode("ascii").rstrip()
        text = raw.decode("ascii")
    elif "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("\ufffd", text).rstrip()


_PREFIXED_BREAK = ("\n" + BODY_PREFIX).encode("ascii")


def _prefixed_excerpt(text: str) -> str:
    """L{_excerpt} of C{text} with L{BODY_PREFIX} before every line.

    The result is exactly C{_excerpt}'s with the prefix added after each
    LF; for ASCII text the prefix goes in with the join that normalises the
    line ends, instead of a second pass over the excerpt to insert it.
    Stripping the trailing blanks and line ends before splitting leaves the
    same lines as stripping the joined text after: those characters are
    not in the control set, so the quick test decides as before.
    """
    if text.isascii():
        lines = text.encode("ascii").rstrip(b" \t\r\n").splitlines()
        raw = _PREFIXED_BREAK.join(lines)
        if len(raw.translate(None, _ASCII_CONTROLS)) == len(raw):
            return BODY_PREFIX + raw.decode("ascii")
    return BODY_PREFIX + _excerpt(text).replace("\n", "\n" + BODY_PREFIX)


class StdoutProvider:
    """Writes a human-readable summary of each message to a stream.

    @param stream: where to write; text or binary (binary streams get
        UTF-8).  Defaults to whatever C{sys.stdout} is when the provider is
        built.
    @param max_body_chars: how much of the body to show; the rest is
        summarised by a note saying how much was cut.
    @param output_format: C{"text"} (a framed block for people) or
        C{"json"} (one JSON object per line, for scripts).
    """

    name = "stdout"
    # An abandoned parse prints as envelope, size and the warning saying so.
    accepts_raw_mime = True
    # It prints what the parser made of the bytes; no byte is refused.
    binary_mime = True

    def __init__(
        self,
        stream: IO[str] | IO[bytes] | None = None,
        max_body_chars: int = DEFAULT_MAX_BODY_CHARS,
        output_format: str = "text",
    ) -> None:
        if output_format not in STDOUT_FORMATS:
            raise ValueError(f"unknown stdout format {output_format!r}")
        self._stream: IO[str] | IO[bytes] = sys.stdout if stream is None else stream
        self._max_body_chars = max_body_chars
        self._render = render_json if output_format == "json" else render
        self._write = _writer(self._stream)

    def send(self, email: Email) -> Deferred[None]:
        """Print C{email}; fails only when the stream itself cannot be written to."""
        block = self._render(email, self._max_body_chars)
        try:
            self._write(block)
            self._stream.flush()
        except (OSError, ValueError) as error:
            # A closed stdout (BrokenPipeError, "I/O operation on closed
            # file"): the message was not shown anywhere, so it was not
            # delivered, and the client should keep it and retry.
            return fail(
                TransientDeliveryError(f"stdout is not writable ({type(error).__name__})", "4.3.0")
            )
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Nothing to release: the stream belongs to whoever passed it in."""
        return succeed(None)


def _writer(stream: IO[str] | IO[bytes]) -> Callable[[str], object]:
    """A function writing one str block to C{stream}, text or binary, in one call."""
    if isinstance(stream, (io.RawIOBase, io.BufferedIOBase)) or "b" in getattr(stream, "mode", ""):
        binary = cast("IO[bytes]", stream)
        return lambda block: binary.write(block.encode("utf-8", "replace"))
    text = cast("IO[str]", stream)
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        encoding = "utf-8"

    def write(block: str) -> object:
        if block.isascii():
            return text.write(block)
        # A terminal with a narrow encoding (C locale: ASCII) must not turn a
        # message with an accent into a failed delivery.
        safe = block.encode(encoding, "backslashreplace").decode(encoding, "replace")
        return text.write(safe)

    return write


# Bytes of entropy in one marker (16 hex digits), and how many markers one
# read of the system's entropy source provides.
MARKER_BYTES = 8
MARKERS_PER_DRAW = 256


class _MarkerPool:
    """Markers cut from bulk reads of the system's CSPRNG, each used once.

    One C{getrandom} system call per message was a measurable share of a
    message's cost; one per 256 messages is not.  This gives nothing away:
    every marker is still 64 bits read from C{os.urandom} (what C{secrets}
    reads too), no two markers share a byte, and the unused part of the
    pool never leaves the process.  A sender could only learn a marker by
    reading the relay's output, and the markers already printed tell
    nothing about the next one: the bytes are independent.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Drop the unused markers (a forked child must not repeat its parent's)."""
        self._pool = ""
        self._next = 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._pool):
            self._pool = os.urandom(MARKER_BYTES * MARKERS_PER_DRAW).hex()
            start = 0
        self._next = start + 2 * MARKER_BYTES
        return self._pool[start : self._next]


#: A fresh random marker for one block's frame (see L{_MarkerPool}).
new_marker = _MarkerPool()
os.register_at_fork(after_in_child=new_marker.forget)


def render(
    email: Email, max_body_chars: int = DEFAULT_MAX_BODY_CHARS, marker: str | None = None
) -> str:
    """The text block printed for C{email}: headers, body excerpt, attachments, warnings.

    The block opens with C{----- smtpproxy message <marker> -----} and closes
    with C{----- end <marker> -----}; in between, header lines hold one
    neutralised value each and body lines start with C{"| "}.
    """
    marker = marker or new_marker()
    lines = [f"----- smtpproxy message {marker} -----", f"From: {_addresses(email.from_)}"]
    lines.append(f"To: {_addresses(email.to)}")
    if email.cc:
        lines.append(f"Cc: {_addresses(email.cc)}")
    if email.bcc:
        lines.append(f"Bcc: {_addresses(email.bcc)}")
    lines += [
        f"Envelope-From: <{_line(email.envelope_from)}>",
        f"Envelope-To: {', '.join(f'<{_line(r)}>' for r in email.envelope_to)}",
        *_dsn_lines(email.dsn),
        f"Subject: {_line(email.subject)}",
    ]
    # A line with nothing after the label would read as a header the
    # message had empty; absent fields are left out instead.
    if email.date:
        lines.append(f"Date: {_line(email.date)}")
    if email.message_id:
        lines.append(f"Message-ID: {_line(email.message_id)}")
    lines += [f"Size: {human_size(email.size)}", "Body:", _body(email, max_body_chars)]
    if email.attachments:
        lines.append("Attachments:")
        for attachment in email.attachments[:MAX_LISTED_ATTACHMENTS]:
            details = [_line(attachment.content_type), human_size(attachment.size)]
            if attachment.inline:
                details.append("inline")
            name = _line(attachment.filename or "(no name)")
            lines.append(f"  {name} ({', '.join(details)})")
        lines += _not_listed(len(email.attachments), MAX_LISTED_ATTACHMENTS, "attachment")
    if email.warnings:
        lines.append("Warnings:")
        lines += [f"  {_line(warning)}" for warning in email.warnings[:MAX_LISTED_WARNINGS]]
        lines += _not_listed(len(email.warnings), MAX_LISTED_WARNINGS, "warning")
    lines.append(f"----- end {marker} -----")
    return "\n".join(lines) + "\n"


def _not_listed(total: int, listed: int, what: str) -> list[str]:
    left = total - listed
    return [f"  ... and {left} more {what}{'s' if left > 1 else ''}"] if left > 0 else []


def render_json(email: Email, max_body_chars: int = DEFAULT_MAX_BODY_CHARS) -> str:
    """C{email} as one line of JSON, for scripts and tests.

    Values are as parsed (not neutralised: JSON escaping already keeps
    control characters off the terminal), but lone surrogates become U+FFFD
    and the output is ASCII, so the line is valid JSON in UTF-8 whatever the
    stream's encoding.  Bodies are cut at C{max_body_chars} characters and
    lists of attachments and warnings at a fixed length, each with a count
    of what was left out.
    """
    attachments = [
        {
            "filename": attachment.filename,
            "content_type": attachment.content_type,
            "size": attachment.size,
            "sha256": hashlib.sha256(attachment.data).hexdigest(),
            "inline": attachment.inline,
        }
        for attachment in email.attachments[:MAX_LISTED_ATTACHMENTS]
    ]
    record = {
        "envelope": {"from": email.envelope_from, "to": list(email.envelope_to)},
        "dsn": _json_dsn(email.dsn),
        "headers": {
            "from": _json_mailboxes(email.from_),
            "to": _json_mailboxes(email.to),
            "cc": _json_mailboxes(email.cc),
            "bcc": _json_mailboxes(email.bcc),
            "reply_to": _json_mailboxes(email.reply_to),
            "subject": email.subject,
            "date": email.date,
            "message_id": email.message_id,
        },
        "size": email.size,
        "text": _json_excerpt(email.text, max_body_chars),
        "html": _json_excerpt(email.html, max_body_chars),
        "attachments": attachments,
        "attachments_not_listed": max(0, len(email.attachments) - MAX_LISTED_ATTACHMENTS),
        "warnings": list(email.warnings[:MAX_LISTED_WARNINGS]),
        "warnings_not_listed": max(0, len(email.warnings) - MAX_LISTED_WARNINGS),
    }
    return json.dumps(_json_safe(record), ensure_ascii=True) + "\n"


def _dsn_lines(dsn: Dsn | None) -> list[str]:
    """The DSN parameters (RFC 3461), one line for MAIL's and one per recipient that had any."""
    if dsn is None:
        return []
    lines = [f"DSN: RET={dsn.ret or '-'} ENVID={_line(dsn.envid or '-')}"]
    for recipient in dsn.recipients:
        notify = ",".join(recipient.notify) if recipient.notify else "-"
        orcpt = ";".join(recipient.orcpt) if recipient.orcpt else "-"
        lines.append(
            f"DSN-Recipient: <{_line(recipient.address)}> NOTIFY={notify} ORCPT={_line(orcpt)}"
        )
    return lines


def _json_dsn(dsn: Dsn | None) -> dict[str, object] | None:
    if dsn is None:
        return None
    recipients = [
        {
            "address": r.address,
            "notify": None if r.notify is None else list(r.notify),
            "orcpt": None if r.orcpt is None else {"type": r.orcpt[0], "address": r.orcpt[1]},
        }
        for r in dsn.recipients
    ]
    return {"ret": dsn.ret, "envid": dsn.envid, "recipients": recipients}


def _json_mailboxes(mailboxes: tuple[Mailbox, ...]) -> list[dict[str, str]]:
    return [{"name": mailbox.name, "address": mailbox.address} for mailbox in mailboxes]


def _json_excerpt(body: str | None, max_chars: int) -> dict[str, object] | None:
    if body is None:
        return None
    return {"excerpt": body[:max_chars], "length": len(body), "truncated": len(body) > max_chars}


def _json_safe(value: object) -> object:
    """C{value} with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATES.sub("\ufffd", value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def human_size(size: int) -> str:
    """C{1234567} -> C{"1.2 MiB"}: binary multiples, one decimal above bytes.

    Binary, and labelled so, because the limits the operator compares
    against are binary: C{SMTP_MAX_MESSAGE_SIZE} defaults to 25 MiB.
    """
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _body(email: Email, max_chars: int) -> str:
    """The body excerpt: the text, or the HTML stripped of its tags, cut at C{max_chars}."""
    html_left = 0
    if email.text is not None:
        body = email.text
    elif email.html is not None:
        # Converting all of a huge HTML body to show its first lines would be
        # wasted work; tags and styles rarely take more than this.
        html = email.html[: max(100_000, max_chars * 25)]
        html_left = len(email.html) - len(html)
        body = html_to_text(html)
    else:
        return "(no text body)"
    # Line ends are normalised and control characters neutralised only in
    # the excerpt, never in the (possibly huge) whole.  After _excerpt the
    # only line break left is LF, so every line a reader sees gets a prefix.
    shown = _prefixed_excerpt(body[:max_chars])
    notes = []
    if len(body) > max_chars:
        notes.append(f"{len(body) - max_chars} more characters not shown")
    if html_left:
        notes.append(f"{html_left} more characters of HTML not read")
    if notes:
        shown += f"\n[... {'; '.join(notes)}]"
    return shown


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML document, with line breaks for blocks."""

    _BLOCKS = frozenset(
        {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
    )
    _HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.pieces.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self.pieces.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.pieces.append(data)


def html_to_text(html: str) -> str:
    """The readable text of an HTML body, good enough for a console summary."""
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except Exception:  # noqa: S110 - whatever was read before the error is still useful
        pass
    text = "".join(extractor.pieces)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _addresses(mailboxes: tuple[Mailbox, ...]) -> str:
    return _line(", ".join(_mailbox(mailbox) for mailbox in mailboxes))


# RFC 5322 3.2.3 specials: a display name holding one of them is only one
# name when it is a quoted string (C{"Smith, John" <js@example.com>}; without
# the quotes the comma makes it read as two addresses).  The same set the
# standard library's header registry quotes for.
_SPECIALS = frozenset('()<>[]:;@\\,."')


def _mailbox(mailbox: Mailbox) -> str:
    """C{mailbox} as a header would write it, the display name quoted when it must be.

    Not C{email.utils.formataddr}: that encodes a non-ASCII name as an
    RFC 2047 word, which is right for a header and unreadable on a terminal.
    """
    name = mailbox.name
    if not name:
        return mailbox.address
    if not _SPECIALS.isdisjoint(name):
        name = f'"{quote(name)}"'
    return f"{name} <{mailbox.address}>"


def _line(value: str) -> str:
    """A value for one header-like line: no line breaks, no control characters."""
    if value.isprintable():  # the usual case: nothing to neutralise
        return value
    return _CONTROL.sub("\ufffd", value.replace("\r", " ").replace("\n", " ").replace("\t", " "))


def _create(config: Config, reactor: IReactorTime) -> StdoutProvider:
    # twistd may swap sys.stdout for a logging file once logging starts; the
    # process's real standard output is where operators expect the mail.
    return StdoutProvider(sys.__stdout__ or sys.stdout, output_format=config.stdout_format)


create = _create
