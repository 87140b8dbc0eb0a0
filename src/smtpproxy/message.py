"""The parsed message handed to providers.

An L{Email} is an immutable value built from the exact bytes received over
SMTP plus the SMTP envelope.  Providers read the structured fields (bodies,
attachments, header addresses) but must treat C{raw} as the truth: it is the
message exactly as the client sent it, and relaying it unchanged is the only
way to be faithful to headers nobody thought to model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address from a header: display name (may be empty) and addr-spec."""

    name: str
    address: str

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


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
    @ivar raw: the message bytes exactly as received (after dot-unstuffing),
        CRLF line endings, without any header we add.
    @ivar warnings: human-readable notes about parts that could not be
        decoded; such parts are kept (as attachments or raw) never dropped.
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

    @property
    def size(self) -> int:
        return len(self.raw)
