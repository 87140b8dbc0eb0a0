"""C{RELAY_FROM}: the message goes upstream from one fixed sender, its author kept as Reply-To.

An upstream that only lets its own address send (an ISP's submission port,
a provider whose SPF and DMARC cover one sender) needs every message to
carry that address, in the envelope and in the From field.  The client's
From is not thrown away: it becomes Reply-To, so a reply still reaches the
author, unless the message already has a Reply-To, which is kept as it is
(the author asked for replies to go there, and a message may have only one
Reply-To field, RFC 5322 3.6).

Only the header block changes, and only these fields: the new From (and
Reply-To) are written first, every From field of the message is removed,
and every other byte of the header block and all of the body are kept as
received.  The edit is one pass over the header block's lines
(L{split_fields}); the message is never re-serialised by the C{email}
package, which would re-fold fields and re-encode parts.  A null
reverse-path (C{MAIL FROM:<>}: a bounce or other notification) stays null
in the envelope, so no notification can get one in return (RFC 5321
4.5.5); its From field is rewritten like any other.
"""

from __future__ import annotations

import dataclasses

from smtpproxy.mime.fields import (
    address_field,
    field_name,
    field_value,
    is_mbox_line,
    line_break,
    split_fields,
)
from smtpproxy.mime.message import Email, Mailbox


def force_sender(email: Email, sender: str) -> Email:
    """C{email} as it goes upstream from C{sender}: envelope and From, author as Reply-To.

    The new From keeps the display name of a single original author
    (C{"Scanner" <relay@example.com>}), so recipients still see who wrote;
    with several authors, or none, it is the bare address.
    """
    fields, rest = split_fields(email.raw)
    newline = line_break(fields)
    names = [field_name(field) for field in fields]
    authors = [field for field, name in zip(fields, names, strict=True) if name == b"from"]
    display = email.from_[0].name if len(email.from_) == 1 else ""
    added = [address_field("From", [Mailbox(display, sender)], newline)]
    if authors and b"reply-to" not in names:
        value = field_value(authors[0])
        if not value.endswith((b"\n", b"\r")):
            value += newline  # the field was the message's last line, without an ending
        added.append(b"Reply-To:" + value)
    kept = [
        field
        for number, (field, name) in enumerate(zip(fields, names, strict=True))
        # A leading mbox "From " line or a continuation of nothing would,
        # behind our fields, end the header block or join our last field.
        if name != b"from"
        and not (number == 0 and (is_mbox_line(field) or field[:1] in (b" ", b"\t")))
    ]
    if kept and not kept[-1].endswith((b"\n", b"\r")):
        kept[-1] += newline
    raw = b"".join(added) + b"".join(kept) + (rest or newline)
    envelope_from = sender if email.envelope_from else ""
    return dataclasses.replace(email, envelope_from=envelope_from, raw=raw)
