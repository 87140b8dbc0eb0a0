"""Decisions for the draft path when an answer from Graph is lost.

A request whose connection dies after Graph received it may have taken
effect: a draft created, a range stored, a draft sent.  The provider then
asks Graph where things stand and these pure functions read the answers:

  - a created draft is found again by its Internet message id (a MIME
    draft keeps the message's Message-ID) or, for a JSON draft, by an
    extended property holding a tag made for this attempt; drafts found
    that are not the one carried on are strays, deleted (sends of one
    message share its Message-ID, so on the MIME path they take turns:
    L{smtpproxy.providers.graph.draftturns});
  - an upload session says where it stands (C{nextExpectedRanges}) when
    its URL is read with GET; the upload resumes there;
  - a draft whose send may have gone through and that is gone (when the
    send is retried, or when we delete it) was sent if the mailbox's Sent
    Items holds the message (Graph files every sent draft there), looked
    up by its C{internetMessageId}; a draft gone otherwise was deleted by
    someone, and nothing was sent.

No I/O here: the provider (L{smtpproxy.providers.graph.provider}) carries
the requests out.
"""

from __future__ import annotations

import enum
import json
from urllib.parse import quote

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.graph.payload import GraphUrls

# A named property in our own namespace (a GUID made for smtpproxy): Graph
# stores it on the draft; it is not written into the message that is sent.
TAG_PROPERTY = "String {6f0b7a4e-3c52-4d8e-9a1f-5d2e8c4b7a10} Name smtpproxyDraftTag"
# More drafts than attempts of one createDraft can never match a lookup; a
# page of this size holds them all.
LOOKUP_PAGE = 25
# How often one upload may resume from the session's own position before
# the message fails (each resume follows a refused range).
MAX_RESUMES = 3


def tag_json_draft(body: bytes, tag: str) -> bytes:
    """The JSON draft C{body} with C{tag} in an extended property of its own.

    A JSON draft gets its Internet message id from Exchange, so the id is
    no handle before the answer arrives; the tag is.
    """
    document = json.loads(body)
    properties = list(document.get("singleValueExtendedProperties", []))
    properties.append({"id": TAG_PROPERTY, "value": tag})
    document["singleValueExtendedProperties"] = properties
    # As payload writes it: UTF-8, not \u escapes, which could triple the size.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def internet_message_id(value: str | None) -> str | None:
    """The C{<...>} message id in a Message-ID field's value, as Graph shows it.

    None when there is none to use (no field, no angle brackets, or a
    quote in it, which an OData literal could still carry but which no
    sane message id has).
    """
    if not value:
        return None
    start = value.find("<")
    end = value.find(">", start + 1)
    if start < 0 or end < 0:
        return None
    found = value[start : end + 1]
    if not found.isascii() or any(c in found for c in "'\r\n\t ") or len(found) < 3:
        return None
    return found


def _literal(text: str) -> str:
    """An OData string literal (a quote is written twice)."""
    return "'" + text.replace("'", "''") + "'"


def lookup_filter(*, message_id: str | None, tag: str | None) -> str | None:
    """The C{$filter} that finds the drafts of one attempt, or None if none can.

    @param message_id: the C{<...>} id of a MIME draft.
    @param tag: the tag given to a JSON draft by L{tag_json_draft}.
    """
    if tag is not None:
        return (
            "singleValueExtendedProperties/Any(ep: ep/id eq "
            f"{_literal(TAG_PROPERTY)} and ep/value eq {_literal(tag)})"
        )
    if message_id is not None:
        return f"internetMessageId eq {_literal(message_id)}"
    return None


def lookup_url(urls: GraphUrls, mailbox: str, condition: str) -> str:
    """C{GET} this to list the ids of the mailbox's drafts that match C{condition}."""
    return _listing(urls, mailbox, "drafts", condition) + f"&$top={LOOKUP_PAGE}"


def sent_lookup_url(urls: GraphUrls, mailbox: str, message_id: str) -> str:
    """C{GET} this to list the ids of the copies in the mailbox's Sent Items of the
    message whose C{internetMessageId} is C{message_id}."""
    return _listing(urls, mailbox, "sentitems", f"internetMessageId eq {_literal(message_id)}")


