"""The quick paths of the message parser agree with the standard library."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime import message
from smtpproxy.mime.message import (
    Email,
    names_mime_fields,
    parse_message,
    simple_header_block,
    simple_header_fields,
)
from tests.test_addresses import header

line_text = st.text(alphabet='aZ09-_: \t\r\n()<>@,;"=?\x80', max_size=20)
field_line = st.builds(
    lambda name, sep, value, end: f"{name}:{sep}{value}{end}",
    st.text(alphabet="aZ-_09!~", min_size=1, max_size=10),
    st.sampled_from(["", " ", "\t", "  "]),
    line_text,
    st.sampled_from(["\r\n", "\n", "\r", ""]),
)
continuation = st.builds(
    lambda lead, value: f"{lead}{value}\r\n", st.sampled_from([" ", "\t"]), line_text
)
block = st.lists(st.one_of(field_line, continuation, line_text), max_size=8).map("".join)


class SimpleHeaderBlockTests(SynchronousTestCase):
    @given(block)
    def test_agrees_with_the_feed_parser(self, text: str) -> None:
        """Wherever the quick split answers, it holds the feed parser's (name, value) pairs."""
        data = text.encode("utf-8", "surrogateescape")
        quick = simple_header_block(data)
        if quick is None:
            return
        full = BytesParser(policy=email.policy.default).parsebytes(data, headersonly=True)
        self.assertEqual(list(quick.raw_items()), list(full.raw_items()))

    def test_everyday_block_is_quick(self) -> None:
        """An ordinary header block, folded lines included, takes the quick path."""
        data = b"From: a@b.example\r\nSubject: one\r\n two\r\nTo: c@d.example\r\n"
        quick = simple_header_block(data)
        assert quick is not None
        self.assertEqual(quick["subject"], "one two")
        self.assertEqual([name for name, _ in quick.raw_items()], ["From", "Subject", "To"])

    def test_odd_blocks_go_to_the_feed_parser(self) -> None:
        """mbox From lines, bare CRs and junk lines are left to the standard library."""
        for data in (b"From me Mon\r\nA: b\r\n", b"A: b\rC: d\r\n", b"junk line\r\n", b": x\r\n"):
            self.assertIsNone(simple_header_block(data), data)


def _full_parse(raw: bytes) -> Email:
    """parse_message without the plain-text quick path."""
    return message._run(message._parse_steps("s@x.example", ["r@y.example"], raw, quick=False))


field_name = st.one_of(
    st.sampled_from(
        ["From", "To", "Cc", "Subject", "Date", "Message-ID", "X-Mailer", "MIME-Version"]
    ),
    st.sampled_from(["Content-Type", "content-transfer-encoding", "CONTENT-Disposition"]),
    st.text(alphabet="aZ-_09", min_size=1, max_size=10),
)
field_value = st.one_of(
    header,
    st.text(alphabet='aZ09 -_.@<>,;:"()=?/\x80\u00e9', max_size=30),
    st.sampled_from(["text/html", "multipart/mixed; boundary=x", "base64", "attachment"]),
)
header_field = st.builds(lambda n, v: f"{n}: {v}\r\n", field_name, field_value)
body_text = st.text(alphabet="aZ09 .\r\n\t\x00\x7f\u00e9\ufffd", max_size=60)
whole_message = st.builds(
    lambda fields, sep, body: (
        ("".join(fields) + sep).encode("utf-8", "surrogateescape") + body.encode("utf-8")
    ),
    st.lists(header_field, max_size=6),
    st.sampled_from(["\r\n", "\n", ""]),
    body_text,
)


class PlainTextMessageTests(SynchronousTestCase):
    @given(whole_message)
    def test_agrees_with_the_full_walk(self, raw: bytes) -> None:
        """Whenever a message takes the plain-text path, it parses as the walk would."""
        self.assertEqual(parse_message("s@x.example", ["r@y.example"], raw), _full_parse(raw))

    def test_plain_message_skips_the_mime_walk(self) -> None:
        """A message with no Content-* header is read without the standard library's headers."""
        raw = b"From: a@b.example\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"
        fields = simple_header_fields(raw[: raw.index(b"\r\n\r\n") + 2])
        assert fields is not None
        self.assertFalse(names_mime_fields(fields))
        parsed = parse_message("s@x.example", ["r@y.example"], raw)
        self.assertEqual(parsed.text, "line one\r\nline two\r\n")
        self.assertEqual(parsed, _full_parse(raw))

    def test_any_mime_header_takes_the_full_walk(self) -> None:
        """Content-Type, -Transfer-Encoding or -Disposition in any case: the walk decides."""
        for name in (b"Content-Type", b"content-transfer-encoding", b"CONTENT-DISPOSITION"):
            fields = simple_header_fields(b"From: a@b.example\r\n" + name + b": x\r\n")
            assert fields is not None
            self.assertTrue(names_mime_fields(fields))

    def test_bad_utf8_body_is_reported_the_same(self) -> None:
        """Invalid UTF-8 in a plain body gets the same replacement and warning either way."""
        raw = b"Subject: x\r\n\r\ncaf\xe9\r\n"
        parsed = parse_message("s@x.example", ["r@y.example"], raw)
        self.assertEqual(parsed, _full_parse(raw))
        self.assertEqual(parsed.text, "caf\ufffd\r\n")
        self.assertEqual(len(parsed.warnings), 1)
