"""The API's previous message builder, kept only as the reference the new one is held to.

Until issue 14's third round the API built every message as an
L{email.message.EmailMessage} through the header registry and the
content manager (C{set_content}, C{add_alternative}, C{add_attachment}),
with the stock C{email.policy.SMTP}.  C{tests/web/api/test_builders.py}
parses what this and L{smtpproxy.web.api.compose.build_message} write for
the same request and holds the two equal.
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from smtpproxy.web.api.compose import JsonMessage, Mailbox

POLICY = email.policy.SMTP


def _transfer_encoding(text: str) -> str | None:
    if text.isascii() and max(map(len, text.splitlines()), default=0) <= 998:
        return "7bit"
    return None


def _header_address(mailbox: Mailbox) -> Address:
    return Address(display_name=mailbox.name, username=mailbox.local, domain=mailbox.domain)


def old_build(request: JsonMessage, *, message_id: str, now: datetime) -> bytes:
    """The bytes the previous builder wrote for C{request}."""
    message = EmailMessage(policy=POLICY)
    message["From"] = _header_address(request.sender)
    if request.to:
        message["To"] = [_header_address(m) for m in request.to]
    if request.cc:
        message["Cc"] = [_header_address(m) for m in request.cc]
    if request.reply_to is not None:
        message["Reply-To"] = _header_address(request.reply_to)
    message["Subject"] = request.subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id
    for name, value in request.headers:
        message[name] = value
    text, html = request.text, request.html
    if html is not None and text is not None:
        message.set_content(text, cte=_transfer_encoding(text))
        message.add_alternative(html, subtype="html", cte=_transfer_encoding(html))
    elif html is not None:
        message.set_content(html, subtype="html", cte=_transfer_encoding(html))
    else:
        message.set_content(text or "", cte=_transfer_encoding(text or ""))
    add: Callable[..., None] = message.add_attachment
    for attachment in request.attachments:
        add(
            attachment.content,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
            disposition="inline" if attachment.inline else "attachment",
            cid=None if attachment.content_id is None else f"<{attachment.content_id}>",
        )
    return message.as_bytes(policy=POLICY)
