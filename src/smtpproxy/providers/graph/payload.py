"""What to ask Graph for one message: which mailbox, which recipients, which requests.

L{plan_delivery} turns an L{Email} into a plan made of request bodies:

  - L{MimeSend}: one C{sendMail} with the raw message (base64), the faithful
    way: every header, both alternatives, inline images and calendar parts
    arrive as sent.  Used whenever the request fits under Graph's 4 MB cap
    and the header recipients can be made to match the envelope;
  - L{JsonSend}: one C{sendMail} with Graph's JSON message, used when the
    headers name people the envelope does not (Graph's MIME mode would mail
    them) or when C{GRAPH_SEND_MODE=json};
  - L{DraftSend}: a draft, its attachments (big ones through upload
    sessions), then C{send}: for messages too large for one request.  The
    draft is the raw message itself (MIME) with its largest attachments
    taken out (L{smtpproxy.providers.graph.mimeparts}), so headers and
    alternatives survive; only when the message is too large even without
    them is it rebuilt as a JSON draft.

A signed or encrypted message (L{is_signed}: S/MIME or PGP/MIME, or one holding
such a part at any depth) goes only as L{MimeSend}: the
JSON form is rebuilt from the parse and a MIME draft loses parts, and
either breaks the signature.  Every road that would lead elsewhere (too
large, header recipients outside the envelope, a header with no ASCII
form, C{GRAPH_SEND_MODE=json}, Graph refusing the MIME) refuses it with
C{554 5.3.4} instead (L{signed_refusal}).

The envelope decides who receives the message, exactly once each: header
To/Cc recipients that are in the envelope stay To/Cc, envelope recipients
named in neither become Bcc, and header recipients outside the envelope
receive nothing.  A Bcc header is never passed on as it was.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from typing import NotRequired, TypedDict
from urllib.parse import quote

from smtpproxy.addresses import (
    ascii_address,
    domain_of,
    is_deliverable,
    mailbox_key,
    qualify,
    simple_mailboxes,
)
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.fields import (
    Split,
    address_field,
    field_name,
    field_value,
    line_break,
    split_fields,
)
from smtpproxy.mime.message import Attachment, Email, Mailbox
from smtpproxy.providers.graph.draftid import draft_message_id, with_message_id
from smtpproxy.providers.graph.mime import ascii_header_block, rewrite_fields
from smtpproxy.providers.graph.mimeparts import is_signed, take_out


class AddressJson(TypedDict):
    """Graph's emailAddress: the address, and a display name when there is one."""

    address: str
    name: NotRequired[str]


class RecipientJson(TypedDict):
    """Graph's recipient resource, as every address field of a message takes it."""

    emailAddress: AddressJson


class BodyJson(TypedDict):
    """Graph's itemBody: the one body JSON mode can carry."""

    contentType: str
    content: str


class HeaderJson(TypedDict):
    """One internetMessageHeaders entry."""

    name: str
    value: str


# Functional form: "@odata.type" and "from" are not Python identifiers.
AttachmentJson = TypedDict(
    "AttachmentJson",
    {
        "@odata.type": str,
        "name": str,
        "contentType": str,
        "contentBytes": str,
        "isInline": bool,
        "contentId": NotRequired[str],
    },
)

MessageJson = TypedDict(
    "MessageJson",
    {
        "subject": str,
        "body": BodyJson,
        "from": RecipientJson,
        "toRecipients": list[RecipientJson],
        "ccRecipients": list[RecipientJson],
        "bccRecipients": list[RecipientJson],
        "replyTo": NotRequired[list[RecipientJson]],
        "internetMessageHeaders": NotRequired[list[HeaderJson]],
        "importance": NotRequired[str],
        "attachments": NotRequired[list[AttachmentJson]],
    },
)


class SendMailJson(TypedDict):
    """The body of C{sendMail} in JSON mode."""

    message: MessageJson
    saveToSentItems: NotRequired[bool]


class UploadItemJson(TypedDict):
    """The AttachmentItem of C{attachments/createUploadSession}."""

    attachmentType: str
    name: str
    size: int
    contentType: str
    isInline: bool
    contentId: NotRequired[str]


