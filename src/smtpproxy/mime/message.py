"""The parsed message handed to providers.

An L{Email} is an immutable value built from the exact bytes received over
SMTP plus the SMTP envelope.  Providers read the structured fields (bodies,
attachments, header addresses) but must treat C{raw} as the truth: it is the
message exactly as the client sent it, and relaying it unchanged is the only
way to be faithful to headers nobody thought to model.
"""

from __future__ import annotations

import binascii
import email.errors
import email.policy
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser

from smtpproxy.addresses import Mailbox as Mailbox
from smtpproxy.addresses import salvage_addresses, simple_mailboxes, split_address_list
from smtpproxy.dsn import Dsn
from smtpproxy.mime.words import join_adjacent_words


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body MIME part.

    @ivar filename: the part's filename, or None when it has none.
    @ivar content_type: lower-case C{maintype/subtype}.
    @ivar data: the decoded bytes of the part (for message/rfc822, the
        embedded message serialised as bytes).
    @ivar inline: True when the part is meant to be shown in the body
        (Content-Disposition inline, or referenced by a Content-ID).
    @ivar content_id: the Content-ID without angle brackets, or None.
    """

    filename: str | None
    content_type: str
    data: bytes
    inline: bool = False
    content_id: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class Email:
    """A message as received: envelope, raw bytes and the parsed view of them.

    @ivar envelope_from: the MAIL FROM address; empty string for the null
        sender C{<>}.
    @ivar envelope_to: the RCPT TO addresses in the order given.  They, not
        the headers, decide who receives the message.
    @ivar raw: the message bytes exactly as received (after dot-unstuffing;
        BDAT chunks as sent), without any header we add.
    @ivar warnings: human-readable notes about parts that could not be
        decoded; such parts are kept (as attachments or raw) never dropped.
        At most L{MAX_WARNINGS} are kept.
    @ivar warnings_omitted: how many more warnings there were.
    @ivar abandoned: True when parsing took longer than its budget and was
        given up: only the envelope and C{raw} mean anything, and only a
        provider that sends raw MIME can deliver the message faithfully.
    @ivar dsn: the DSN parameters of MAIL and RCPT (RFC 3461), or None when
        the client gave none.
    @ivar mailbox: the sending mailbox the client's identity is bound to
        (its policy's C{mailbox}, or an API key's); empty when the
        provider chooses as it always does.
    @ivar per_recipient_retry: the caller retries recipients a backend
        refuses temporarily on their own (the queue), so a backend that
        answers per recipient may deliver to the others.  False (direct
        mode, and any caller that does not say): the whole message or
        nothing while any recipient is deferred
        (L{smtpproxy.providers.result.whole_message_deferral}).
    """

    envelope_from: str
    envelope_to: tuple[str, ...]
    raw: bytes
    from_: tuple[Mailbox, ...] = ()
    to: tuple[Mailbox, ...] = ()
    cc: tuple[Mailbox, ...] = ()
    bcc: tuple[Mailbox, ...] = ()
    reply_to: tuple[Mailbox, ...] = ()
    subject: str = ""
    message_id: str | None = None
    date: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    headers: tuple[tuple[str, str], ...] = field(default=())
    warnings: tuple[str, ...] = ()
    warnings_omitted: int = 0
    abandoned: bool = False
    dsn: Dsn | None = None
    mailbox: str = ""
    per_recipient_retry: bool = False

    @property
    def size(self) -> int:
        return len(self.raw)


# ---------------------------------------------------------------------------
# Parsing
#
# The standard library's parser (email.parser.BytesParser) is exact about
# headers but builds a Python string for every line of every body, so a 25 MB
# message would cost several times its size before one attachment had been
# decoded.  The work is therefore split.  Each header block (the message's,
# then each part's) goes through BytesParser with policy.default, so content
# types, boundaries, filenames, charsets and addresses are decided exactly as
# the standard library decides them.  Bodies never go through it: boundary
# lines are found with a regular expression over the raw bytes, following the
# standard library's rules for which line ends which part, and each leaf is
# decoded straight from a memoryview of the raw bytes.  The only large new
# allocations are the decoded attachments themselves.
# ---------------------------------------------------------------------------

_POLICY = email.policy.default

# A header line as the standard library's feed parser recognises one: a Unix
# "From " line, a field name and colon, or a continuation.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
# One line with its ending (CRLF, CR or LF: the standard library's split).
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")
# A run of header lines, each with its line end (possessive: no backtracking
# state is kept, however many lines there are).
_HEADER_LINES = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*+(?:\r\n|\r|\n))*+")
_TRAILING_EOL = re.compile(rb"(?:\r\n|\r|\n)\Z")
_NEWLINES = re.compile(r"[\r\n]")
_VISIBLE = re.compile(rb"[^\s]")
# Lone surrogates: 8-bit bytes smuggled through the standard library's
# ASCII decoding (U+DC80-U+DCFF), or what a UTF-7 text can encode.  No str
# that leaves this module may hold one, since encoding it to UTF-8 raises.
_SURROGATES = re.compile("[\ud800-\udfff]")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_ALPHABET)))
_NOT_BASE64_OR_PAD = bytes(sorted(set(_NOT_BASE64) - {ord("=")}))
# What cannot be part of something that looks like an address, for headers
# the address parser cannot read: these become blanks, and str.split() cuts
# on blanks (the same characters as a regular expression's \\s).
_FILENAME_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')

_ADDRESS_FIELDS = {"from": "from_", "to": "to", "cc": "cc", "bcc": "bcc", "reply-to": "reply_to"}
_UU_ENCODINGS = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_KNOWN_ENCODINGS = _IDENTITY_ENCODINGS | _UU_ENCODINGS | {"base64", "quoted-printable"}
_ENCODING_SPELLINGS = {
    "7bit": "7bit",
    "8bit": "8bit",
    "binary": "binary",
    "base64": "base64",
    "quotedprintable": "quoted-printable",
}
# Address header defects that do not mean the header is broken: obsolete
# syntax must be accepted on receipt, and RFC 6532 allows UTF-8 local parts.
_HARMLESS_DEFECTS = (email.errors.ObsoleteHeaderDefect, email.errors.NonASCIILocalPartDefect)
_EMBEDDED_MESSAGES = frozenset({"message/rfc822", "message/global"})

# Bounds that keep one hostile message from stalling the reactor.  The
# standard library's structured header parser is superlinear in a header's
# length (a 100 KB To header takes a third of a second), so longer values are
# read by simpler means; nesting depth and part count are bounded so that no
# message can make the walk recurse or loop without end.  Real mail stays far
# below all of them.
MAX_ADDRESS_HEADER = 32 * 1024
MAX_SUBJECT = 8 * 1024
MAX_MIME_HEADER = 4 * 1024
# The standard library's header parser collects its defects with sum() over
# lists, and re-scans the rest of the value for every comment or quoted
# word, so its time grows with the square of the number of parameters or
# tokens (8 KB of semicolons in a Content-Type took 0.2 s).  A MIME header
# with more parameters than this is not handed to it (real ones have a few;
# a long RFC 2231 filename in continuations, a few dozen), and an address
# header is handed to it at most this many characters at a time.
MAX_MIME_PARAMETERS = 100
MAX_ADDRESS_CHUNK = 1024
MAX_HEADER_BLOCK = 256 * 1024
MAX_DEPTH = 32
MAX_PARTS = 1000
MAX_WARNINGS = 100


class _Warnings(list[str]):
    """A parse's warnings, of which only the first L{MAX_WARNINGS} are kept.

    A crafted message can have a defect every few bytes; keeping a note for
    each would cost many times the message's size.  The rest are only
    counted (L{Email.warnings_omitted}).
    """

    dropped = 0

    def append(self, warning: str) -> None:
        if len(self) < MAX_WARNINGS:
            super().append(warning)
        else:
            self.dropped += 1


# Work on fewer bytes (or header characters) than this is not worth a step
# of its own.
_SMALL = 64 * 1024
_LONG_HEADER = 1024
# About 1 MB of uuencoded data, some 20 ms of decoding.
_UU_LINES_PER_STEP = 16 * 1024


ParseSteps = Generator[None, None, Email]


def parse_message(envelope_from: str, envelope_to: Sequence[str], raw: bytes) -> Email:
    """Parse C{raw} into an L{Email}; never raises, whatever the bytes.

    Whatever cannot be decoded is kept (as an attachment of raw bytes, or as
    text with replacement characters) and described in C{warnings} for the
    caller to log: no part is dropped without a trace.  This runs all of
    L{parse_steps} at once; the relay itself uses L{smtpproxy.mime.parsetask},
    which runs them across reactor turns within a time budget.
    """
    return _run(parse_steps(envelope_from, envelope_to, raw))


def _run(steps: ParseSteps) -> Email:
    """All of a parse's steps at once: its L{Email}."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            email: Email = done.value
            return email


