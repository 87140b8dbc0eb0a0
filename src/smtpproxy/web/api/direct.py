"""The parsed view (L{Email}) of a message this API just built, without parsing it back.

A JSON submission is checked field by field (L{compose.read_json_message})
and then built and serialised by the C{email} package; the delivery
pipeline then wants the same message as an L{Email}, the view providers
read.  Parsing the bytes we have just written would find exactly what the
request already says, at about a sixth of the request's CPU, so this
module writes the view down from the request instead:

- C{raw} is the serialised bytes, unchanged: what providers send.
- C{headers} are cut from those bytes' header block as the shared parser
  cuts them (L{simple_header_fields}, line ends dropped): the values as
  folded and encoded on the wire, not as the request spelled them.
- The addresses are the request's (Bcc is in no header, so in no field
  either); the subject, the message id and the date are read from the
  header values, as the parser reads them.
- The bodies are the request's text with the line ends the package writes
  (every line ended by CRLF, a last one added), which is what decoding the
  part gives back; attachments are the request's bytes, type, filename,
  content id and disposition.

A property test (C{tests/web/api/test_direct.py}) holds this equal to
L{parse_message} of the bytes over generated valid requests.  Whatever
this module does not recognise in the bytes (a header block the simple
splitter refuses) returns None and the caller parses as for any message.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Sequence

from smtpproxy.addresses import Mailbox as HeaderMailbox
from smtpproxy.mime.message import MAX_SUBJECT, Attachment, Email, simple_header_fields
from smtpproxy.web.api.compose import JsonMessage, Mailbox, wire_text

__all__ = ["direct_email", "wire_text"]

_SURROGATES = re.compile("[\ud800-\udfff]")


def _subject(value: str) -> str | None:
    """The Subject as the parser reads it from its wire form, or None to leave it to the parser.

    Folding may change the blanks of the request's subject, and a
    non-ASCII one travels as encoded words: the wire form decides.
    """
    if len(value) > MAX_SUBJECT:
        return None
    if "=?" not in value:
        return value
    try:
        decoded = str(email.policy.default.header_factory("subject", value))
    except Exception:  # the parser would keep it as is, with a warning
        return None
    return None if _SURROGATES.search(decoded) else decoded


def _plain_name(name: str) -> bool:
    """Does a display name read back as written?

    Folding and the parser tidy blanks, and a non-ASCII name (or one
    holding C{=?}, which a reader would decode) is cut into encoded words
    that may read back with blanks between them (even a short one): such a
    message is parsed.
    """
    return not name or (name.isascii() and "=?" not in name and name == " ".join(name.split()))


def _plain_filename(name: str) -> bool:
    """Does a file name read back as written?

    The parser strips blanks at either end (a name of blanks reads as
    none), takes off quotes or angle brackets around the whole name, and
    decodes what looks like an encoded word: such a message is parsed.
    """
    return name == name.strip() and name[:1] + name[-1:] not in ('""', "<>") and "=?" not in name


def _mailbox(mailbox: Mailbox) -> HeaderMailbox:
    return HeaderMailbox(mailbox.name, mailbox.address)


def _text(request: JsonMessage, raw: bytes, blank: int, found: dict[str, str]) -> str | None:
    """The text body as the parser decodes it: each line ended by CRLF (L{wire_text}).

    A message of one text part in 7bit or 8bit carries exactly that after
    its header block, so it is read from there (one decode) rather than
    made again from the request.
    """
    if request.html is not None:
        return None if request.text is None else wire_text(request.text)
    if not request.attachments and found.get("content-transfer-encoding") in ("7bit", "8bit"):
        return raw[blank + 4 :].decode("utf-8")
    return wire_text(request.text or "")


def direct_email(
    request: JsonMessage,
    envelope_to: Sequence[str],
    raw: bytes,
) -> Email | None:
    """The L{Email} that parsing C{raw} (built from C{request}) would give, or None.

    @param envelope_to: the envelope recipients (L{JsonMessage.envelope_recipients}).
    @return: None when the header block is not one the simple splitter
        takes; the caller then parses C{raw}.
    """
    if not all(_plain_name(m.name) for m in (request.sender, *request.to, *request.cc)) or (
        request.reply_to is not None and not _plain_name(request.reply_to.name)
    ):
        return None
    if not all(_plain_filename(a.filename) for a in request.attachments):
        return None
    blank = raw.find(b"\r\n\r\n")
    fields = simple_header_fields(raw[: blank + 2]) if blank >= 0 else None
    if fields is None or not raw[:blank].isascii():
        return None
    headers = tuple(
        (name, value.replace("\r", "").replace("\n", "") if "\n" in value else value)
        for name, value in fields
    )
    found = {name.lower(): value for name, value in reversed(headers)}
    subject = _subject(found.get("subject", ""))
    if subject is None:
        return None
    message_id, date = found.get("message-id", "").strip(), found.get("date", "").strip()
    return Email(
        envelope_from=request.sender.address,
        envelope_to=tuple(envelope_to),
        raw=raw,
        from_=(_mailbox(request.sender),),
        to=tuple(map(_mailbox, request.to)),
        cc=tuple(map(_mailbox, request.cc)),
        reply_to=() if request.reply_to is None else (_mailbox(request.reply_to),),
        subject=subject,
        message_id=message_id or None,
        date=date or None,
        text=_text(request, raw, blank, found),
        html=None if request.html is None else wire_text(request.html),
        attachments=tuple(
            Attachment(
                a.filename,
                f"{a.maintype}/{a.subtype}",
                a.content,
                a.inline,
                a.content_id,
            )
            for a in request.attachments
        ),
        headers=headers,
    )
