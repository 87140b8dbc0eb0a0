"""Header fields of a raw message, one pass over its header block.

Providers that edit a message's header block on the raw bytes (Graph's MIME
mode, the SMTP upstream's C{RELAY_FROM}) split it into fields here, so no
provider imports another's modules.  Lines are split the way the standard
library splits them (CRLF, bare CR or bare LF), so a field hidden behind a
bare CR is seen like any other.  Splitting is linear in the header block:
each field is one slice of the message, however many lines it is folded
over (a folded field grown line by line would be copied again for every
continuation line, quadratic in its length, on the reactor thread).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.utils import formataddr

from smtpproxy.addresses import ascii_address
from smtpproxy.mime.message import Mailbox

# One line and its ending: CRLF, bare CR or bare LF, as the standard
# library's parser splits lines (a last line may have no ending).
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")


def split_fields(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split C{raw} into header fields (each with its folded lines) and the rest.

    The header block runs to the first empty line, including lines a strict
    parser would take for the start of the body: we must find (and remove)
    a Bcc or Sender there too, whichever way the reader of the message
    parses it.

    @return: the fields, each ending with its own line break, and everything
        from the blank line that ends the header block (inclusive) to the end.
    """
    fields: list[bytes] = []
    # A field is contiguous in C{raw}: note where the current one starts
    # and slice it out once its last line is known.
    start: int | None = None
    position = 0
    size = len(raw)
    while position < size:
        match = _LINE.match(raw, position)
        end = match.end() if match is not None else size
        if end - position <= 2 and raw[position:end] in (b"\r\n", b"\n", b"\r"):
            if start is not None:
                fields.append(raw[start:position])
            return fields, raw[position:]
        if raw[position : position + 1] not in (b" ", b"\t") or start is None:
            if start is not None:
                fields.append(raw[start:position])
            start = position
        position = end
    if start is not None:
        fields.append(raw[start:size])
    return fields, b""


def is_mbox_line(line: bytes) -> bool:
    """Whether C{line} is an mbox C{From } separator (not C{From : x}, an obsolete field)."""
    return line.startswith(b"From ") and not line[5:].lstrip(b" \t").startswith(b":")


def field_name(field: bytes) -> bytes:
    """The lower-cased name of a header field (the bytes before its colon)."""
    return field.split(b":", 1)[0].strip().lower()


def field_value(field: bytes) -> bytes:
    """The raw value of a header field: after the colon, folding kept, line break included."""
    return field.split(b":", 1)[1] if b":" in field else b""


def line_break(fields: Sequence[bytes]) -> bytes:
    """The line break the message uses (CRLF unless it plainly uses bare LF)."""
    for field in fields:
        if field.endswith(b"\r\n"):
            return b"\r\n"
        if field.endswith(b"\n"):
            return b"\n"
    return b"\r\n"


def address_field(name: str, mailboxes: Sequence[Mailbox], newline: bytes = b"\r\n") -> bytes:
    """A complete address header field, one address per folded line.

    Display names outside ASCII are RFC 2047 encoded; line breaks smuggled
    into a name are removed so a field can never grow a second one.
    """
    separator = b"," + newline + b" "
    value = separator.join(format_mailbox(mailbox) for mailbox in mailboxes)
    return name.encode("ascii") + b": " + value + newline


def format_mailbox(mailbox: Mailbox) -> bytes:
    """One mailbox as header bytes: C{Name <addr>}, the name RFC 2047 encoded if needed."""
    display = " ".join(mailbox.name.split())
    # An internationalised domain is written as A-labels, which every
    # reader of the field understands (RFC 6532 readers included).
    address = ascii_address("".join(mailbox.address.split()))
    try:
        return formataddr((display, address), charset="utf-8").encode("ascii")
    except UnicodeEncodeError:
        # An internationalised address (SMTPUTF8): formataddr insists on
        # ASCII addresses, so format the name alone and add the address.
        if not display:
            return address.encode("utf-8")
        shown = formataddr((display, "a@b"), charset="utf-8").removesuffix("<a@b>")
        return (shown + f"<{address}>").encode("utf-8")


#: A message split by L{split_fields}: its header fields and the rest.
Split = tuple[list[bytes], bytes]