def _listing(urls: GraphUrls, mailbox: str, folder: str, condition: str) -> str:
    query = f"$filter={quote(condition, safe='')}&$select=id"
    return f"{urls.user(mailbox)}/mailFolders/{folder}/messages?{query}"


def in_sent_items(status: int, body: bytes) -> bool | None:
    """Whether a Sent Items listing (L{sent_lookup_url}) found the message; None when
    the answer says nothing (an error status, an unreadable body)."""
    if not 200 <= status < 300:
        return None
    found = found_ids(body)
    return None if found is None else bool(found)


def gone_draft_error(summary: str) -> TransientDeliveryError:
    """The failure of a step on a draft that Graph no longer has (404).

    Someone deleted the draft (a user in Outlook, another client, a
    retention policy) or its upload session expired while the relay worked
    on it: nothing was sent, so the client is told to try again (451), not
    that the message is undeliverable.
    """
    return TransientDeliveryError(
        f"Graph no longer has the draft or its upload session ({summary}): it was deleted "
        "while the relay was sending it; nothing was sent, try again later",
        "4.3.0",
    )


def found_ids(body: bytes) -> list[str] | None:
    """The message ids in a list answer, or None if it cannot be read."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    values = document.get("value") if isinstance(document, dict) else None
    if not isinstance(values, list):
        return None
    ids = [v.get("id") for v in values if isinstance(v, dict)]
    if not all(isinstance(i, str) and i for i in ids) or len(ids) != len(values):
        return None
    return [i for i in ids if isinstance(i, str)]


def strays(found: list[str], keep: str | None) -> list[str]:
    """The drafts to delete: every one found but C{keep}, each once."""
    return [i for i in dict.fromkeys(found) if i != keep]


def resume_at(body: bytes, total: int) -> int | None:
    """Where an upload session expects the next byte, from its status answer.

    Graph writes C{nextExpectedRanges} for Outlook attachments as one
    C{"{start}"}; OneDrive's form C{"start-"} or C{"start-end"} is read
    too.  None when the answer does not say, or says something outside the
    part (the caller then gives up rather than guess).
    """
    try:
        document = json.loads(body)
    except ValueError:
        return None
    ranges = document.get("nextExpectedRanges") if isinstance(document, dict) else None
    if not isinstance(ranges, list) or len(ranges) != 1 or not isinstance(ranges[0], str):
        return None
    start = ranges[0].partition("-")[0]
    if not start.isdigit() or len(start) > 15:
        return None
    position = int(start)
    return position if 0 <= position < total else None


class Deletion(enum.Enum):
    """What deleting a draft found."""

    DELETED = "deleted"
    """Graph deleted it (2xx)."""
    GONE = "gone"
    """Graph had no such item (404 ErrorItemNotFound) at the first answer."""
    UNKNOWN = "unknown"
    """No clear answer: the delete failed, or an earlier attempt of it may
    have deleted the draft itself before the 404."""


def deletion_outcome(status: int | None, graph_code: str | None, *, uncertain: bool) -> Deletion:
    """Read the answer to deleting a draft.

    @param status: the final status (None: the delete failed without one).
    @param uncertain: an earlier attempt of this delete may have taken effect.
    """
    if status is not None and 200 <= status < 300:
        return Deletion.DELETED
    if status == 404 and graph_code == "ErrorItemNotFound" and not uncertain:
        return Deletion.GONE
    return Deletion.UNKNOWN


def sent_although_failed(send_uncertain: bool, deletion: Deletion) -> bool:
    """Whether a draft whose send failed was sent after all.

    Graph removes a draft from Drafts once it sends it, so after a send
    that may have gone through (an answer lost), a draft that is gone when
    we delete it was sent: the message counts as delivered, and the client
    is not told to send it again.  A draft we could delete was not sent
    (or not yet, which deleting stops); without an ambiguous attempt a
    missing draft means something else removed it, not that it was sent.
    """
    return send_uncertain and deletion is Deletion.GONE