# Graph refuses request bodies over 4 MB; keep a margin for the request line
# and headers, which some gateways count too.
REQUEST_LIMIT = 4 * 1024 * 1024 - 64 * 1024
# "Under 3 MB: POST the attachment; 3 MB to 150 MB: upload session" (Graph's
# documented rule; Graph refuses upload sessions for small files).
UPLOAD_MIN = 3_000_000
MAX_ATTACHMENT = 150_000_000
# Upload ranges must stay below 4 MB; 12 x 320 KiB is the usual safe size.
UPLOAD_CHUNK = 12 * 320 * 1024
MAX_RECIPIENTS = 500
MAX_CUSTOM_HEADERS = 5


def matching_mailbox(from_: Sequence[Mailbox], senders: Sequence[str]) -> str | None:
    """The configured mailbox the From header names, if it names one."""
    configured = {mailbox_key(sender): sender for sender in senders}
    for mailbox in from_:
        found = configured.get(mailbox_key(mailbox.address))
        if found is not None:
            return found
    return None


def bound_mailbox(mailbox: str, senders: Sequence[str]) -> str:
    """The configured sender an identity's C{mailbox} names, spelt as configured.

    An identity bound to a mailbox (its policy's C{mailbox}, an API key's)
    sends as that mailbox whatever its From header says, as a message whose
    From names no configured mailbox is sent as one of them.  Start-up
    refuses an identity file naming a mailbox outside C{GRAPH_SENDER}; a
    message that still names one (queued before C{GRAPH_SENDER} changed)
    is refused for good: no retry makes Graph let it send as that mailbox.

    @raise PermanentDeliveryError: C{550 5.7.1}, naming the mailbox.
    """
    key = mailbox_key(mailbox)
    for sender in senders:
        if mailbox_key(sender) == key:
            return sender
    raise PermanentDeliveryError(
        f"this login may only send as {mailbox}, which is not a GRAPH_SENDER mailbox",
        "5.7.1",
        550,
    )


def choose_mailbox(from_: Sequence[Mailbox], senders: Sequence[str]) -> str:
    """The configured mailbox to send as: the one the From header names, else the first.

    (The provider passes a single mailbox when the sending budgets chose it.)
    """
    return matching_mailbox(from_, senders) or senders[0]


@dataclass(frozen=True, slots=True)
class Recipients:
    """Who receives the message, and in which role.

    @ivar outside: header (To/Cc) recipients that are not in the envelope;
        they must not receive the message.
    """

    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    outside: tuple[Mailbox, ...] = ()

    @property
    def count(self) -> int:
        return len(self.to) + len(self.cc) + len(self.bcc)


def plan_recipients(email: Email) -> Recipients:
    """Split the envelope recipients into To, Cc and Bcc, each address exactly once."""
    envelope: dict[str, str] = {}
    for address in email.envelope_to:
        key = mailbox_key(address)
        if key and key not in envelope:
            envelope[key] = address.strip().strip("<>").strip()
    placed: set[str] = set()
    outside: dict[str, Mailbox] = {}
    roles: tuple[list[Mailbox], list[Mailbox]] = ([], [])
    for header, role in ((email.to, roles[0]), (email.cc, roles[1])):
        for mailbox in header:
            key = mailbox_key(mailbox.address)
            if key in envelope:
                if key not in placed:
                    placed.add(key)
                    role.append(mailbox)
            elif key and key not in outside:
                outside[key] = mailbox
    names = {mailbox_key(m.address): m.name for m in email.bcc}
    bcc = tuple(
        Mailbox(names.get(key, ""), address)
        for key, address in envelope.items()
        if key not in placed
    )
    return Recipients(tuple(roles[0]), tuple(roles[1]), bcc, tuple(outside.values()))


def _from_name(from_: Sequence[Mailbox], mailbox: str) -> str:
    """The display name to keep on the rewritten From."""
    for candidate in from_:
        if mailbox_key(candidate.address) == mailbox_key(mailbox):
            return candidate.name
    return from_[0].name if from_ else ""


def _from_is(from_: Sequence[Mailbox], mailbox: str) -> bool:
    return len(from_) == 1 and mailbox_key(from_[0].address) == mailbox_key(mailbox)


# Longer address fields are not read (the standard library's address parser
# recurses on some long values); a message whose To/Cc we cannot read goes
# as JSON, where we name the recipients ourselves.
MAX_ADDRESS_FIELD = 64 * 1024