def parse_steps(envelope_from: str, envelope_to: Sequence[str], raw: bytes) -> ParseSteps:
    """The parse of C{raw} as steps: a generator that returns the L{Email}.

    It yields between pieces of work whose cost is bounded by the size
    limits, never inside one: after the main header block, after each
    address header (or each piece of a long one), before and after each
    part's decoding.  Every piece runs in time linear in the bytes it
    reads, so a caller that runs steps until a time slice is used up holds
    the reactor for at most that slice plus one piece.
    """
    return _parse_steps(envelope_from, envelope_to, raw, quick=True)


def _parse_steps(
    envelope_from: str, envelope_to: Sequence[str], raw: bytes, quick: bool
) -> ParseSteps:
    """L{parse_steps}; C{quick=False} never takes the plain-text shortcut.

    The shortcut must not change the result, only the time it takes:
    tests/test_message_fastpath.py compares the two on generated messages.
    """
    recipients = tuple(envelope_to)
    try:
        return (yield from _Parse(raw, quick).steps(envelope_from, recipients))
    except Exception as error:
        # A bug here or a standard library surprise: keep the whole message
        # as one attachment rather than lose it.
        return Email(
            envelope_from=envelope_from,
            envelope_to=recipients,
            raw=raw,
            attachments=(Attachment("message.eml", "message/rfc822", raw),),
            warnings=(
                f"message could not be parsed ({type(error).__name__}); kept whole as message.eml",
            ),
        )


