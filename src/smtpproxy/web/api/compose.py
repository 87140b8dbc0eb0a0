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

The message itself is built by the standard library's C{email} package:
its C{Message} classes, C{formataddr}, C{Charset}, C{set_param} and a
policy (L{headercache.POLICY}) that folds every long value; text that
cannot travel as it is (non-ASCII, or holding C{=?}) is first cut into
RFC 2047 words by the package's C{Charset} (L{names}); no header line is
ever assembled from strings here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import quoprimime
from email.charset import BASE64, QP, Charset
from email.encoders import encode_base64
from email.message import Message
from email.mime.base import MIMEBase
from email.utils import format_datetime
from typing import NoReturn, cast

from smtpproxy import addresses
from smtpproxy.web.api import names
from smtpproxy.web.api.flatten import as_bytes
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
    "lines_fit",
    "parse_json",
    "read_json_message",
    "read_raw_json",
    "read_raw_query",
    "transfer_encoding",
    "wire_text",
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


#: How many checked addresses L{check_address} keeps (an application sends
#: from a few senders to recurring recipients; the checks are a pure function
#: of the text, so a kept result is the same result).
KEPT_ADDRESSES = 1024
#: The longest text looked at as an address at all.
_ADDRESS_TEXT = 4 * addresses.MAX_PATH


@functools.lru_cache(maxsize=KEPT_ADDRESSES)
def _valid_mailbox(value: str, utf8_local: bool) -> Mailbox | None:
    """C{value} as a checked L{Mailbox}, or None when L{check_address} refuses it."""
    try:
        return _check_address(value, "", utf8_local)
    except ApiError:
        return None


def check_address(value: object, field: str, *, utf8_local: bool = False) -> Mailbox:
    """An address as a client typed it: a deliverable mailbox, its domain as A-labels.

    The syntax is the SMTP front door's (L{addresses.mailbox_problem}: RFC
    5321, or RFC 6531 for UTF-8, lengths in octets), narrowed to the plain
    form providers deliver to (L{addresses.is_deliverable}).  Results are
    kept (L{KEPT_ADDRESSES}): the check is a pure function of the text.

    @param utf8_local: a UTF-8 local part is taken, as SMTP takes it from a
        client that declared SMTPUTF8: only where the client's own bytes go
        on (the raw endpoint; the provider decides whether it can carry it).
        A message this module builds has nowhere to write one.
    """
    if type(value) is str and len(value) <= _ADDRESS_TEXT:
        # Bounded keys too: an overlong text is refused below, never kept.
        found = _valid_mailbox(value, utf8_local)
        if found is not None:
            return found
    # Refused: checked again, to say why, naming the field.
    return _check_address(value, field, utf8_local)


def _check_address(value: object, field: str, utf8_local: bool) -> Mailbox:
    # Too long is an address problem (mailbox_problem), not a text-field one.
    value = check_header_text(value, field, _ADDRESS_TEXT)
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
        text = check_header_text(text, field, MAX_HEADER_VALUE)
        if not lowered.startswith("x-") and text.isascii() and not names.fits(name, text):
            # Message ids and URLs travel only as written, and this one has
            # a word no header line can carry (RFC 5322's 998).
            raise ApiError(400, "invalid_field", "a word longer than a header line", field)
        found.append((name, text))
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
#: The policy's line length, past which the package chooses an encoding for non-ASCII text.
_FOLD = 78


def _charset(body_encoding: int | None) -> Charset:
    charset = Charset("utf-8")
    # None (no body encoding) is a documented value the stubs leave out.
    charset.body_encoding = cast(int, body_encoding)
    return charset


#: UTF-8 text written as it is (7bit or 8bit, as the bytes are), in quoted
#: printable, or in base64.  Never changed once made (C{Charset} keeps no
#: state of the message it encodes).
_AS_IS, _QUOTED, _BASE64 = _charset(None), _charset(QP), _charset(BASE64)


#: What C{str.splitlines} ends a line at besides LF.