def _header_pairs(value: bytes) -> list[tuple[str, str]] | None:
    """The (name, address) pairs of a raw address field; None when it cannot be read.

    The everyday forms (C{Name <a@b.example>}, bare C{a@b.example}, comma
    separated) are read by L{simple_mailboxes}, which gives what the standard
    library's C{getaddresses} gives on them (a property test checks) at a
    fraction of its cost; anything else goes to C{getaddresses}.
    """
    if len(value) > MAX_ADDRESS_FIELD:
        return None
    unfolded = value.replace(b"\r", b"").replace(b"\n", b"")
    text = unfolded.decode("utf-8", "replace")
    simple = simple_mailboxes(text)
    if simple is not None:
        return [(mailbox.name, mailbox.address) for mailbox in simple]
    try:
        return getaddresses([text])
    except (RecursionError, ValueError, IndexError):
        return None


def raw_recipients_in_envelope(email: Email, split: Split | None = None) -> bool:
    """Whether every address Graph's MIME mode would read from To/Cc is in the envelope.

    Graph parses the raw header, not our parse of it; a header our parser
    salvaged differently (or that names someone we cannot make out) must not
    go as MIME, or Graph might mail a person the envelope never named.
    """
    envelope = {mailbox_key(address) for address in email.envelope_to}
    fields, _ = split if split is not None else split_fields(email.raw)
    for f in fields:
        if field_name(f) not in (b"to", b"cc"):
            continue
        pairs = _header_pairs(field_value(f))
        if pairs is None:
            return False
        for name, address in pairs:
            if address and mailbox_key(address) in envelope:
                continue
            if not address and not name:
                continue  # an empty group such as "undisclosed-recipients:;"
            return False
    return True


def reply_to_mailboxes(
    authors: Sequence[Mailbox], domain: str
) -> tuple[tuple[Mailbox, ...], tuple[str, ...]]:
    """The Reply-To the relay writes for C{authors}: each qualified, the invalid left out.

    A bare local part (C{root}) gets C{@domain}; an address that is still
    not one Graph accepts is dropped, since Graph would refuse the whole
    message for it (C{ErrorInvalidRecipients}) and a reply path is not
    worth a bounce.

    @return: the mailboxes to write, and one warning per address left out
        (the address clipped, so the log line stays short).
    """
    kept: list[Mailbox] = []
    warnings: list[str] = []
    for author in authors:
        address = qualify(author.address, domain)
        if is_deliverable(address):
            kept.append(Mailbox(author.name, address))
        else:
            warnings.append(
                f"Reply-To: left out the original From {_clip(author.address)!r}, "
                "not an address Graph accepts"
            )
    return tuple(kept), tuple(warnings)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _author_reply_to(
    original_from: bytes, email: Email, domain: str, newline: bytes
) -> tuple[bytes | None, tuple[str, ...]]:
    """The Reply-To field made from the message's own From field, and any warnings.

    The field's own bytes are kept when every address in it is valid
    (display names stay exactly as written); otherwise it is rebuilt from
    the qualified, valid addresses, or left out.
    """
    value = field_value(original_from)
    pairs = _header_pairs(value)
    if pairs is not None and pairs and all(is_deliverable(a) for _, a in pairs):
        return b"Reply-To:" + value, ()
    authors = [Mailbox(n, a) for n, a in pairs or () if a] or list(email.from_)
    kept, warnings = reply_to_mailboxes(authors, domain)
    if not authors:
        warnings = ("Reply-To: the original From names no address; none added",)
    field = address_field("Reply-To", kept, newline) if kept else None
    return field, warnings


def mime_message(email: Email, mailbox: str, recipients: Recipients, domain: str = "") -> bytes:
    """The raw message as Graph's MIME mode must see it (see L{mime_message_and_warnings})."""
    return mime_message_and_warnings(email, mailbox, recipients, domain)[0]


def mime_message_and_warnings(
    email: Email, mailbox: str, recipients: Recipients, domain: str = ""
) -> tuple[bytes, tuple[str, ...]]:
    """The raw message as Graph's MIME mode must see it, and what had to be left out.

    See L{mime_fields}.
    """
    split, warnings = mime_fields(email, mailbox, recipients, domain)
    return b"".join(split[0]) + split[1], warnings