class _Parse:
    """One parse of one message: the raw bytes, and what was found in them so far."""

    def __init__(self, raw: bytes, quick: bool = True) -> None:
        self.raw = raw
        # May the plain-text shortcut in steps() be taken?
        self.quick = quick
        self.view = memoryview(raw)
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []
        self.warnings = _Warnings()
        self.parts = 0

    def steps(self, envelope_from: str, envelope_to: tuple[str, ...]) -> ParseSteps:
        split: list[tuple[str, str]] | None = None
        blank = -1
        if self.quick:
            # Most messages end their header block with the first empty CRLF
            # line; when every line before it is a field, that is where
            # split_headers would end it too, and one find replaces its scan.
            blank = self.raw.find(b"\r\n\r\n")
            if blank >= 0 and blank + 2 <= MAX_HEADER_BLOCK:
                split = simple_header_fields(self.raw[: blank + 2])
        if split is not None:
            header_end, body_start = blank + 2, blank + 4
        else:
            header_end, body_start = self.split_headers(0, len(self.raw))
            if self.quick and header_end != blank + 2 and header_end <= MAX_HEADER_BLOCK:
                split = simple_header_fields(self.raw[:header_end])
        top: EmailMessage | None = None
        if split is not None and not names_mime_fields(split):
            fields = split
        else:
            # The split, when there is one, is handed on: a MIME message's
            # header block is not cut into fields twice.
            top = self.headers(0, header_end, "message", split)
            fields = list(top.raw_items())
        headers = tuple((name, self.header_text(name, value)) for name, value in fields)
        addresses: dict[str, list[Mailbox]] = {}
        for name, value in headers:
            key = _ADDRESS_FIELDS.get(name.lower())
            if key is not None:
                found = self.mailboxes(name, value)
                if found is None:
                    found = yield from self.mailboxes_in_pieces(name, value)
                addresses.setdefault(key, []).extend(found)
        subject = _first(headers, "subject")
        message_id = _first(headers, "message-id")
        date = _first(headers, "date")

        if top is None:
            # No MIME headers: RFC 2045's defaults make the whole body one
            # text/plain part, which is what the walk would conclude too.
            self.parts = 1
            if len(self.raw) - body_start > _SMALL:
                yield
            self.text = self.decode_text("utf-8", "message body", self.view[body_start:])
        else:
            yield
            yield from self.walk(top, "", body_start, len(self.raw), 0, in_related=False)
        return Email(
            envelope_from=envelope_from,
            envelope_to=envelope_to,
            raw=self.raw,
            from_=tuple(addresses.get("from_", ())),
            to=tuple(addresses.get("to", ())),
            cc=tuple(addresses.get("cc", ())),
            bcc=tuple(addresses.get("bcc", ())),
            reply_to=tuple(addresses.get("reply_to", ())),
            subject="" if subject is None else self.subject(subject),
            message_id=None if message_id is None else message_id.strip() or None,
            date=None if date is None else date.strip() or None,
            text=self.text,
            html=self.html,
            attachments=tuple(self.attachments),
            headers=headers,
            warnings=tuple(self.warnings),
            warnings_omitted=self.warnings.dropped,
        )

    # -- headers -----------------------------------------------------------

    def split_headers(self, start: int, end: int) -> tuple[int, int]:
        """Where the header block in C{raw[start:end]} ends, and where the body starts.

        As in the standard library's feed parser, headers run to the first
        line that is not a header line; an empty line there is the separator
        and belongs to neither, anything else is already body.  A "From "
        line closing several header lines is handed back to the body.
        """
        raw = self.raw
        header_end = body_start = _span_end(_HEADER_LINES, raw, start, end)
        if header_end < end:
            line_end = _span_end(_LINE, raw, header_end, end)
            if raw[header_end] in b"\r\n":
                body_start = line_end  # the separator
            elif line_end == end and _HEADER_LINE.match(raw, header_end, end):
                header_end = body_start = end  # a last header line without line end
        # Where does the last header line start?
        eol = _TRAILING_EOL.search(raw, max(start, header_end - 2), header_end)
        content_end = header_end if eol is None else eol.start()
        last_line = max(raw.rfind(b"\n", start, content_end), raw.rfind(b"\r", start, content_end))
        if last_line >= start and raw.startswith(b"From ", last_line + 1):
            return last_line + 1, last_line + 1
        return header_end, body_start

    def headers(
        self,
        start: int,
        end: int,
        where: str,
        fields: list[tuple[str, str]] | None = None,
    ) -> EmailMessage:
        """The header block C{raw[start:end]}, parsed by the standard library.

        An absurdly long block (it would take the standard library minutes
        and gigabytes) is read only up to L{MAX_HEADER_BLOCK}.  C{fields} is
        the block's L{simple_header_fields} when the caller already has it.
        """
        if fields is not None:
            return _header_message(fields)
        if end - start > MAX_HEADER_BLOCK:
            cut = start + MAX_HEADER_BLOCK
            last_eol = max(self.raw.rfind(b"\n", start, cut), self.raw.rfind(b"\r", start, cut))
            cut = last_eol + 1 if last_eol > start else cut
            self.warnings.append(
                f"{where}: header block of {end - start} bytes; only the first "
                f"{cut - start} bytes were read"
            )
            end = cut
        block = self.raw[start:end]
        quick = simple_header_block(block)
        if quick is not None:
            return quick
        try:
            message = BytesParser(policy=_POLICY).parsebytes(block, headersonly=True)
        except Exception:
            # The parser looks at Content-Type before returning, and some
            # values make it raise (an RFC 2231 parameter in a codec that
            # cannot decode it, say).  Split the headers without looking at
            # them, then build the message by hand; the walk reports the bad
            # header when it reads it.
            lenient = BytesParser(policy=email.policy.compat32).parsebytes(block, headersonly=True)
            message = EmailMessage(policy=_POLICY)
            for name, value in lenient.raw_items():
                message.set_raw(name, value)  # the parser's own way in: no parsing
        assert isinstance(message, EmailMessage)  # what policy.default builds
        return message

    def header_text(self, name: str, value: str) -> str:
        """A raw header value as text: unfolded, its 8-bit bytes read as UTF-8."""
        if "\n" in value or "\r" in value:
            value = _NEWLINES.sub("", value)
        if value.isascii() or not _SURROGATES.search(value):
            return value
        try:
            return value.encode("ascii", "surrogateescape").decode("utf-8")
        except UnicodeError:
            self.warnings.append(
                f"header {_quote(name)} has 8-bit bytes that are not UTF-8; "
                "replacement characters used"
            )
            return _clean(value)

    def mailboxes(self, name: str, value: str) -> list[Mailbox] | None:
        """The addresses in one address header, or None when it must be read in pieces.

        Everyday syntax is read by L{simple_mailboxes}; anything else goes
        to the standard library's parser, which is exact but superlinear:
        a value longer than L{MAX_ADDRESS_CHUNK} is left to
        L{mailboxes_in_pieces}, and one longer than L{MAX_ADDRESS_HEADER}
        is only salvaged.
        """
        if len(value) > MAX_ADDRESS_HEADER:
            return self.salvage_long(name, value)
        simple = simple_mailboxes(value)
        if simple is not None:
            return simple
        if len(value) > MAX_ADDRESS_CHUNK:
            return None
        found, clean = _parse_addresses(name, value)
        return found if clean else self.salvage(name, value, found)

    def mailboxes_in_pieces(self, name: str, value: str) -> Generator[None, None, list[Mailbox]]:
        """A long address header, parsed a piece of L{MAX_ADDRESS_CHUNK} at a time.

        Pieces are cut at the commas between addresses, and each is one step.
        """
        chunks = _address_chunks(value)
        if chunks is None:
            return self.salvage_long(name, value)
        found: list[Mailbox] = []
        clean = True
        for chunk in chunks:
            yield
            addresses, chunk_clean = _parse_addresses(name, chunk)
            found += addresses
            clean = clean and chunk_clean
        return found if clean else self.salvage(name, value, found)

    def salvage_long(self, name: str, value: str) -> list[Mailbox]:
        self.warnings.append(
            f"header {_quote(name)} is too long to parse ({len(value)} characters); "
            "addresses picked out by pattern"
        )
        return salvage_addresses(value, [])

    def salvage(self, name: str, value: str, found: list[Mailbox]) -> list[Mailbox]:
        mailboxes = salvage_addresses(value, found)
        self.warnings.append(
            f"header {_quote(name)} is malformed; kept the {len(mailboxes)} address(es) "
            "that could be read"
        )
        return mailboxes

    def subject(self, value: str) -> str:
        """The Subject with its RFC 2047 encoded words decoded."""
        if len(value) > MAX_SUBJECT:
            self.warnings.append(
                f"Subject too long to decode ({len(value)} characters), kept as is"
            )
            return value
        if "=?" not in value and "\r" not in value and "\n" not in value:
            # No encoded words: the header class would hand the text back as is.
            return _clean(value)
        try:
            return _clean(str(_POLICY.header_factory("subject", value)))
        except Exception:
            self.warnings.append("Subject could not be decoded, kept as is")
            return value

    # -- the MIME tree -----------------------------------------------------

    def walk(
        self,
        headers: EmailMessage,
        label: str,
        body_start: int,
        end: int,
        depth: int,
        *,
        in_related: bool,
    ) -> Generator[None, None, None]:
        """Sort one part (headers parsed, body in C{raw[body_start:end]}) into the result.

        C{label} names the part in warnings, IMAP style: "" for the message
        itself, "2.1" for the first part of its second part.  C{depth} counts
        the enclosing multiparts.
        """
        self.parts += 1
        where = f"part {label}" if label else "message body"
        oversized = _oversized_mime_header(headers)
        if oversized is not None:
            self.keep_raw(f"{where}: {oversized}", body_start, end, depth)
            return
        failures = yield from _parse_mime_headers_once(headers)
        for name, error in failures:
            if name == "content-type":
                problem = f"{where}: Content-Type could not be read ({error})"
                self.keep_raw(problem, body_start, end, depth)
                return
            self.warnings.append(f"{where}: {name} could not be read ({error}), ignored")
        maintype = headers.get_content_maintype()
        if maintype == "message":
            yield from self.embedded(headers, where, body_start, end, depth)
        elif maintype == "multipart":
            yield from self.multipart(headers, label, where, body_start, end, depth, in_related)
        else:
            yield from self.leaf(headers, where, body_start, end, depth, in_related)

    def multipart(
        self,
        headers: EmailMessage,
        label: str,
        where: str,
        body_start: int,
        end: int,
        depth: int,
        in_related: bool,
    ) -> Generator[None, None, None]:
        """Split a multipart body on its boundary lines and walk each part.

        The rules are the standard library's: text before the first boundary
        is preamble (there for pre-MIME readers; RFC 2046 says to skip it),
        consecutive boundary lines enclose no part, a part ends at the next
        line that is its multipart's boundary (an enclosing boundary has
        already cut C{end} short), and without a closing boundary the last
        part runs to C{end}.  A multipart without a usable boundary is kept
        as raw bytes.
        """
        try:
            boundary = headers.get_boundary()
        except Exception:  # an RFC 2231 boundary in a codec that cannot decode it
            boundary = None
        if boundary is None:
            self.keep_raw(f"{where}: multipart without a boundary", body_start, end, depth)
            return
        if depth >= MAX_DEPTH:
            self.keep_raw(
                f"{where}: multiparts nested more than {MAX_DEPTH} deep", body_start, end, depth
            )
            return
        try:
            lines = _boundary_lines(boundary.encode("ascii", "surrogateescape"))
        except UnicodeEncodeError:
            lines = None  # a boundary no line of raw bytes can be equal to
        line = None if lines is None else lines.search(self.raw, body_start, end)
        if lines is None or line is None or line[2]:
            self.keep_raw(
                f"{where}: the multipart's first boundary is missing", body_start, end, depth
            )
            return
        subtype = headers.get_content_subtype()
        related = in_related or subtype == "related"
        number = 0
        while line is not None:
            _, line_end, closing = line
            if closing:
                if _VISIBLE.search(self.raw, line_end, end):
                    self.warnings.append(
                        f"{where}: {end - line_end} bytes after the closing boundary ignored"
                    )
                return
            # Skip this boundary line and any that follow it directly.
            start = line_end
            while (again := lines.match(self.raw, start, end)) is not None:
                start = again[0]
            line = lines.search(self.raw, start, end)
            part_end = end if line is None else line[0]
            number += 1
            part_label = f"{label}.{number}" if label else str(number)
            if self.parts >= MAX_PARTS:
                self.keep_raw(
                    f"part {part_label} and after: more than {MAX_PARTS} parts",
                    start,
                    end,
                    depth + 1,
                )
                return
            header_end, part_body = self.split_headers(start, part_end)
            part_headers = self.headers(start, header_end, f"part {part_label}")
            if subtype == "digest":
                part_headers.set_default_type("message/rfc822")
            yield
            yield from self.walk(
                part_headers, part_label, part_body, part_end, depth + 1, in_related=related
            )
        self.warnings.append(f"{where}: the multipart's closing boundary is missing")

    def body(self, start: int, end: int, depth: int) -> tuple[int, int]:
        """A part's body, less the line ending that belongs to the boundary after it."""
        if depth and start < end:
            eol = _TRAILING_EOL.search(self.raw, max(start, end - 2), end)
            if eol is not None:
                end = eol.start()
        return start, end

    def leaf(
        self,
        headers: EmailMessage,
        where: str,
        start: int,
        end: int,
        depth: int,
        in_related: bool,
    ) -> Generator[None, None, None]:
        """A part with content: a body if it is the first text or HTML, else an attachment."""
        content_type = headers.get_content_type()
        disposition = headers.get_content_disposition()
        filename = _filename(headers)
        if end - start > _SMALL:
            yield
        data = yield from self.transfer_decode(headers, where, *self.body(start, end, depth))
        if len(data) > _SMALL:
            yield
        if disposition != "attachment" and filename is None:
            if content_type == "text/plain" and self.text is None:
                self.text = self.text_decode(headers, where, data)
                return
            if content_type == "text/html" and self.html is None:
                self.html = self.text_decode(headers, where, data)
                return
        content_id = _content_id(headers)
        inline = disposition == "inline" or (content_id is not None and in_related)
        self.attachments.append(
            Attachment(filename, content_type, _bytes(data), inline, content_id)
        )

    def embedded(
        self,
        headers: EmailMessage,
        where: str,
        start: int,
        end: int,
        depth: int,
    ) -> Generator[None, None, None]:
        """A message/* part, kept whole: its data is the embedded message's bytes."""
        if end - start > _SMALL:
            yield
        content_type = headers.get_content_type()
        data = _bytes(
            (yield from self.transfer_decode(headers, where, *self.body(start, end, depth)))
        )
        filename = _filename(headers)
        if filename is None and content_type in _EMBEDDED_MESSAGES:
            filename = _message_filename(data)
        inline = headers.get_content_disposition() == "inline"
        self.attachments.append(
            Attachment(filename, content_type, data, inline, _content_id(headers))
        )

    def keep_raw(self, problem: str, start: int, end: int, depth: int) -> None:
        """Keep a body we cannot interpret, as an application/octet-stream attachment."""
        self.warnings.append(f"{problem}; kept as raw bytes")
        first, last = self.body(start, end, depth)
        self.attachments.append(Attachment(None, "application/octet-stream", self.raw[first:last]))

    # -- decoding ----------------------------------------------------------

    def transfer_decode(
        self, headers: EmailMessage, where: str, start: int, end: int
    ) -> Generator[None, None, bytes | memoryview]:
        """Undo the Content-Transfer-Encoding; damaged data is decoded as far as it goes.

        An unencoded body comes back as a memoryview of the raw bytes, so a
        text body becomes a str without an intermediate copy.  Only
        uudecoding, a Python loop over lines, takes more than one step.
        """
        encoding = _transfer_encoding(headers)
        problem: str | None = None
        data: bytes | memoryview
        if encoding == "base64":
            data, problem = _base64(self.raw, start, end)
        elif encoding == "quoted-printable":
            data = binascii.a2b_qp(self.view[start:end])
        elif encoding in _UU_ENCODINGS:
            data, problem = yield from _uudecode(self.raw[start:end])
        else:
            data = self.view[start:end]
            if encoding not in _IDENTITY_ENCODINGS:
                problem = f"unknown transfer encoding {_quote(encoding)}, kept undecoded"
        if problem is not None:
            self.warnings.append(f"{where}: {problem}")
        return data

    def text_decode(self, headers: EmailMessage, where: str, data: bytes | memoryview) -> str:
        """A text body as str: in its charset when known, else as UTF-8."""
        try:
            charset = headers.get_content_charset() or "utf-8"
        except Exception:  # a charset parameter the standard library chokes on
            charset = "utf-8"
        if charset in ("us-ascii", "ascii"):
            # Mislabelled 8-bit text is common, and UTF-8 reads ASCII the same.
            charset = "utf-8"
        return self.decode_text(charset, where, data)

    def decode_text(self, charset: str, where: str, data: bytes | memoryview) -> str:
        """C{data} as str in C{charset}; what cannot be decoded is replaced and reported."""
        try:
            text = str(data, charset)
        except LookupError:
            self.warnings.append(f"{where}: unknown charset {_quote(charset)}, read as UTF-8")
            text = str(data, "utf-8", "replace")
        except ValueError:  # UnicodeDecodeError, or a codec that refuses its input
            self.warnings.append(
                f"{where}: text is not valid {_quote(charset)}, replacement characters used"
            )
            try:
                text = str(data, charset, "replace")
            except (LookupError, ValueError):
                text = str(data, "utf-8", "replace")
        if charset not in ("utf-8", "utf8") and _SURROGATES.search(text):
            # Strict UTF-8 never yields lone surrogates; UTF-7 and others can.
            self.warnings.append(f"{where}: text holds lone surrogates, replaced")
            text = _clean(text)
        return text