def lines_fit(text: str, limit: int) -> bool:
    """Is every line of C{text}, cut at CR and LF only, at most C{limit} characters?

    Lines as the wire has them: form feeds and the other separators
    C{str.splitlines} also cuts at are characters of a line there.

    Text whose only line end is LF (JSON bodies, nearly always) is checked
    without cutting it into lines: from the start of a line, the last LF
    within C{limit} characters must exist, and the next line starts after
    it.  Each step moves on by at least C{limit} characters every second
    time (if the last LF in reach is the line's first character, the next
    one is at the far end of the next reach), so the cost stays linear.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    start, end = 0, len(text)
    while end - start > limit:
        newline = text.rfind("\n", start, start + limit + 1)
        if newline < 0:
            return False
        start = newline + 1
    return True


def transfer_encoding(text: str) -> str:
    """The C{Content-Transfer-Encoding} a text body gets: what the previous builder chose.

    C{7bit} for ASCII text whose lines all fit RFC 5322 (998), as this API
    always asked for; otherwise the content manager's own rule, followed
    step by step: C{8bit} (this policy allows it) when every line fits the
    policy's 78 columns, else quoted-printable or base64, whichever encodes
    the first ten lines shorter.
    """
    if text.isascii() and lines_fit(text, MAX_LINE):
        return "7bit"
    lines = text.encode("utf-8").splitlines()
    if max(map(len, lines), default=0) <= _FOLD:
        return "8bit"
    sniff = b"\r\n".join(lines[:10]) + b"\r\n"
    quoted = quoprimime.body_encode(sniff.decode("latin-1"), _FOLD)
    return "base64" if len(quoted) > len(binascii.b2a_base64(sniff)) else "quoted-printable"


def _set_text(part: Message, text: str, plain: bool = False) -> None:
    """Give C{part} a UTF-8 text body the package encodes (C{Charset}) as the rule says.

    The text ends with a line end, as the content manager ended it; base64
    carries the lines with CRLF, as the content manager encoded them (7bit,
    8bit and quoted-printable lines take the policy's line end when written).

    @param plain: C{part} is C{text/plain} and has no MIME header yet.
    """
    cte = transfer_encoding(text)
    if cte == "base64":
        part.set_payload(wire_text(text), _BASE64)
        return
    if not text.endswith(("\n", "\r")):
        text += "\n"
    if cte == "quoted-printable":
        part.set_payload(text, _QUOTED)
        return
    # Named before the payload is set: C{set_charset} would otherwise decode
    # the whole body again only to find what the rule above already found.
    part["Content-Transfer-Encoding"] = cte
    if plain:
        # The headers set_payload(text, _AS_IS) has set_charset add to such a
        # part, added the same way and in its order, without its checks of
        # what the part already holds (nothing, here); the body as bytes, which
        # the package keeps as it keeps them after encoding the text to UTF-8.
        part["MIME-Version"] = "1.0"
        part.add_header("Content-Type", "text/plain", charset=_AS_IS.get_output_charset())
        part.set_payload(text if cte == "7bit" else text.encode("utf-8"))
        return
    part.set_payload(text, _AS_IS)


def wire_text(text: str) -> str:
    """A text body as it reads back: each line ended by CRLF, the last one too.

    The package splits the text at CRLF, CR and LF (as C{bytes.splitlines}
    does, the only line ends it knows) and writes each line with the
    policy's CRLF; the empty text is one empty line.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n")


def _text_part(text: str, subtype: str, part: Message | None = None) -> Message:
    if part is None:
        part = Message(policy=POLICY)
    if subtype != "plain":
        part.add_header("Content-Type", "text/" + subtype, charset="utf-8")
    _set_text(part, text, plain=subtype == "plain")
    return part


def _addresses(mailboxes: Sequence[Mailbox]) -> str:
    """An address header's value: each name quoted (C{formataddr}) or, when it is not
    ASCII or holds C{=?}, in RFC 2047 words (L{names.mailbox}); folded only at blanks."""
    return ", ".join([names.mailbox(m.name, m.address) for m in mailboxes])


def _custom_value(name: str, value: str) -> str:
    """A custom header's value as set: C{X-*} text as the subject is (L{names.unstructured});
    the threading and list headers (message ids, URLs) as posted, unless not ASCII."""
    if name[:2].lower() == "x-":
        return names.unstructured(name, value)
    return value if value.isascii() else names.encoded_words(value)


def _multipart(subtype: str, parts: Sequence[Message], into: Message | None = None) -> Message:
    container = Message(policy=POLICY) if into is None else into
    container["MIME-Version"] = "1.0"
    container.add_header("Content-Type", "multipart/" + subtype)
    for part in parts:
        container.attach(part)
    return container


def _attachment_part(attachment: Attachment) -> Message:
    part = MIMEBase(attachment.maintype, attachment.subtype, policy=POLICY)
    part.set_payload(attachment.content)
    encode_base64(part)
    name = attachment.filename
    # A non-ASCII name in RFC 2231's form, which set_param writes.
    filename: str | tuple[str, str, str] = name if name.isascii() else ("utf-8", "", name)
    part.add_header(
        "Content-Disposition", "inline" if attachment.inline else "attachment", filename=filename
    )
    if attachment.content_id is not None:
        part["Content-ID"] = f"<{attachment.content_id}>"
    return part


@functools.lru_cache(maxsize=4)
def _date(second: datetime, offset: timedelta | None) -> str:
    # Keyed by the offset too: datetimes of the same instant in two zones
    # are equal, but their Date values differ.
    return format_datetime(second)


def build_message(request: JsonMessage, *, message_id: str, now: datetime) -> Message:
    """The message a checked request describes, built by the C{email} package.

    Bcc recipients are in the envelope only, never in a header.  The
    text and HTML bodies become C{multipart/alternative}; attachments are
    added after them (C{multipart/mixed}), inline ones with their content
    id so the HTML can refer to them.  The C{Message} classes, C{Charset}
    (the body's transfer encoding and RFC 2047 words, L{names}),
    C{formataddr} (quoting), C{set_param} (RFC 2231 file names) and the
    policy (L{POLICY}: folding at blanks) make every header and body.

    @param message_id: the C{Message-ID} value, angle brackets included.
    @param now: the C{Date}, timezone-aware.
    """
    message = Message(policy=POLICY)
    message["From"] = _addresses((request.sender,))
    if request.to:
        message["To"] = _addresses(request.to)
    if request.cc:
        message["Cc"] = _addresses(request.cc)
    if request.reply_to is not None:
        message["Reply-To"] = _addresses((request.reply_to,))
    message["Subject"] = names.unstructured("Subject", request.subject)
    # The same Date for every message of a second: formatted once.
    message["Date"] = _date(now.replace(microsecond=0), now.utcoffset())
    message["Message-ID"] = message_id
    for name, value in request.headers:
        message[name] = _custom_value(name, value)
    text, html = request.text, request.html
    top = None if request.attachments else message
    if html is not None and text is not None:
        body = _multipart("alternative", (_text_part(text, "plain"), _text_part(html, "html")), top)
    elif html is not None:
        body = _text_part(html, "html", top)
    else:
        body = _text_part(text or "", "plain", top)
    if top is None:
        _multipart("mixed", (body, *map(_attachment_part, request.attachments)), message)
    return message


def encode_message(message: Message, max_size: int) -> bytes:
    """The message's bytes as they go on (CRLF line ends), or 413 past C{max_size}.

    The bytes of C{message.as_bytes(policy=POLICY)}, each body written in
    one piece rather than line by line (L{smtpproxy.web.api.flatten}).
    """
    data = as_bytes(message, POLICY)
    if len(data) > max_size:
        raise ApiError(
            413, "too_large", f"the encoded message is larger than {max_size} bytes", None
        )
    return data
