"""Editing a message's header block without touching anything else.

Graph's MIME mode sends the message it is given, so the few changes Graph
forces on us (From must be the mailbox, the envelope decides Bcc) are made on
the raw bytes: the header fields we change are replaced, every other byte of
the header block and the whole body stay exactly as the client sent them.
Re-serialising through a parsed C{email.message.Message} would re-fold
headers and re-encode bodies, which breaks signatures and surprises people.

The fields we add go at the very top of the header block.  Parsers disagree
about where a damaged header block ends: the standard library (and Graph)
stop at the first line that is not a field (a broken fold, a stray
sentence), so a Bcc appended at the end of the block could land in the body
and its recipient never get the message.  Every parser reads the first
lines as fields.  Lines are split the way the standard library splits
them (CRLF, bare CR or bare LF), so a field hidden behind a bare CR is
seen, and removed, like any other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.utils import formataddr

from smtpproxy.message import Mailbox

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
    position = 0
    size = len(raw)
    while position < size:
        match = _LINE.match(raw, position)
        end = match.end() if match is not None else size
        line = raw[position:end]
        if line in (b"\r\n", b"\n", b"\r"):
            return fields, raw[position:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
        position = end
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
    address = "".join(mailbox.address.split())
    try:
        return formataddr((display, address), charset="utf-8").encode("ascii")
    except UnicodeEncodeError:
        # An internationalised address (SMTPUTF8): formataddr insists on
        # ASCII addresses, so format the name alone and add the address.
        if not display:
            return address.encode("utf-8")
        shown = formataddr((display, "a@b"), charset="utf-8").removesuffix("<a@b>")
        return (shown + f"<{address}>").encode("utf-8")


def rewrite_headers(
    raw: bytes,
    *,
    from_field: bytes | None,
    reply_to_field: bytes | None,
    bcc_field: bytes | None,
    drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """Return C{raw} with From replaced, Reply-To added, Bcc replaced and C{drop} removed.

    The fields we add come first, in that order, ahead of every field of
    the message (see the module docstring for why).  Two kinds of line that
    belong to no field are removed, since behind our fields they would
    change meaning: an mbox C{From } line opening the message (mailbox
    framing, never part of a message; a strict parser would end the header
    block there) and a continuation line with no field to continue (it
    would become part of our last field).

    @param from_field: the new From field, or None to keep the message's own.
    @param reply_to_field: a Reply-To field to add, or None.
    @param bcc_field: the Bcc field to add, or None for none; the message's
        own Bcc fields are always removed.
    @param drop: lower-case names of further fields to remove.
    """
    fields, rest = split_fields(raw)
    newline = line_break(fields)
    if fields and not fields[-1].endswith((b"\n", b"\r")):
        fields[-1] += newline
    if fields and is_mbox_line(fields[0]):
        del fields[0]
    added = [f for f in (from_field, reply_to_field, bcc_field) if f is not None]
    out: list[bytes] = list(added)
    for field in fields:
        if field[:1] in (b" ", b"\t"):
            continue  # a continuation of nothing (only ever the first line)
        name = field_name(field)
        if name == b"bcc" or name in drop or (name == b"from" and from_field is not None):
            continue
        out.append(field)
    if not rest:
        # A message with no body still needs its header block closed.
        rest = newline
    return b"".join(out) + rest
