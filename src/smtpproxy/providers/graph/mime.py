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
from email import policy
from email.header import Header

from smtpproxy.mime.fields import (
    Split,
    field_name,
    format_mailbox,
    is_mbox_line,
    line_break,
    split_fields,
)
from smtpproxy.mime.message import Mailbox
from smtpproxy.mime.words import join_adjacent_words


def rewrite_headers(
    raw: bytes,
    *,
    from_field: bytes | None,
    reply_to_field: bytes | None,
    bcc_field: bytes | None,
    drop: frozenset[bytes] = frozenset(),
    split: Split | None = None,
) -> bytes:
    """Return C{raw} with From replaced, Reply-To added, Bcc replaced and C{drop} removed.

    See L{rewrite_fields}, which does the work on C{split} (C{raw} split
    by L{split_fields}, when the caller has done so already).
    """
    fields, rest = rewrite_fields(
        split if split is not None else split_fields(raw),
        from_field=from_field,
        reply_to_field=reply_to_field,
        bcc_field=bcc_field,
        drop=drop,
    )
    return b"".join(fields) + rest


def rewrite_fields(
    split: Split,
    *,
    from_field: bytes | None,
    reply_to_field: bytes | None,
    bcc_field: bytes | None,
    drop: frozenset[bytes] = frozenset(),
) -> Split:
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
    @return: the new message, split the way L{split_fields} would split it
        (the fields of C{split} are not changed).
    """
    fields, rest = list(split[0]), split[1]
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
    return out, rest


# Fields holding addresses: rebuilt with RFC 2047 display names and A-label
# domains when they carry 8-bit bytes.
_ADDRESS_FIELDS = frozenset(
    {b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc"}
    | {b"resent-" + name for name in (b"from", b"sender", b"to", b"cc", b"bcc")}
)
# Structured fields where RFC 2047 encoded words are not allowed (RFC 2047
# 5): one of these carrying 8-bit bytes has no ASCII form we can write.
_STRUCTURED_FIELDS = frozenset(
    {
        b"date",
        b"message-id",
        b"in-reply-to",
        b"references",
        b"resent-date",
        b"resent-message-id",
        b"return-path",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"content-disposition",
        b"content-id",
        b"dkim-signature",
    }
)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


#: 8-bit header bytes L{ascii_header_block} rewrites at most; past it: None.
MAX_CONVERTED_BYTES = 16 * 1024


def ascii_header_block(raw: bytes, split: Split | None = None) -> bytes | None:
    """C{raw} with every header field that carries 8-bit bytes written in ASCII.

    RFC 6532 lets a message carry UTF-8 in its header fields as raw bytes;
    Graph's MIME mode documents no support for that and Microsoft's readers
    take such bytes for ASCII (see docs/graph.md), so before a message goes
    that way each such field is rewritten as RFC 5322 and RFC 2047 say:

      - free-text fields (Subject, Comments, Keywords, X- fields, Received
        and any other not named below) become encoded words (UTF-8, base64);
      - address fields are rebuilt: display names encoded, domains as
        A-labels;
      - the body and every ASCII field stay byte for byte as they were.

    Bytes that are not UTF-8 (a legacy charset sent raw) are read with
    replacement characters, as the message parser reads them for JSON.

    @return: the new message, C{raw} itself when no field carries 8-bit
        bytes, or None when a field has no ASCII form: an address whose
        local part is not ASCII (RFC 6531 gives it none) or a structured
        field such as Message-ID holding 8-bit bytes, or more than
        L{MAX_CONVERTED_BYTES} of 8-bit fields.  Such a message must go
        another way (JSON).
    @param split: C{raw} split by L{split_fields}, when the caller has it
        (the relay splits a message's header block once).
    """
    fields, rest = split if split is not None else split_fields(raw)
    if all(field.isascii() for field in fields):
        return raw
    eight_bit = sum(len(field) for field in fields if not field.isascii())
    if eight_bit > MAX_CONVERTED_BYTES:
        # Real mail has a Subject and a few names in UTF-8.  The standard
        # library's header classes cost about 1 s per MB of such fields
        # (20 address fields of 55 KB took 6.5 s, all of it on the reactor
        # thread); a message with more goes by JSON, built from our parse.
        return None
    newline = line_break(fields)
    out: list[bytes] = []
    for field in fields:
        if field.isascii():
            out.append(field)
            continue
        converted = _ascii_field(field, newline)
        if converted is None:
            return None
        out.append(converted)
    return b"".join(out) + rest


def _ascii_field(field: bytes, newline: bytes) -> bytes | None:
    """One 8-bit header field in ASCII (see L{ascii_header_block}); None if it has no ASCII form."""
    name, colon, value = field.partition(b":")
    if not colon or _FIELD_NAME.fullmatch(name) is None:
        # Not a field (a stray line): every parser ends the header block
        # before it, so it is body text, which may be 8-bit.
        return field
    key = name.lower()
    if key in _STRUCTURED_FIELDS:
        return None
    text = " ".join(value.decode("utf-8", "replace").split())
    if key in _ADDRESS_FIELDS:
        return _ascii_address_field(name.decode("ascii"), text, newline)
    header = Header(text, "utf-8", header_name=name.decode("ascii"))
    return name + b": " + header.encode(linesep=newline.decode("ascii")).encode("ascii") + newline


def _ascii_address_field(name: str, text: str, newline: bytes) -> bytes | None:
    """An address field rebuilt in ASCII, or None when an address cannot be (or it cannot be read).

    Comments and the exact spelling are not kept (the field is rewritten
    only because its bytes could not go as they were); a field that names
    only empty addresses (C{"Name" <>}) is left out.
    """
    try:
        # Adjacent encoded words joined first: the library reads a space
        # between them in a display name (RFC 2047 6.2 says none).
        header = policy.default.header_factory(name, join_adjacent_words(text))
        groups = getattr(header, "groups", None)
    except Exception:
        # The standard library's address parser fails in its own ways on
        # damaged values; such a field cannot be rewritten faithfully.
        return None
    if groups is None:
        return None
    parts: list[bytes] = []
    for group in groups:
        mailboxes: list[bytes] = []
        for address in group.addresses:
            if address.addr_spec in ("", "<>"):
                continue  # a name with an empty address (<>): nobody to write
            mailbox = Mailbox(address.display_name, address.addr_spec)
            written = format_mailbox(mailbox)
            if not written.isascii():
                return None
            mailboxes.append(written)
        if group.display_name is None:
            parts.extend(mailboxes)
            continue
        label = format_mailbox(Mailbox(group.display_name, "a@b")).removesuffix(b"<a@b>")
        parts.append(label.rstrip() + b": " + b", ".join(mailboxes) + b";")
    if not parts:
        return b""  # only empty addresses: a field that names nobody is left out
    separator = b"," + newline + b" "
    return name.encode("ascii") + b": " + separator.join(parts) + newline
