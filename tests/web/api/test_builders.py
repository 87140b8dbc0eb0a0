"""The API's builder against the previous one: the same request reads back as the same message.

L{compose.build_message} builds with the C{email} package's C{Message}
classes and a policy that keeps short ASCII values as set; until issue 14's
third round the API built through C{EmailMessage}, the header registry and
the content manager (L{tests.web.api.oldbuilder}).  Over generated valid
requests (the strategies of C{test_direct}: any characters the checks let
through in names, subjects, bodies, file names and custom headers; long
lines; every optional part) both messages are parsed back with the relay's
own parser and by the C{email} package, and must agree on every field a
recipient sees and on each part's type and transfer encoding.

Header values are compared as a recipient reads them (RFC 2047 words
decoded), not as written: since review 5 the builder cuts its own encoded
words (L{smtpproxy.web.api.names}), no longer encodes long ASCII values,
and encodes text holding C{=?}, so the same text is written in other words.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import Email, parse_message
from smtpproxy.web.api import compose, names
from smtpproxy.web.api.problems import ApiError
from tests.web.api.oldbuilder import old_build
from tests.web.api.test_direct import requests

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
#: About two generated requests in three are refused by the checks (controls in names,
#: say), which now and then trips the filtering health check on the first examples.
_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much]
MESSAGE_ID = "<0123456789abcdef@relay.test>"
#: Headers whose values differ by design: the boundary is random in both.
_MIME = frozenset({"content-type", "mime-version"})


def _structure(data: bytes) -> list[tuple[str, str | None, str | None]]:
    """Each part's type, transfer encoding and disposition, in order."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return [
        (
            part.get_content_type(),
            part.get("Content-Transfer-Encoding"),
            part.get_content_disposition(),
        )
        for part in parsed.walk()
    ]


def _decoded(value: str) -> str:
    """A raw header value as read: encoded words decoded (RFC 2047 6.2), blanks tidied."""
    # Words that do not decode (not encoded words after all) are compared as written.
    with contextlib.suppress(ValueError, LookupError):
        value = str(make_header(decode_header(value)))
    return " ".join(value.split())


#: The length a warning quotes: that of the encoded header, which depends on the words' cuts.
_LENGTH = re.compile(r"\(\d+ characters\)")


#: Headers checked against the request itself (L{BuilderTests.assertPosted}).
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to"})
#: A warning about one of those headers (checked by L{BuilderTests.assertPosted} too).
_ADDRESS_WARNING = re.compile(r"header '(From|To|Cc|Reply-To)' ")


def _posted_name(read: str, posted: compose.Mailbox) -> tuple[str, str]:
    """A name read back and the posted one, in the form both must agree in.

    CPython's registry reads a quoted name exactly and an unquoted one with
    its blanks tidied; it reads a name of several encoded words with a
    space between each two (RFC 2047 6.2 says none), so encoded names agree
    without their blanks (L{tests.web.api.test_names} checks them by RFC
    2047's reading).
    """
    name = posted.name
    if names.needs_words(name):
        return "".join(read.split()), "".join(name.split())
    if names.mailbox(name, posted.address).startswith('"'):
        return read, name
    return read, " ".join(name.split())


def _seen(message: Email) -> dict[str, object]:
    """The fields of a parsed message a recipient sees (C{raw} aside: boundaries differ)."""
    return {
        "envelope": (message.envelope_from, message.envelope_to),
        "subject": " ".join(message.subject.split()),  # blanks tidied, as in headers
        "ids": (message.message_id, message.date),
        "bodies": (message.text, message.html),
        "attachments": message.attachments,
        "headers": [
            (name, _decoded(value))
            for name, value in message.headers
            if name.lower() not in _MIME | _ADDRESS_HEADERS
        ],
        "warnings": [
            _LENGTH.sub("(n characters)", warning)
            for warning in message.warnings
            if not _ADDRESS_WARNING.match(warning)
        ],
    }


def both(document: dict[str, Any]) -> tuple[bytes, bytes, compose.JsonMessage]:
    """The bytes the new and the previous builder write for a valid C{document}."""
    try:
        request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
        new = compose.encode_message(
            compose.build_message(request, message_id=MESSAGE_ID, now=NOW), 1 << 20
        )
    except ApiError:
        assume(False)
        raise
    return new, old_build(request, message_id=MESSAGE_ID, now=NOW), request


