"""Requests to messages: strict JSON reading, field checks, and the message built by C{email}.

Pure functions over plain values.  Everything a client sends is checked
before anything is built: the JSON must be an object of known fields of
the right types; every value that ends up in a header (the subject, a
display name, a file name, a content id, a custom header's value, an
address) must be free of line breaks and other control characters, and is
refused naming the field when it is not, rather than cleaned (a cleaned
value would be a different message than the one the client meant).
Addresses must be valid mailboxes (L{smtpproxy.addresses}) in the plain
form providers deliver to.

The message itself is an L{email.message.EmailMessage} built through the
standard library's header registry and content manager, which encode,
fold and quote every value themselves; no header line is ever assembled
from strings here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import NoReturn

from smtpproxy import addresses
from smtpproxy.web.api.headercache import POLICY
from smtpproxy.web.api.problems import ApiError

__all__ = [
    "Attachment",
    "JsonMessage",
    "Mailbox",
    "RawSubmission",
    "build_message",
    "check_header_text",
    "encode_message",
    "parse_json",
    "read_json_message",
    "read_raw_json",
    "read_raw_query",
]

MAX_SUBJECT = 998
MAX_HEADER_VALUE = 998
MAX_NAME = 256
MAX_FILENAME = 255
MAX_CUSTOM_HEADERS = 50
MAX_ATTACHMENTS = 100

#: The fields of C{POST /v1/messages}; anything else is refused by name.
MESSAGE_FIELDS = (
    "from",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "text",
    "html",
    "attachments",
    "headers",
)
ATTACHMENT_FIELDS = ("filename", "content_type", "content", "content_id", "inline")
RAW_FIELDS = ("from", "to", "data")
ADDRESS_FIELDS = ("address", "name")

#: Headers a client may set besides C{X-*}: threading and list headers,
#: which applications need and which change nothing about who gets the
#: message or who it claims to be from.
EXTRA_HEADERS = frozenset(
    {"in-reply-to", "references", "list-unsubscribe", "list-unsubscribe-post", "auto-submitted"}
)

_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,75}")
_MIME_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}"
_CONTENT_TYPE = re.compile(rf"({_MIME_NAME})/({_MIME_NAME})")
_CONTENT_ID = re.compile(r"[!-~]{1,250}")
# C0 controls (tab included), DEL, C1 controls, and the Unicode line and
# paragraph separators: none belongs in a header, and each could end or
# split one somewhere down the line.
#: A JSON escape of a UTF-16 surrogate, U+D800 to U+DFFF.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """An address as checked: its parts (domain as A-labels) and an optional display name."""

    local: str
    domain: str
    name: str = ""

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    maintype: str
    subtype: str
    content: bytes
    content_id: str | None
    inline: bool


@dataclass(frozen=True, slots=True)
class JsonMessage:
    """A checked C{POST /v1/messages} request."""

    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: Mailbox | None
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]

    @property
    def envelope_recipients(self) -> list[str]:
        """To, Cc and Bcc in order, each mailbox once (compared as SMTP compares them)."""
        seen: set[str] = set()
        found = []
        for mailbox in (*self.to, *self.cc, *self.bcc):
            key = addresses.envelope_key(mailbox.address)
            if key not in seen:
                seen.add(key)
                found.append(mailbox.address)
        return found


@dataclass(frozen=True, slots=True)
class RawSubmission:
    """A checked C{POST /v1/messages/raw}: the envelope and the bytes, unchanged."""

    sender: Mailbox
    recipients: tuple[Mailbox, ...]
    data: bytes

    @property
    def envelope_recipients(self) -> list[str]:
        seen: set[str] = set()
        found = []
        for mailbox in self.recipients:
            key = addresses.envelope_key(mailbox.address)
            if key not in seen:
                seen.add(key)
                found.append(mailbox.address)
        return found


# -- JSON ---------------------------------------------------------------------


def _refuse_constant(name: str) -> NoReturn:
    raise ApiError(400, "invalid_json", f"{name} is not JSON")


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document: dict[str, object] = {}
    for name, value in pairs:
        if name in document:
            # Two readers of the same request could see two messages.
            raise ApiError(400, "invalid_json", "a field appears twice", _shown_name(name))
        document[name] = value
    return document


def parse_json(body: bytes) -> dict[str, object]:
    """The request body as a JSON object: UTF-8, no duplicate names, no NaN.

    @raise ApiError: 400 C{invalid_json}.
    """
    try:
        text = body.decode("utf-8")
        document = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON is nested too deeply") from None
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text) is None:
        return document
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no UTF-8
        # text can carry: every later step (addresses, headers, the body)
        # would fail on it.  One linear pass over the parsed document, made
        # only when the text has such an escape at all (UTF-8 itself cannot
        # hold a surrogate, so an escape is the only way one gets in; pairs
        # and an escaped backslash before "ud800" take the long way too).
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_json", "the JSON holds a lone surrogate escape") from None
    return document


def _shown_name(name: str) -> str:
    """A client-chosen field name as it may appear in an error: short and printable ASCII."""
    cleaned = "".join(c if " " < c < "\x7f" else "?" for c in name[:64])
    return cleaned if len(name) <= 64 else cleaned + "..."


def _only(document: Mapping[str, object], known: Sequence[str], prefix: str = "") -> None:
    for name in document:
        if name not in known:
            raise ApiError(400, "unknown_field", "unknown field", prefix + _shown_name(name))


# -- field checks -----------------------------------------------------------------


def check_header_text(value: object, field: str, limit: int) -> str:
    """A text value bound for a header: a string, not too long, without control characters.

    @raise ApiError: 400 C{invalid_field} (type, length) or C{header_injection}.
    """
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", "must be text", field)
    if _CONTROL.search(value):
        raise ApiError(
            400,
            "header_injection",
            "must not contain line breaks or other control characters",
            field,
        )
    if len(value) > limit:
        raise ApiError(400, "invalid_field", f"longer than {limit} characters", field)
    return value


def check_address(value: str, field: str, *, utf8_local: bool = False) -> Mailbox:
    """An address as a client typed it: a deliverable mailbox, its domain as A-labels.

    The syntax is the SMTP front door's (L{addresses.mailbox_problem}: RFC
    5321, or RFC 6531 for UTF-8, lengths in octets), narrowed to the plain
    form providers deliver to (L{addresses.is_deliverable}).

    @param utf8_local: a UTF-8 local part is taken, as SMTP takes it from a
        client that declared SMTPUTF8: only where the client's own bytes go
        on (the raw endpoint; the provider decides whether it can carry it).
        A message this module builds has nowhere to write one.
    """
    # Too long is an address problem (mailbox_problem), not a text-field one.
    value = check_header_text(value, field, 4 * addresses.MAX_PATH)
    if addresses.mailbox_problem(value) is not None or not addresses.is_deliverable(value):
        raise ApiError(400, "invalid_address", "not a valid email address", field)
    local, domain = addresses.split(value)
    if not utf8_local and not local.isascii():
        raise ApiError(
            400,
            "invalid_address",
            "a non-ASCII local part can only be sent with /v1/messages/raw",
            field,
        )
    ascii_domain = addresses.ascii_domain(domain)
    if ascii_domain is None:  # is_deliverable and mailbox_problem passed: cannot happen
        raise ApiError(400, "invalid_address", "not a valid email address", field)
    return Mailbox(local, ascii_domain)


def read_mailbox(value: object, field: str, *, utf8_local: bool = False) -> Mailbox:
    """C{"a@b.example"} or C{{"address": "a@b.example", "name": "A"}}.

    @param utf8_local: see L{check_address}.
    """
    if isinstance(value, str):
        return check_address(value, field, utf8_local=utf8_local)
    if isinstance(value, dict):
        _only(value, ADDRESS_FIELDS, field + ".")
        if "address" not in value:
            raise ApiError(400, "missing_field", "required", field + ".address")
        mailbox = check_address(value["address"], field + ".address", utf8_local=utf8_local)
        name = value.get("name", "")
        name = check_header_text(name, field + ".name", MAX_NAME)
        return Mailbox(mailbox.local, mailbox.domain, name)
    raise ApiError(400, "invalid_field", "must be an address or an address object", field)


def _mailboxes(
    document: Mapping[str, object], name: str, limit: int, *, utf8_local: bool = False
) -> tuple[Mailbox, ...]:
    value = document.get(name, [])
    if not isinstance(value, list):
        raise ApiError(400, "invalid_field", "must be a list of addresses", name)
    if len(value) > limit:
        raise ApiError(400, "too_many_recipients", f"more than {limit} recipients", name)
    return tuple(
        read_mailbox(item, f"{name}[{i}]", utf8_local=utf8_local) for i, item in enumerate(value)
    )


def _body_text(document: Mapping[str, object], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", "must be text", name)
    if "\x00" in value:
        raise ApiError(400, "invalid_field", "must not contain NUL characters", name)
    return value


def decode_base64(value: object, field: str, limit: int) -> bytes:
    """Strict base64 (no whitespace, no stray characters), refused before decoding past C{limit}."""
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", "must be base64 text", field)
    if len(value) > (limit + 2) // 3 * 4:
        raise ApiError(413, "too_large", "larger than the message size limit", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_field", "must be base64 text", field) from None


def _attachment(value: object, field: str, limit: int) -> Attachment:
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_field", "must be an object", field)
    _only(value, ATTACHMENT_FIELDS, field + ".")
    for required in ("filename", "content"):
        if required not in value:
            raise ApiError(400, "missing_field", "required", f"{field}.{required}")
    filename = check_header_text(value["filename"], field + ".filename", MAX_FILENAME)
    if not filename:
        raise ApiError(400, "invalid_field", "must not be empty", field + ".filename")
    kind = check_header_text(
        value.get("content_type", "application/octet-stream"), field + ".content_type", 129
    )
    match = _CONTENT_TYPE.fullmatch(kind)
    if match is None or match.group(1).lower() in ("multipart", "message"):
        raise ApiError(
            400, "invalid_field", "must be a type/subtype (not multipart or message)", field
        )
    content_id = value.get("content_id")
    if content_id is not None:
        content_id = check_header_text(content_id, field + ".content_id", 250)
        if not _CONTENT_ID.fullmatch(content_id) or "<" in content_id or ">" in content_id:
            raise ApiError(
                400,
                "invalid_field",
                "printable ASCII without <, > or spaces",
                field + ".content_id",
            )
    inline = value.get("inline", False)
    if not isinstance(inline, bool):
        raise ApiError(400, "invalid_field", "must be true or false", field + ".inline")
    content = decode_base64(value["content"], field + ".content", limit)
    return Attachment(
        filename, match.group(1).lower(), match.group(2).lower(), content, content_id, inline
    )


def _custom_headers(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_field", "must be an object of header names", "headers")
    if len(value) > MAX_CUSTOM_HEADERS:
        raise ApiError(400, "invalid_field", f"more than {MAX_CUSTOM_HEADERS}", "headers")
    found = []
    for name, text in value.items():
        field = "headers." + _shown_name(name)
        if not _HEADER_NAME.fullmatch(name):
            raise ApiError(400, "header_injection", "not a header field name", field)
        lowered = name.lower()
        if not (lowered.startswith("x-") or lowered in EXTRA_HEADERS):
            raise ApiError(
                400,
                "header_not_allowed",
                "only X-* headers and threading or list headers may be set",
                field,
            )
        found.append((name, check_header_text(text, field, MAX_HEADER_VALUE)))
    return tuple(found)


def read_json_message(
    document: Mapping[str, object], *, max_recipients: int, max_size: int
) -> JsonMessage:
    """Check a C{POST /v1/messages} document field by field.

    @raise ApiError: 400 naming the first field that is wrong (413 for
        content that cannot fit C{max_size} whatever else it holds).
    """
    _only(document, MESSAGE_FIELDS)
    if "from" not in document:
        raise ApiError(400, "missing_field", "required", "from")
    sender = read_mailbox(document["from"], "from")
    to = _mailboxes(document, "to", max_recipients)
    cc = _mailboxes(document, "cc", max_recipients)
    bcc = _mailboxes(document, "bcc", max_recipients)
    count = len(to) + len(cc) + len(bcc)
    if count == 0:
        raise ApiError(400, "missing_field", "at least one recipient is required", "to")
    if count > max_recipients:
        raise ApiError(400, "too_many_recipients", f"more than {max_recipients} recipients", "to")
    reply_to = document.get("reply_to")
    subject = document.get("subject", "")
    attachments = document.get("attachments", [])
    if not isinstance(attachments, list):
        raise ApiError(400, "invalid_field", "must be a list", "attachments")
    if len(attachments) > MAX_ATTACHMENTS:
        raise ApiError(400, "invalid_field", f"more than {MAX_ATTACHMENTS}", "attachments")
    return JsonMessage(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=None if reply_to is None else read_mailbox(reply_to, "reply_to"),
        subject=check_header_text(subject, "subject", MAX_SUBJECT),
        text=_body_text(document, "text"),
        html=_body_text(document, "html"),
        attachments=tuple(
            _attachment(item, f"attachments[{i}]", max_size) for i, item in enumerate(attachments)
        ),
        headers=_custom_headers(document.get("headers")),
    )


def read_raw_json(
    document: Mapping[str, object], *, max_recipients: int, max_size: int
) -> RawSubmission:
    """C{{"from", "to": [...], "data": base64}}: the raw form for JSON clients."""
    _only(document, RAW_FIELDS)
    for required in RAW_FIELDS:
        if required not in document:
            raise ApiError(400, "missing_field", "required", required)
    sender = read_mailbox(document["from"], "from", utf8_local=True)
    if isinstance(document["from"], dict) and "name" in document["from"]:
        raise ApiError(400, "unknown_field", "an envelope address has no name", "from.name")
    recipients = _mailboxes(document, "to", max_recipients, utf8_local=True)
    if not recipients:
        raise ApiError(400, "missing_field", "at least one recipient is required", "to")
    data = decode_base64(document["data"], "data", max_size)
    if not data:
        raise ApiError(400, "invalid_field", "the message is empty", "data")
    return RawSubmission(sender, recipients, data)


def read_raw_query(
    args: Mapping[bytes, Sequence[bytes]], data: bytes, *, max_recipients: int
) -> RawSubmission:
    """C{?from=a@b&to=c@d&to=e@f} with a C{message/rfc822} body."""
    for name in args:
        if name not in (b"from", b"to"):
            shown = _shown_name(name.decode("utf-8", "replace"))
            raise ApiError(400, "unknown_field", "unknown query parameter", shown)
    senders = args.get(b"from", [])
    if len(senders) != 1:
        raise ApiError(400, "missing_field", "exactly one from= is required", "from")
    sender = _query_address(senders[0], "from")
    recipients = args.get(b"to", [])
    if not recipients:
        raise ApiError(400, "missing_field", "at least one to= is required", "to")
    if len(recipients) > max_recipients:
        raise ApiError(400, "too_many_recipients", f"more than {max_recipients} recipients", "to")
    checked = tuple(_query_address(value, f"to[{i}]") for i, value in enumerate(recipients))
    if not data:
        raise ApiError(400, "invalid_field", "the message is empty", "body")
    return RawSubmission(sender, checked, data)


def _query_address(value: bytes, field: str) -> Mailbox:
    """An envelope address from the query string (already percent-decoded, C{+} as a space)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_address", "not UTF-8", field) from None
    if " " in text:
        # a+b@x arrives as "a b@x": say why, so the client encodes its '+'.
        raise ApiError(
            400,
            "invalid_address",
            "not a valid email address: it contains a space (a '+' in a query string"
            " means a space; send '+' as %2B)",
            field,
        )
    return check_address(text, field, utf8_local=True)


