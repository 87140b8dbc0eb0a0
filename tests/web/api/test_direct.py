"""L{smtpproxy.web.api.direct}: the Email written down from a request equals the parsed one.

The API hands providers an L{Email} built from the checked request and
the bytes it serialised, instead of parsing those bytes back.  These tests
hold the two equal, every field, over generated valid requests: names,
subjects and bodies with any characters the checks let through, long
lines, non-ASCII, every optional part.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import Email, parse_message
from smtpproxy.web.api import compose
from smtpproxy.web.api.direct import direct_email, wire_text
from smtpproxy.web.api.problems import ApiError

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
#: About two generated requests in three are refused by the checks (controls in names,
#: say), which now and then trips the filtering health check on the first examples.
_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much]
MESSAGE_ID = "<0123456789abcdef@relay.test>"

_local = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,20}[a-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s
)
_domain = st.sampled_from(
    ["example.org", "mail.example.com", "xn--bcher-kva.example", "bücher.example"]
)
_text = st.text(max_size=120)
_lines = st.lists(
    st.one_of(_text, st.text(alphabet="ab é\t", min_size=70, max_size=1200)), max_size=6
).map(lambda parts: st_join(parts))


def st_join(parts: list[str]) -> str:
    return "".join(parts)


@st.composite
def _mailbox(draw: st.DrawFn) -> object:
    address = f"{draw(_local)}@{draw(_domain)}"
    if draw(st.booleans()):
        return address
    return {"address": address, "name": draw(_text)}


@st.composite
def _attachment(draw: st.DrawFn) -> dict[str, Any]:
    found: dict[str, Any] = {
        "filename": draw(st.text(min_size=1, max_size=80)),
        "content": base64.b64encode(draw(st.binary(max_size=300))).decode(),
    }
    if draw(st.booleans()):
        found["content_type"] = draw(
            st.sampled_from(["text/plain", "text/html", "image/PNG", "application/pdf", "text/csv"])
        )
    if draw(st.booleans()):
        found["content_id"] = draw(st.from_regex(r"[a-z0-9.@-]{1,30}", fullmatch=True))
    if draw(st.booleans()):
        found["inline"] = draw(st.booleans())
    return found


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A POST /v1/messages document; the checks decide whether it is valid."""
    document: dict[str, Any] = {
        "from": draw(_mailbox()),
        "to": draw(st.lists(_mailbox(), min_size=1, max_size=3)),
        "subject": draw(st.one_of(_text, st.text(alphabet="ab é", max_size=300))),
    }
    for name in ("cc", "bcc"):
        if draw(st.booleans()):
            document[name] = draw(st.lists(_mailbox(), max_size=2))
    if draw(st.booleans()):
        document["reply_to"] = draw(_mailbox())
    bodies = draw(st.sampled_from(["text", "html", "both", "none"]))
    if bodies in ("text", "both"):
        document["text"] = draw(_lines)
    if bodies in ("html", "both"):
        document["html"] = draw(_lines)
    if draw(st.booleans()):
        document["attachments"] = draw(st.lists(_attachment(), max_size=3))
    if draw(st.booleans()):
        document["headers"] = draw(
            st.dictionaries(
                st.one_of(
                    st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True),
                    st.sampled_from(sorted(compose.EXTRA_HEADERS)),
                ),
                st.one_of(_text, st.sampled_from(["<a.1@example.org>", "<a@b> <c@d>", "no"])),
                max_size=3,
            )
        )
    return document


def both(document: dict[str, Any]) -> tuple[Email | None, Email]:
    """The directly built and the parsed Email of a valid C{document}."""
    try:
        request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
        raw = compose.encode_message(
            compose.build_message(request, message_id=MESSAGE_ID, now=NOW), 1 << 20
        )
    except ApiError:
        assume(False)
        raise
    recipients = request.envelope_recipients
    direct = direct_email(request, recipients, raw)
    return direct, parse_message(request.sender.address, recipients, raw)


class DirectTests(SynchronousTestCase):
    @settings(max_examples=250, deadline=None, suppress_health_check=_HEALTH)
    @given(requests())
    def test_same_as_parsed(self, document: dict[str, Any]) -> None:
        """For every valid request the directly built Email equals parse_message of the
        same bytes in every field (raw, envelope, addresses, subject, ids, bodies,
        attachments, headers, no warnings), or the builder declines (None) and the
        caller parses."""
        direct, parsed = both(document)
        if direct is not None:
            self.assertEqual(direct, parsed)

    def test_everyday_requests_are_built_directly(self) -> None:
        """The shapes the API mostly sees never fall back to parsing: plain text, text
        and HTML with an attachment, a non-ASCII subject, a quoted name; a non-ASCII
        display name is left to the parser."""
        for document in (
            {"from": "a@example.com", "to": ["b@example.org"], "subject": "Hi", "text": "x"},
            {
                "from": {"address": "a@example.com", "name": "Miller, Sales (EU)"},
                "to": ["b@example.org"],
                "cc": ["c@example.org"],
                "bcc": ["d@example.org"],
                "subject": "Grüße   aus Köln " + "lang " * 40,
                "text": "Hallo\n" + "é" * 200,
                "html": "<p>Hallo</p>",
                "attachments": [
                    {"filename": "bericht.pdf", "content": "JVBERi0=", "content_id": "a@b"}
                ],
                "headers": {"X-Campaign": "spring"},
            },
        ):
            direct, parsed = both(document)
            self.assertIsNotNone(direct)
            self.assertEqual(direct, parsed)
        named = {"from": {"address": "a@example.com", "name": "Zoë"}, "to": ["b@example.org"]}
        self.assertEqual(both({**named, "subject": "s", "text": "x"})[0], None)

    def test_file_names_the_parser_reads_differently_are_parsed(self) -> None:
        """A file name with blanks at an end (or only blanks, Unicode ones too), quoted or
        in angle brackets as a whole, or holding an encoded word reads back differently:
        the builder leaves such a message to the parser, so the Email is still the
        parsed one.  Names that read back as written are still built directly."""
        for name, direct_expected in (
            (" ", False),
            ("  x", False),
            ("x\u3000", False),
            ("\u00a0x", False),
            ('"x"', False),
            ("<x>", False),
            ("=?utf-8?q?x?=", False),
            ("a  b", True),
            ('a"b', True),
            ("<x", True),
            ("bericht \u00e4.pdf", True),
        ):
            attachment = {"filename": name, "content": "JVBERi0="}
            document = {
                "from": "a@example.com",
                "to": ["b@example.org"],
                "subject": "s",
                "text": "x",
                "attachments": [attachment],
            }
            direct, parsed = both(document)
            self.assertEqual(direct is not None, direct_expected, repr(name))
            if direct is not None:
                self.assertEqual(direct, parsed, repr(name))

    def test_wire_text(self) -> None:
        """Every line end becomes CRLF and a last one is added; the empty text is one line."""
        self.assertEqual(wire_text(""), "\r\n")
        self.assertEqual(wire_text("a"), "a\r\n")
        self.assertEqual(wire_text("a\rb\nc\r\n"), "a\r\nb\r\nc\r\n")
        self.assertEqual(wire_text("\n\n"), "\r\n\r\n")
