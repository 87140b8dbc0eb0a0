"""The JSON the mailbox API answers with, in Mailpit's shapes.

Field names and types follow Mailpit's API v1 as the C{mailpit-api} npm
client declares them (C{MailpitMessageListItem},
C{MailpitMessageSummaryResponse}, C{MailpitAttachmentResponse},
C{MailpitInfoResponse}, ...), so that client and the Cypress/Playwright
helpers built on Mailpit work against smtpproxy unchanged.  Pure functions
from stored messages to plain dicts; what is left out is in docs/mailbox.md.
"""

from __future__ import annotations

import email.utils
import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from smtpproxy.addresses import Mailbox
from smtpproxy.providers.mailbox.store import Part, Stored


def iso_time(seconds: float) -> str:
    """C{1970-01-01T00:00:00.000Z}: Mailpit's time format (UTC, milliseconds)."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def message_date(stored: Stored) -> str:
    """The message's Date header in Mailpit's format, else the time it arrived."""
    header = stored.email.date
    if header:
        try:
            parsed = email.utils.parsedate_to_datetime(header[:200])
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed = None
        if parsed is not None:
            try:
                return iso_time(parsed.timestamp())
            except (OverflowError, OSError, ValueError):
                pass
    return iso_time(stored.created)


def address(mailbox: Mailbox) -> dict[str, str]:
    return {"Name": mailbox.name, "Address": mailbox.address}


def addresses(mailboxes: Iterable[Mailbox]) -> list[dict[str, str]]:
    return [address(m) for m in mailboxes]


def sender(stored: Stored) -> dict[str, str] | None:
    """The first From mailbox; the envelope sender without one; null for neither (Mailpit)."""
    found = stored.email.from_
    if found:
        return address(found[0])
    if stored.email.envelope_from:
        return {"Name": "", "Address": stored.email.envelope_from}
    return None


def list_item(stored: Stored) -> dict[str, object]:
    """C{MailpitMessageListItem}."""
    e = stored.email
    return {
        "ID": stored.id,
        "MessageID": e.message_id or "",
        "Read": stored.read,
        "From": sender(stored),
        "To": addresses(e.to),
        "Cc": addresses(e.cc),
        "Bcc": addresses(e.bcc),
        "ReplyTo": addresses(e.reply_to),
        "Subject": e.subject,
        "Created": iso_time(stored.created),
        "Tags": [],
        "Size": e.size,
        "Attachments": stored.haystack.attachments,
        "Snippet": stored.snippet,
    }


def messages_page(
    found: Sequence[Stored], start: int, limit: int, total: int, unread: int
) -> dict[str, object]:
    """C{MailpitMessagesSummaryResponse} for messages C{start..start+limit} of C{found}."""
    page = found[start : start + limit]
    return {
        "total": total,
        "unread": unread,
        "count": len(page),
        "messages_count": len(found),
        "messages_unread": sum(1 for m in found if not m.read),
        "start": start,
        "tags": [],
        "messages": [list_item(m) for m in page],
    }


def attachment(part: Part) -> dict[str, object]:
    """C{MailpitAttachmentResponse} (checksums of the decoded bytes)."""
    data = part.attachment.data
    return {
        "PartID": part.part_id,
        "FileName": part.attachment.filename or "",
        "ContentType": part.attachment.content_type,
        "ContentID": part.attachment.content_id or "",
        "Size": len(data),
        "Checksums": {
            "MD5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            "SHA1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
            "SHA256": hashlib.sha256(data).hexdigest(),
        },
    }


def message(stored: Stored) -> dict[str, object]:
    """C{MailpitMessageSummaryResponse}."""
    e = stored.email
    unsubscribe = _first_header(stored, "list-unsubscribe")
    return {
        "ID": stored.id,
        "MessageID": e.message_id or "",
        "From": sender(stored),
        "To": addresses(e.to),
        "Cc": addresses(e.cc),
        "Bcc": addresses(e.bcc),
        "ReplyTo": addresses(e.reply_to),
        "ReturnPath": e.envelope_from,
        "Subject": e.subject,
        "ListUnsubscribe": {
            "Header": unsubscribe,
            "Links": [],
            "Errors": "",
            "HeaderPost": _first_header(stored, "list-unsubscribe-post"),
        },
        "Date": message_date(stored),
        "Tags": [],
        "Text": e.text or "",
        "HTML": e.html or "",
        "Size": e.size,
        "Inline": [attachment(p) for p in stored.parts if p.attachment.inline],
        "Attachments": [attachment(p) for p in stored.parts if not p.attachment.inline],
    }


def _first_header(stored: Stored, name: str) -> str:
    for key, value in stored.email.headers:
        if key.lower() == name:
            return value
    return ""


def canonical_header(name: str) -> str:
    """C{message-id} -> C{Message-Id}: the key form Mailpit's Go server gives headers."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


def headers(stored: Stored) -> dict[str, list[str]]:
    """C{MailpitMessageHeadersResponse}: every header's values by canonical name, sorted."""
    found: dict[str, list[str]] = {}
    for name, value in stored.email.headers:
        found.setdefault(canonical_header(name), []).append(value)
    return dict(sorted(found.items()))