def _span_end(pattern: re.Pattern[bytes], raw: bytes, start: int, end: int) -> int:
    """Where a match of C{pattern} (which accepts the empty string) at C{start} ends."""
    match = pattern.match(raw, start, end)
    return start if match is None else match.end()


def _transfer_encoding(headers: EmailMessage) -> str:
    """The Content-Transfer-Encoding in lower case, forgiving common misspellings."""
    header = headers.get("content-transfer-encoding")
    if header is None:
        return ""
    encoding = str(getattr(header, "cte", header)).strip().lower()
    if encoding in _KNOWN_ENCODINGS:
        return encoding
    # "quoted printable", "base64;", "7-bit" and the like.
    return _ENCODING_SPELLINGS.get(re.sub("[^a-z0-9]", "", str(header).lower()), encoding)


def _parse_mime_headers_once(
    headers: EmailMessage,
) -> Generator[None, None, list[tuple[str, str]]]:
    """Make the MIME headers' parsed forms stick, so each is parsed once per part.

    An EmailMessage parses a header every time it is asked for it, and
    finding a part's type, boundary, charset and filename asks for
    Content-Type a dozen times; storing the parsed header object back makes
    the later lookups free (policy.default hands stored objects back as is).
    A header the standard library cannot parse (it has had crash bugs on odd
    input) is removed, and returned with the error's name so that the
    caller can report it.  A long header is parsed in a step of its own:
    the standard library may take a few dozen milliseconds on one of
    L{MAX_MIME_HEADER} characters.
    """
    failed = []
    long = {name.lower() for name, value in headers.raw_items() if len(value) > _LONG_HEADER}
    for name in ("content-type", "content-disposition", "content-transfer-encoding"):
        if name in long:
            yield
        try:
            value = headers.get(name)
        except Exception as error:
            del headers[name]
            failed.append((name, type(error).__name__))
            continue
        if value is not None:
            headers.replace_header(name, value)
    return failed


