"""Messages for the mailbox tests, parsed by the relay's own parser."""

from __future__ import annotations

import struct
import zlib
from email.message import EmailMessage
from typing import Any

from smtpproxy.mime.message import Email, parse_message


def tiny_png(width: int = 48, height: int = 16) -> bytes:
    """A real PNG (a blue bar), so an inline image visibly renders in screenshots."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x09\x69\xda" * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def raw_message(
    subject: str = "Hello",
    text: str = "Body text.",
    html: str | None = None,
    sender: str = "Alice <alice@example.com>",
    to: str = "bob@example.org",
    cc: str | None = None,
    attachment: bytes | None = None,
    inline_image: tuple[str, bytes] | None = None,
) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    if cc:
        message["Cc"] = cc
    message["Subject"] = subject
    message["Message-ID"] = f"<{abs(hash(subject))}@example.com>"
    message["Date"] = "Tue, 01 Dec 2026 10:00:00 +0000"
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
        if inline_image is not None:
            cid, data = inline_image
            html_part = message.get_body(("html",))
            assert isinstance(html_part, EmailMessage)
            html_part.add_related(data, maintype="image", subtype="png", cid=f"<{cid}>")
    if attachment is not None:
        message.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="report.pdf"
        )
    return message.as_bytes().replace(b"\n", b"\r\n")


def email(
    raw: bytes | None = None,
    envelope_to: tuple[str, ...] = ("bob@example.org",),
    **kw: Any,
) -> Email:
    """A message parsed as the relay parses it (C{kw}: L{raw_message}'s arguments)."""
    return parse_message("alice@example.com", envelope_to, raw or raw_message(**kw))