def mime_fields(
    email: Email,
    mailbox: str,
    recipients: Recipients,
    domain: str = "",
    split: Split | None = None,
) -> tuple[Split, tuple[str, ...]]:
    """The raw message as Graph's MIME mode must see it, and what had to be left out.

    From becomes the mailbox (Graph refuses any other with ErrorSendAsDenied)
    keeping the display name; the original From is kept as Reply-To when the
    message has none, so replies still reach the author (a bare local part
    qualified with C{domain}, default the mailbox's domain; an invalid
    address left out); the Bcc header is rebuilt from the envelope (Graph
    delivers to Bcc addresses and removes the header from the copies); a
    Sender naming someone else is removed, as Graph would read it as sending
    on their behalf.  The fields we add go first in the header block.
    Nothing else changes.

    @param split: C{email.raw} split by L{split_fields}, if the caller has it.
    @return: the new message split into header fields and the rest, and
        warnings about what was left out.
    """
    if split is None:
        split = split_fields(email.raw)
    fields = split[0]
    newline = line_break(fields)
    names = [field_name(f) for f in fields]
    original_from = fields[names.index(b"from")] if b"from" in names else None
    has_reply_to = b"reply-to" in names or bool(email.reply_to)
    from_field = reply_to_field = None
    warnings: tuple[str, ...] = ()
    if original_from is None or not _from_is(email.from_, mailbox):
        display = _from_name(email.from_, mailbox)
        from_field = address_field("From", [Mailbox(display, mailbox)], newline)
        if original_from is not None and not has_reply_to:
            reply_to_field, warnings = _author_reply_to(
                original_from, email, domain or domain_of(mailbox), newline
            )
    drop: set[bytes] = set()
    for f, name in zip(fields, names, strict=True):
        if name == b"sender":
            pairs = _header_pairs(field_value(f))
            addresses = [a for _, a in pairs or () if a]
            if pairs is None or [mailbox_key(a) for a in addresses] != [mailbox_key(mailbox)]:
                drop.add(b"sender")
    bcc_field = address_field("Bcc", recipients.bcc, newline) if recipients.bcc else None
    rewritten = rewrite_fields(
        split,
        from_field=from_field,
        reply_to_field=reply_to_field,
        bcc_field=bcc_field,
        drop=frozenset(drop),
    )
    return rewritten, warnings


def encode_json(document: object) -> bytes:
    """The exact bytes sent for a JSON body (compact, so sizes are predictable)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _recipient(mailbox: Mailbox) -> RecipientJson:
    # Domains as A-labels (Exchange takes those everywhere); a UTF-8 local
    # part stays as it is: Exchange Online delivers to EAI addresses.
    address: AddressJson = {"address": ascii_address(mailbox.address)}
    if mailbox.name:
        address["name"] = mailbox.name
    return {"emailAddress": address}


def custom_headers(headers: Sequence[tuple[str, str]]) -> tuple[list[HeaderJson], list[str]]:
    """The X- headers Graph's JSON mode can carry: at most five, one per name.

    Graph rejects any other header name and more than five of them with a
    400; we keep the first five and report the rest so they can be logged.

    @return: the internetMessageHeaders entries, and the names left out.
    """
    kept: list[HeaderJson] = []
    seen: set[str] = set()
    dropped: list[str] = []
    for name, value in headers:
        key = name.strip().lower()
        if not key.startswith("x-") or key in seen:
            continue
        if len(kept) == MAX_CUSTOM_HEADERS:
            dropped.append(name)
            continue
        seen.add(key)
        kept.append({"name": name.strip(), "value": " ".join(value.split())})
    return kept, dropped


def _importance(headers: Sequence[tuple[str, str]]) -> str | None:
    """Graph's importance from the Importance or X-Priority header, if either says."""
    for name, value in headers:
        key, text = name.strip().lower(), value.strip().lower()
        if key == "importance" and text in ("high", "low", "normal"):
            return text
        if key == "x-priority" and text[:1] in ("1", "2"):
            return "high"
        if key == "x-priority" and text[:1] in ("4", "5"):
            return "low"
    return None