class _BoundaryLines:
    """Finds the lines that are C{--delimiter} or C{--delimiter--}, maybe with trailing blanks.

    A boundary line starts the data or follows a CR or LF.  Searching for
    a line break followed by the literal lets the regex engine skip to the
    next CR or LF, and a match attempt there reads at most the line that
    follows (the delimiter holds no line break), so a search costs time
    linear in the bytes searched.  The former pattern started with the
    literal and looked behind for the line break: a body that repeats the
    delimiter's first bytes cost a full comparison at every position.
    """

    def __init__(self, delimiter: bytes) -> None:
        line = b"--" + re.escape(delimiter) + rb"(?P<end>--)?[ \t]*(?:\r\n|\r|\n|\Z)"
        self._line = re.compile(line)
        self._after_break = re.compile(rb"[\r\n]" + line)

    def match(self, raw: bytes, start: int, end: int) -> tuple[int, bool] | None:
        """Where the boundary line at C{start} ends, and whether it closes; None if none there."""
        found = self._line.match(raw, start, end)
        return None if found is None else (found.end(), found["end"] is not None)

    def search(self, raw: bytes, start: int, end: int) -> tuple[int, int, bool] | None:
        """The first boundary line starting in C{raw[start:end]}: start, end, closing."""
        if start == 0 or raw[start - 1] in b"\r\n":
            here = self.match(raw, start, end)
            if here is not None:
                return (start, *here)
        found = self._after_break.search(raw, start, end)
        if found is None:
            return None
        return found.start() + 1, found.end(), found["end"] is not None