class BuilderTests(SynchronousTestCase):
    def assertSameMessage(self, document: dict[str, Any]) -> None:
        new, old, request = both(document)
        recipients = request.envelope_recipients
        sender = request.sender.address
        parsed = parse_message(sender, recipients, new)
        self.assertEqual(_seen(parsed), _seen(parse_message(sender, recipients, old)))
        self.assertPosted(parsed, request)
        self.assertEqual(_structure(new), _structure(old))
        self.assertTrue(all(len(line) <= compose.MAX_LINE for line in new.split(b"\r\n")))
        self.assertNotIn(b"\nBcc:", b"\n" + new)

    def assertPosted(self, parsed: Email, request: compose.JsonMessage) -> None:
        """The addresses read back are those posted, each with its name.

        Compared with the request, not with the previous builder, whose
        registry folding loses names and mailboxes on some lists (a quoted
        name split across lines, a comma folded into an encoded word) and
        warns about them.  No address header of the new builder is
        malformed; one the relay only salvages (an address over its parse
        limit, e.g. 256 four-octet characters of name) keeps the addresses
        alone.
        """
        self.assertEqual(parsed.bcc, ())
        for warning in parsed.warnings:
            if _ADDRESS_WARNING.match(warning):
                self.assertIn("is too long to parse", warning)
        reply_to = () if request.reply_to is None else (request.reply_to,)
        for header, read, posted in (
            ("From", parsed.from_, (request.sender,)),
            ("To", parsed.to, request.to),
            ("Cc", parsed.cc, request.cc),
            ("Reply-To", parsed.reply_to, reply_to),
        ):
            self.assertEqual([m.address for m in read], [m.address for m in posted], header)
            if any(f"header '{header}' is too long to parse" in w for w in parsed.warnings):
                continue
            for mailbox, wanted in zip(read, posted, strict=True):
                got, expected = _posted_name(mailbox.name, wanted)
                self.assertEqual(got, expected, header)

    @settings(max_examples=300, deadline=None, suppress_health_check=_HEALTH)
    @given(requests())
    def test_same_as_previous_builder(self, document: dict[str, Any]) -> None:
        """For every valid request both builders' messages parse back to the same
        addresses, subject, ids, bodies, attachments and headers (unfolded), with the
        same parts, types and transfer encodings; no line is over 998 and Bcc is in
        no header."""
        self.assertSameMessage(document)

    def test_hard_cases(self) -> None:
        """Long non-ASCII display names and file names (RFC 2047 words and RFC 2231
        continuations), an unbreakable 998-character subject, a body line of 2,000
        characters (quoted-printable or base64), a text starting "From ", and
        specials in ASCII names read back the same from both builders."""
        emoji = "\U0001f600"
        for document in (
            {
                "from": {"address": "a@example.com", "name": emoji * 256},
                "to": [{"address": "b@example.org", "name": 'Smith, "Jo" (EU). <x>'}],
                "subject": "x" * 998,
                "text": "From here\n" + "a" * 2000 + "\n" + "é" * 1000,
                "html": "é" * 50,
                "attachments": [
                    {"filename": emoji * 255, "content": base64.b64encode(b"x").decode()},
                    {
                        "filename": 'a "q" \\ b.txt',
                        "content": "",
                        "inline": True,
                        "content_id": "c@d",
                    },
                ],
                "headers": {"X-Long": "y" * 990, "References": "<a@b> <c@d>", "X-Uni": "ünï"},
            },
            {"from": "a@example.com", "to": ["b@example.org"], "text": ""},
            {"from": "a@example.com", "to": ["b@example.org"], "text": "ab " * 700 + "é"},
            {"from": "a@example.com", "to": ["b@example.org"], "html": "a\rb\r\nc"},
        ):
            self.assertSameMessage(document)

    def test_transfer_encoding(self) -> None:
        """7bit for ASCII lines up to 998, 8bit for short non-ASCII lines, and past 78
        columns the shorter of quoted-printable and base64."""
        self.assertEqual(compose.transfer_encoding("a" * 998), "7bit")
        self.assertEqual(compose.transfer_encoding("é" * 39), "8bit")
        self.assertEqual(compose.transfer_encoding("é" * 40), "base64")
        self.assertEqual(compose.transfer_encoding("a" * 999), "quoted-printable")