def json_message(
    email: Email, mailbox: str, recipients: Recipients, domain: str = ""
) -> tuple[MessageJson, list[str], tuple[str, ...]]:
    """Graph's JSON message for C{email}, without attachments.

    JSON can carry one body: HTML when the message has it, else the text.
    Reply-To is the message's own, else its From when we send as someone
    else; either way its bare local parts are qualified with C{domain}
    (default: the mailbox's domain) and invalid addresses are left out,
    since here we write the field and Graph would refuse the message for it.

    @return: the message, the names of headers that could not be carried,
        and warnings about Reply-To addresses left out.
    """
    body: BodyJson
    if email.html is not None:
        body = {"contentType": "HTML", "content": email.html}
    else:
        body = {"contentType": "Text", "content": email.text or ""}
    message: MessageJson = {
        "subject": email.subject,
        "body": body,
        "from": _recipient(Mailbox(_from_name(email.from_, mailbox), mailbox)),
        "toRecipients": [_recipient(m) for m in recipients.to],
        "ccRecipients": [_recipient(m) for m in recipients.cc],
        "bccRecipients": [_recipient(m) for m in recipients.bcc],
    }
    authors: Sequence[Mailbox] = ()
    if email.reply_to:
        authors = email.reply_to
    elif email.from_ and not _from_is(email.from_, mailbox):
        authors = email.from_
    reply_to, warnings = reply_to_mailboxes(authors, domain or domain_of(mailbox))
    if reply_to:
        message["replyTo"] = [_recipient(m) for m in reply_to]
    headers, dropped = custom_headers(email.headers)
    if headers:
        message["internetMessageHeaders"] = headers
    importance = _importance(email.headers)
    if importance is not None:
        message["importance"] = importance
    return message, dropped, warnings


def attachment_name(attachment: Attachment, index: int) -> str:
    """The attachment's file name, or a made-up one (Graph requires a name)."""
    if attachment.filename:
        return attachment.filename
    if attachment.content_type == "message/rfc822":
        extension = ".eml"
    else:
        extension = mimetypes.guess_extension(attachment.content_type) or ".bin"
    return f"attachment-{index}{extension}"


def _attachment_stub(attachment: Attachment, index: int) -> AttachmentJson:
    stub: AttachmentJson = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": attachment_name(attachment, index),
        "contentType": attachment.content_type or "application/octet-stream",
        "contentBytes": "",
        "isInline": attachment.inline,
    }
    if attachment.content_id:
        stub["contentId"] = attachment.content_id
    return stub


def attachment_json(attachment: Attachment, index: int) -> AttachmentJson:
    """A fileAttachment carrying the part's bytes in base64."""
    document = _attachment_stub(attachment, index)
    document["contentBytes"] = base64.b64encode(attachment.data).decode("ascii")
    return document


def _b64_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


def attachment_json_size(attachment: Attachment, index: int) -> int:
    """Bytes L{attachment_json} encodes to, computed without encoding the data."""
    return len(encode_json(_attachment_stub(attachment, index))) + _b64_size(attachment.size)


@dataclass(frozen=True, slots=True)
class Upload:
    """An attachment big enough to need an upload session."""

    name: str
    content_type: str
    data: bytes = field(repr=False)
    inline: bool = False
    content_id: str | None = None

    def session_request(self) -> bytes:
        """The body of C{attachments/createUploadSession}."""
        item: UploadItemJson = {
            "attachmentType": "file",
            "name": self.name,
            "size": len(self.data),
            "contentType": self.content_type,
            "isInline": self.inline,
        }
        if self.content_id:
            item["contentId"] = self.content_id
        return encode_json({"AttachmentItem": item})


@dataclass(frozen=True, slots=True)
class MimeSend:
    """One C{sendMail} request with the base64 of the (header-adjusted) message.

    @ivar signed: the message is signed or encrypted, so it may not fall
        back to the JSON form (L{json_fallback}).
    """

    mailbox: str
    body: bytes = field(repr=False)
    recipients: Recipients
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    signed: bool = False


@dataclass(frozen=True, slots=True)
class JsonSend:
    """One C{sendMail} request with a JSON message, attachments included."""

    mailbox: str
    body: bytes = field(repr=False)
    recipients: Recipients
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DraftSend:
    """Create a draft, add what did not fit in it, upload big parts, send.

    @ivar draft: the body of C{POST /messages}: the base64 of the MIME
        message without the parts that are added after (C{draft_type}
        C{text/plain}), or Graph's JSON message with the attachments that
        fit (C{application/json}).
    @ivar attachments: bodies of C{POST /messages/{id}/attachments}, one each.
    @ivar uploads: the parts that go through upload sessions.
    @ivar made_message_id: the Message-ID the relay gave a MIME draft whose
        message had none (L{smtpproxy.providers.graph.draftid}), else None.
    """

    mailbox: str
    draft: bytes = field(repr=False)
    attachments: tuple[bytes, ...] = field(repr=False)
    uploads: tuple[Upload, ...]
    recipients: Recipients
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    draft_type: str = "application/json"
    made_message_id: str | None = None

    @property
    def mime(self) -> bool:
        """Whether the draft is made from the raw message (else from JSON)."""
        return self.draft_type == "text/plain"