def _boundary_lines(delimiter: bytes) -> _BoundaryLines | None:
    """The boundary line finder for C{delimiter}, or None when no line can be one."""
    if b"\r" in delimiter or b"\n" in delimiter:
        return None  # an RFC 2231 boundary can decode to anything
    return _BoundaryLines(delimiter)


def _bytes(data: bytes | memoryview) -> bytes:
    return data.tobytes() if isinstance(data, memoryview) else data


def _base64(raw: bytes, start: int, end: int) -> tuple[bytes, str | None]:
    """Decode C{raw[start:end]} as base64, leniently.

    binascii decodes straight from a memoryview and skips line breaks and
    stray characters, so the common case copies nothing.  It stops at the
    first padding sign, which would lose data when several base64 texts were
    pasted together: that case, and any decoding error, go piece by piece.
    """
    pad = raw.find(b"=", start, end)
    if pad < 0 or not raw[pad:end].translate(None, _NOT_BASE64):
        try:
            return binascii.a2b_base64(memoryview(raw)[start:end]), None
        except (binascii.Error, ValueError):
            pass
    pieces = []
    for piece in raw[start:end].translate(None, _NOT_BASE64_OR_PAD).split(b"="):
        usable = piece[: len(piece) - 1] if len(piece) % 4 == 1 else piece
        if usable:
            pieces.append(binascii.a2b_base64(usable + b"=" * (-len(usable) % 4)))
    return b"".join(pieces), "damaged base64 data, decoded as far as possible"