# -- building ---------------------------------------------------------------------

#: RFC 5322 2.1.1: the longest line a message may carry, CRLF excluded.
MAX_LINE = 998


def _transfer_encoding(text: str) -> str | None:
    """C{7bit} for ASCII text whose lines all fit RFC 5322; else None (the package chooses).

    Left to itself the package quoted-printable encodes any text with a
    line over 78 characters, which costs time and makes the message
    harder to read; 7bit is valid up to 998.
    """
    if text.isascii() and max(map(len, text.splitlines()), default=0) <= MAX_LINE:
        return "7bit"
    return None


def _header_address(mailbox: Mailbox) -> Address:
    return Address(display_name=mailbox.name, username=mailbox.local, domain=mailbox.domain)


def build_message(request: JsonMessage, *, message_id: str, now: datetime) -> EmailMessage:
    """The message a checked request describes, built by the C{email} package.

    Bcc recipients are in the envelope only, never in a header.  The
    text and HTML bodies become C{multipart/alternative}; attachments are
    added after them (C{multipart/mixed}), inline ones with their content
    id so the HTML can refer to them.

    @param message_id: the C{Message-ID} value, angle brackets included.
    @param now: the C{Date}, timezone-aware.
    """
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
    return message


def encode_message(message: EmailMessage, max_size: int) -> bytes:
    """The message's bytes as they go on (CRLF line ends), or 413 past C{max_size}."""
    data = message.as_bytes(policy=POLICY)
    if len(data) > max_size:
        raise ApiError(
            413, "too_large", f"the encoded message is larger than {max_size} bytes", None
        )
    return data