Plan = MimeSend | JsonSend | DraftSend


def plan_delivery(
    email: Email,
    senders: Sequence[str],
    mode: str,
    default_domain: str = "",
    save_to_sent_items: bool = True,
    recipients: Recipients | None = None,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Plan:
    """Choose and build the requests for C{email}.

    @param mode: C{auto} or C{mime} (raw MIME whenever that is correct and
        fits) or C{json} (always the JSON message).
    @param default_domain: what bare local parts in a Reply-To we write are
        qualified with (C{SMTP_DEFAULT_DOMAIN}); empty: the mailbox's domain.
    @return: the plan; its C{warnings} say what was left out of the
        message (for the log), its C{notes} why it goes the way it goes.
    @raise PermanentDeliveryError: the message breaks a Graph limit no
        retry can fix (more than 500 recipients, an attachment over 150 MB).
    @param save_to_sent_items: C{GRAPH_SAVE_TO_SENT_ITEMS}; only a JSON
        C{sendMail} can say no (Graph has no switch for MIME sends or drafts).
    @param recipients: L{plan_recipients}C{(email)}, when the caller has it
        already (the provider counts them for the sending budgets first).
    @param new_id: a fresh token for the Message-ID given to a MIME draft
        whose message has none (called only then).
    """
    if recipients is None:
        recipients = plan_recipients(email)
    if recipients.count == 0:
        raise PermanentDeliveryError("message has no recipients", "5.5.1", 554)
    if recipients.count > MAX_RECIPIENTS:
        raise PermanentDeliveryError(
            f"Graph accepts at most {MAX_RECIPIENTS} recipients per message, "
            f"this one has {recipients.count}",
            "5.5.3",
            554,
        )
    for index, attachment in enumerate(email.attachments, 1):
        if attachment.size > MAX_ATTACHMENT:
            raise PermanentDeliveryError(
                f"attachment {attachment_name(attachment, index)!r} is larger than "
                f"Graph's {MAX_ATTACHMENT // 1_000_000} MB limit",
                "5.3.4",
                554,
            )
    mailbox = choose_mailbox(email.from_, senders)
    notes: list[str] = []
    if email.abandoned:
        return _raw_plan(email, mailbox, recipients, mode, default_domain)
    # Checked once, before any road below that ends in the JSON form or a
    # draft: only one whole MIME request keeps a signature intact.
    signed = is_signed(email.raw)
    if mode == "json":
        if signed:
            raise signed_refusal("GRAPH_SEND_MODE=json rebuilds every message as JSON")
    else:
        # The header block is split once, here, for every step below.
        split = split_fields(email.raw)
        if recipients.outside or not raw_recipients_in_envelope(email, split):
            if signed:
                # As MIME, Graph would mail the header recipients too.
                raise signed_refusal(
                    "its To/Cc name recipients who are not in the envelope (or cannot be"
                    " read), so it cannot go as MIME"
                )
            notes.append(
                "To/Cc name recipients who are not in the envelope (or cannot be read); "
                "sending as JSON so that they do not receive it"
            )
        else:
            ascii_mime, mime, warnings = _ascii_mime(
                email, mailbox, recipients, default_domain, split
            )
            if ascii_mime is None:
                if signed:
                    raise signed_refusal(
                        "a header field has no ASCII form, so it cannot go as MIME"
                    )
                notes.append(
                    "a header field has no ASCII form (a UTF-8 local part, or 8-bit bytes in"
                    " a structured field); sending as JSON"
                )
            else:
                if ascii_mime is not mime:
                    notes.append("8-bit header fields written as RFC 2047 encoded words")
                if _b64_size(len(ascii_mime)) <= REQUEST_LIMIT:
                    body = base64.b64encode(ascii_mime)
                    return MimeSend(mailbox, body, recipients, tuple(notes), warnings, signed)
                if signed:
                    raise signed_refusal(
                        "it is too large for Graph's 4 MB MIME request and cannot be split"
                    )
                made = None
                if email.message_id is None:
                    # Only here: the draft must be found by its internetMessageId.
                    made = draft_message_id(new_id(), default_domain, mailbox)
                    ascii_mime = with_message_id(ascii_mime, made)
                draft = _mime_draft_plan(ascii_mime, mailbox, recipients, notes, warnings)
                if draft is not None:
                    if made is not None:
                        note = "the message has no Message-ID; its draft was given one"
                        draft = replace(draft, made_message_id=made, notes=(*draft.notes, note))
                    return draft
                notes.append(
                    "message too large for one MIME request even without its attachments;"
                    " sending as a JSON draft"
                )
    return _json_plan(email, mailbox, recipients, notes, default_domain, save_to_sent_items)


def _mime_draft_plan(
    mime: bytes,
    mailbox: str,
    recipients: Recipients,
    notes: list[str],
    warnings: tuple[str, ...],
) -> DraftSend | None:
    """A draft made from the raw message with its largest attachments taken out.

    Each part taken out is added to the draft afterwards: by one POST when
    under 3 MB, else through an upload session.  None when the message does
    not fit in one request even without every part that may be taken out.
    Never called for a signed message (taking a part out would break it).
    """
    taken = take_out(mime, lambda size: _b64_size(size) <= REQUEST_LIMIT)
    if taken is None:
        return None
    rest, parts = taken
    posts: list[bytes] = []
    uploads: list[Upload] = []
    for index, part in enumerate(parts, 1):
        if part.size >= UPLOAD_MIN:
            uploads.append(_upload(part, index))
        else:
            posts.append(encode_json(attachment_json(part, index)))
    notes.append(
        f"message too large for one MIME request; sending it as a MIME draft with {len(parts)}"
        " attachment(s) added separately"
    )
    return DraftSend(
        mailbox,
        base64.b64encode(rest),
        tuple(posts),
        tuple(uploads),
        recipients,
        tuple(notes),
        warnings,
        draft_type="text/plain",
    )


def signed_refusal(why: str) -> PermanentDeliveryError:
    """The refusal of a signed or encrypted message that cannot go as one whole MIME request.

    Graph's JSON form is rebuilt from the parse (no multipart/signed, no
    pkcs7 body) and a draft loses the parts taken out: either would deliver
    the message with a broken signature and nobody would be told.
    """
    return PermanentDeliveryError(
        f"signed or encrypted (S/MIME or PGP/MIME) message refused: {why}; any other way of"
        " sending it would break its signature",
        "5.3.4",
        554,
    )


def json_fallback(
    email: Email,
    sent: MimeSend,
    graph_code: str,
    default_domain: str = "",
    save_to_sent_items: bool = True,
    recipients: Recipients | None = None,
) -> Plan:
    """The JSON plan for a message whose MIME form Graph could not read (auto mode).

    @raise PermanentDeliveryError: the message is signed or encrypted
        (L{signed_refusal}), or the JSON form breaks a Graph limit.
    """
    if sent.signed:
        raise signed_refusal(f"Graph could not read it as MIME ({graph_code})")
    return plan_delivery(
        email, (sent.mailbox,), "json", default_domain, save_to_sent_items, recipients
    )


def _upload(attachment: Attachment, index: int) -> Upload:
    return Upload(
        attachment_name(attachment, index),
        attachment.content_type or "application/octet-stream",
        attachment.data,
        attachment.inline,
        attachment.content_id,
    )


def _ascii_mime(
    email: Email, mailbox: str, recipients: Recipients, domain: str, split: Split
) -> tuple[bytes | None, bytes, tuple[str, ...]]:
    """The MIME form (see L{mime_fields}) with its header fields in ASCII (None: impossible),
    the MIME form as it was, and the warnings; from C{email.raw} already C{split}."""
    rewritten, warnings = mime_fields(email, mailbox, recipients, domain, split)
    mime = b"".join(rewritten[0]) + rewritten[1]
    return ascii_header_block(mime, rewritten), mime, warnings


def _raw_plan(
    email: Email, mailbox: str, recipients: Recipients, mode: str, domain: str
) -> MimeSend:
    """The only plan for a message whose parse was abandoned: its raw bytes, as MIME.

    Graph's JSON form is built from our parse, which does not exist; so the
    message goes as MIME when the mode allows it, its header recipients are
    all in the envelope and it fits in one request, and is refused otherwise.
    """
    why = None
    if mode == "json":
        why = "GRAPH_SEND_MODE=json"
    elif not raw_recipients_in_envelope(email, split := split_fields(email.raw)):
        why = "its To/Cc headers name recipients outside the envelope"
    else:
        ascii_mime, _, warnings = _ascii_mime(email, mailbox, recipients, domain, split)
        if ascii_mime is None:
            why = "a header field has no ASCII form"
        elif _b64_size(len(ascii_mime)) <= REQUEST_LIMIT:
            return MimeSend(mailbox, base64.b64encode(ascii_mime), recipients, (), warnings)
        else:
            why = "it is too large for one MIME request"
    raise PermanentDeliveryError(
        f"message too complex to parse in time, and it cannot be sent unparsed: {why}",
        "5.6.0",
        554,
    )


def _json_plan(
    email: Email,
    mailbox: str,
    recipients: Recipients,
    notes: list[str],
    domain: str,
    save_to_sent_items: bool = True,
) -> Plan:
    message, dropped, warnings = json_message(email, mailbox, recipients, domain)
    if dropped:
        notes.append(f"Graph carries at most 5 X- headers; left out: {', '.join(dropped)}")
    indexed = list(enumerate(email.attachments, 1))
    large = [(i, a) for i, a in indexed if a.size >= UPLOAD_MIN]
    small = [(i, a) for i, a in indexed if a.size < UPLOAD_MIN]
    if not large:
        estimate = len(encode_json({"message": message})) + sum(
            attachment_json_size(a, i) + 20 for i, a in small
        )
        if estimate <= REQUEST_LIMIT:
            whole = message.copy()
            if small:
                whole["attachments"] = [attachment_json(a, i) for i, a in small]
            request: SendMailJson = {"message": whole}
            if not save_to_sent_items:
                # Graph's default is to save; it documents the flag as one
                # to send only when it is false.
                request["saveToSentItems"] = False
            body = encode_json(request)
            if len(body) <= REQUEST_LIMIT:
                return JsonSend(mailbox, body, recipients, tuple(notes), warnings)
    base = encode_json(message)
    if len(base) > REQUEST_LIMIT:
        raise PermanentDeliveryError(
            "message text is larger than Graph's 4 MB request limit", "5.3.4", 554
        )
    # Put as many small attachments into the draft itself as fit; each of the
    # rest gets its own request.
    room = REQUEST_LIMIT - len(base) - len(',"attachments":[]')
    inside: list[tuple[int, Attachment]] = []
    separate: list[tuple[int, Attachment]] = []
    for i, attachment in small:
        size = attachment_json_size(attachment, i) + 1
        if size <= room:
            inside.append((i, attachment))
            room -= size
        else:
            separate.append((i, attachment))
    draft = base
    if inside:
        draft = encode_json({**message, "attachments": [attachment_json(a, i) for i, a in inside]})
    uploads = tuple(_upload(a, i) for i, a in large)
    return DraftSend(
        mailbox,
        draft,
        tuple(encode_json(attachment_json(a, i)) for i, a in separate),
        uploads,
        recipients,
        tuple(notes),
        warnings,
    )


def chunk_ranges(size: int, chunk: int = UPLOAD_CHUNK) -> list[tuple[int, int]]:
    """The byte ranges (first, last, inclusive) to PUT, in order."""
    return [(start, min(start + chunk, size) - 1) for start in range(0, size, chunk)]


def content_range(first: int, last: int, total: int) -> str:
    """The Content-Range header value for one upload range."""
    return f"bytes {first}-{last}/{total}"


@dataclass(frozen=True, slots=True)
class GraphUrls:
    """The Graph v1.0 URLs the provider uses, under C{endpoint} (sovereign clouds differ)."""

    endpoint: str

    def user(self, mailbox: str) -> str:
        return f"{self.endpoint.rstrip('/')}/v1.0/users/{quote(mailbox, safe='@')}"

    def send_mail(self, mailbox: str) -> str:
        return f"{self.user(mailbox)}/sendMail"

    def messages(self, mailbox: str) -> str:
        return f"{self.user(mailbox)}/messages"

    def message(self, mailbox: str, message_id: str) -> str:
        return f"{self.messages(mailbox)}/{quote(message_id, safe='')}"

    def attachments(self, mailbox: str, message_id: str) -> str:
        return f"{self.message(mailbox, message_id)}/attachments"

    def upload_session(self, mailbox: str, message_id: str) -> str:
        return f"{self.attachments(mailbox, message_id)}/createUploadSession"

    def send_draft(self, mailbox: str, message_id: str) -> str:
        return f"{self.message(mailbox, message_id)}/send"