def _uudecode(data: bytes) -> Generator[None, None, tuple[bytes, str | None]]:
    """Decode a uuencoded body (begin line, data lines, end line); keep it as is if we cannot."""
    if not data.strip():
        return b"", None
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith(b"begin "):
            break
    else:
        return data, "uuencoded data without a 'begin' line, kept undecoded"
    decoded = []
    for count, line in enumerate(lines, 1):
        if not count % _UU_LINES_PER_STEP:
            yield
        if line.strip() == b"end":
            break
        if not line:
            continue
        try:
            decoded.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders pad lines wrongly; decode just the length the
            # line's first character announces.
            try:
                decoded.append(binascii.a2b_uu(line[: ((line[0] - 32) & 63) * 4 // 3 + 2]))
            except binascii.Error:
                return data, "damaged uuencoded data, kept undecoded"
    return b"".join(decoded), None


def _first(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The value of the first header called C{name}, case-insensitively."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def abandoned(envelope_from: str, envelope_to: Sequence[str], raw: bytes, why: str) -> Email:
    """The L{Email} for a message whose parse was given up: envelope and raw bytes only."""
    return Email(
        envelope_from=envelope_from,
        envelope_to=tuple(envelope_to),
        raw=raw,
        warnings=(f"parsing abandoned ({why}); only the raw message is kept",),
        abandoned=True,
    )


def _parse_addresses(name: str, value: str) -> tuple[list[Mailbox], bool]:
    """The standard library's reading of an address header, and whether it was clean.

    Adjacent encoded words are joined first: the library's address parser
    would read a space between them (RFC 2047 6.2 says none).
    """
    try:
        header = _POLICY.header_factory(name, join_adjacent_words(value))
        found = [
            Mailbox(_clean(address.display_name), _clean(address.addr_spec))
            for address in header.addresses
            if address.addr_spec not in ("", "<>")
        ]
        clean = all(isinstance(defect, _HARMLESS_DEFECTS) for defect in header.defects)
    except Exception:  # the header parser has had crash bugs on odd input
        return [], False
    return found, clean


def _address_chunks(value: str) -> list[str] | None:
    """C{value} cut at the commas between addresses into pieces of L{MAX_ADDRESS_CHUNK}.

    The cuts are L{split_address_list}'s.  None when one address alone is
    longer than the limit, or when the value has a group, whose members
    cannot be parsed apart from it.
    """
    pieces = split_address_list(value)
    if pieces is None:
        return None
    chunks: list[str] = []
    for piece in pieces:
        if len(piece) > MAX_ADDRESS_CHUNK:
            return None
        if chunks and len(chunks[-1]) + 1 + len(piece) <= MAX_ADDRESS_CHUNK:
            chunks[-1] += "," + piece
        elif piece.strip():
            chunks.append(piece)
    return chunks


def _oversized_mime_header(headers: EmailMessage) -> str | None:
    """Why a part's MIME headers are too long to interpret safely, or None."""
    for name, value in headers.raw_items():
        if not name.lower().startswith("content-"):
            continue
        if len(value) > MAX_MIME_HEADER:
            return f"{_quote(name)} header longer than {MAX_MIME_HEADER} characters"
        if value.count(";") > MAX_MIME_PARAMETERS:
            return f"{_quote(name)} header with more than {MAX_MIME_PARAMETERS} parameters"
        if value.count("(") > MAX_MIME_PARAMETERS:
            # The standard library re-reads the rest of the value for every
            # comment: 1,300 comments in 4 KB took 75 ms, found by the
            # property tests.  Real MIME headers carry a comment or two.
            return f"{_quote(name)} header with more than {MAX_MIME_PARAMETERS} comments"
    return None


def _filename(headers: EmailMessage) -> str | None:
    """The part's filename (RFC 2231 and RFC 2047 decoded), or None."""
    try:
        filename = headers.get_filename()
    except Exception:  # a malformed parameter list
        return None
    return _clean(filename) if filename else None


def _content_id(headers: EmailMessage) -> str | None:
    """The Content-ID without its angle brackets, or None."""
    try:
        value = headers.get("content-id")
    except Exception:  # an encoded word the header parser chokes on
        return None
    if value is None:
        return None
    content_id = _clean(str(value)).strip()
    if content_id.startswith("<") and content_id.endswith(">"):
        content_id = content_id[1:-1].strip()
    return content_id or None


def _message_filename(data: bytes) -> str:
    """C{<subject>.eml} for an embedded message, or C{message.eml} when it has none."""
    try:
        embedded = _Parse(data)
        header_end, _ = embedded.split_headers(0, len(data))
        value = embedded.headers(0, header_end, "embedded message").get("subject")
        subject = _FILENAME_UNSAFE.sub(" ", _clean(str(value or "")))[:100].strip(" .")
    except Exception:  # a name is a nicety, not worth failing the message for
        subject = ""
    return f"{subject}.eml" if subject else "message.eml"


# One header field with its folded continuation lines.  Every repeat is
# possessive and no two adjacent repeats can take the same character, so a
# match attempt reads each character once: linear in the field, whatever it
# holds.  (Without the possessive quantifiers, 20 KB of blanks followed by a
# bare CR took 22 s: the blanks could go to either of two repeats.)
_FIELD = re.compile(r"([!-9;-~]++):[ \t]*+([^\r\n]*+(?:\r?\n[ \t][^\r\n]*+)*+)(?:\r?\n|\Z)")


def names_mime_fields(fields: list[tuple[str, str]]) -> bool:
    """Does any of C{fields} start with C{Content-}, in any case?

    A message without any such field is plain text by RFC 2045's defaults
    (what cron, monitoring and most scanners send): they decide everything
    the MIME walk would look up, so neither the standard library's header
    objects nor the walk are needed.
    """
    # A plain loop, first letter first: a generator per message and a
    # lower-cased copy of every name cost more than the rest of this test.
    for name, _ in fields:  # noqa: SIM110 - any() over a generator is the cost saved here
        if name[:1] in "cC" and name[:8].lower() == "content-":
            return True
    return False


def simple_header_fields(block: bytes) -> list[tuple[str, str]] | None:
    """The (name, raw value) pairs of a well-formed header block, or None.

    Well-formed means: every line is C{Name: value} (the name printable
    ASCII without spaces) or a continuation starting with a space or tab,
    lines end with CRLF or LF (the last may have none), and there is no
    bare CR.  A value keeps its folding; only the blanks after the colon go.
    See L{simple_header_block}, which builds the standard library's message
    from the pairs.
    """
    text = block.decode("ascii", "surrogateescape")
    fields = []
    position = 0
    size = len(text)
    match = _FIELD.match
    # Each field must start where the last one ended: one anchored match per
    # field, never a search, so no position is read twice.
    while position < size:
        found = match(text, position)
        if found is None:
            return None
        position = found.end()
        fields.append((found[1], found[2]))
    return fields


def simple_header_block(block: bytes) -> EmailMessage | None:
    """Split a well-formed header block without the standard library's feed parser.

    The feed parser costs about a quarter of the relay's time per message
    on its own.  When every line is a plain C{Name: value} line or a folded
    continuation (CRLF or LF endings), the result is exactly what it would
    build: the same (name, value) pairs under the same policy, so every
    header is still interpreted by the standard library.  Anything else
    (an mbox "From " line, junk lines, a bare CR) returns None and the full
    parser decides.
    """
    fields = simple_header_fields(block)
    return None if fields is None else _header_message(fields)


def _header_message(fields: list[tuple[str, str]]) -> EmailMessage:
    """The standard library's message holding C{fields} as they were received."""
    message = EmailMessage(policy=_POLICY)
    for name, value in fields:
        message.set_raw(name, value)
    return message


def _clean(text: str) -> str:
    """C{text} without lone surrogates: escaped bytes are read as UTF-8, the rest replaced."""
    if not _SURROGATES.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that stand for no byte
        return _SURROGATES.sub("\ufffd", text)


def _quote(value: str) -> str:
    """A value from the message, made safe and short enough for a warning."""
    return repr(value[:60] + ("..." if len(value) > 60 else ""))
