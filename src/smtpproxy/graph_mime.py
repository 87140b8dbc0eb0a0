"""Editing a message's header block without touching anything else.

Graph's MIME mode sends the message it is given, so the few changes Graph
forces on us (From must be the mailbox, the envelope decides Bcc) are made on
the raw bytes: the header fields we change are replaced, every other byte of
the header block and the whole body stay exactly as the client sent them.
Re-serialising through a parsed C{email.message.Message} would re-fold
headers and re-encode bodies, which breaks signatures and surprises people.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import formataddr

from smtpproxy.message import Mailbox


def split_fields(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split C{raw} into header fields (each with its folded lines) and the rest.

    @return: the fields, each ending with its own line break, and everything
        from the blank line that ends the header block (inclusive) to the end.
    """
    fields: list[bytes] = []
    position = 0
    size = len(raw)
    while position < size:
        newline = raw.find(b"\n", position)
        end = size if newline < 0 else newline + 1
        line = raw[position:end]
        if line in (b"\r\n", b"\n"):
            return fields, raw[position:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
        position = end
    return fields, b""


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

    @param from_field: the new From field, or None to keep the message's own.
    @param reply_to_field: a Reply-To field to add next to From, or None.
    @param bcc_field: the Bcc field to add at the end of the header block, or
        None for none; the message's own Bcc fields are always removed.
    @param drop: lower-case names of further fields to remove.
    """
    fields, rest = split_fields(raw)
    newline = line_break(fields)
    if fields and not fields[-1].endswith(b"\n"):
        fields[-1] += newline
    out: list[bytes] = []
    placed = from_field is None
    for field in fields:
        name = field_name(field)
        if name == b"bcc" or name in drop:
            continue
        if name == b"from" and from_field is not None:
            if not placed:
                out.append(from_field)
                if reply_to_field is not None:
                    out.append(reply_to_field)
                placed = True
            continue
        out.append(field)
    if not placed and from_field is not None:
        out[:0] = [from_field] + ([reply_to_field] if reply_to_field is not None else [])
    elif from_field is None and reply_to_field is not None:
        out.append(reply_to_field)
    if bcc_field is not None:
        out.append(bcc_field)
    if not rest:
        # A message with no body still needs its header block closed.
        rest = newline
    return b"".join(out) + rest
