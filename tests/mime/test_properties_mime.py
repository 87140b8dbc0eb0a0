"""Property tests: parse_message survives any input and never loses a part.

Two generators: arbitrary bytes, and MIME trees built from plausible pieces
(content types, transfer encodings, charsets, dispositions, boundaries)
then broken on purpose: boundaries left out, line endings mixed, the message
cut short, junk spliced in.  The standard library's parser serves as the
oracle for how many leaf parts a message has.
"""

from __future__ import annotations

import email
import email.policy

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import Email, parse_message
from tests.mime.test_corpus import accounted_parts, assert_encodable, leaf_parts

CONTENT_TYPES = [
    None,
    "text/plain",
    "text/plain; charset=utf-8",
    "text/plain; charset=x-unknown",
    "text/plain; charset=utf-16",
    "text/plain; charset=utf-7",
    "text/html; charset=iso-8859-1",
    "image/png; name=a.png",
    "application/octet-stream",
    "message/rfc822",
    "message/delivery-status",
    "multipart/mixed",
    "garbage",
    'text/plain; charset="unterminated',
]
ENCODINGS = [None, "7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus", "base64;"]
DISPOSITIONS = [
    None,
    "inline",
    "attachment",
    "attachment; filename=a.bin",
    "inline; filename*=utf-8''%C3%A9t%C3%A9.txt",
    'attachment; filename="unterminated',
    "attachment; filename*=idna''x",
]
BODY = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=80).map(lambda t: t.encode("utf-8")),
    st.sampled_from(
        [b"aGVsbG8=", b"aGVsbG8", b"=3D=ZZ=\r\n", b"begin 644 x\r\n%:&5L;&\\`\r\nend", b"+2AA-"]
    ),
)
ODD_HEADER_LINES = [
    b" continuation",
    b"From someone",
    b":no name",
    b"X-Plain: value",
    b"\t",
    b"no colon here",
    b"Content-Type: text/html",
]
BOUNDARY = st.sampled_from(["b", "==_x", "b'(),.-/", "same", "a b", "\u00e9"])


@st.composite
def leaf(draw: st.DrawFn) -> list[bytes]:
    lines = []
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}".encode())
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding is not None:
        lines.append(f"Content-Transfer-Encoding: {encoding}".encode())
    disposition = draw(st.sampled_from(DISPOSITIONS))
    if disposition is not None:
        lines.append(f"Content-Disposition: {disposition}".encode())
    if draw(st.booleans()):
        lines.append(b"Content-ID: <id@example.com>")
    for line in draw(st.lists(st.sampled_from(ODD_HEADER_LINES), max_size=2)):
        lines.insert(draw(st.integers(0, len(lines))), line)
    if draw(st.booleans()):
        lines.append(b"")  # the separator may be missing
    lines.append(draw(BODY))
    return lines


@st.composite
def multipart(draw: st.DrawFn, children: st.SearchStrategy[list[bytes]]) -> list[bytes]:
    boundary = draw(BOUNDARY)
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest", "report"]))
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"'.encode(), b""]
    if draw(st.booleans()):
        lines.append(b"preamble")
    separator = f"--{boundary}".encode()
    parts = draw(st.lists(children, max_size=4))
    for index, part in enumerate(parts):
        if index or not draw(st.booleans()):  # sometimes the first boundary is missing
            lines.append(
                separator + draw(st.sampled_from([b"", b"  ", b"--", b"\t", b" x", b"--x"]))
            )
        lines += part
    if draw(st.booleans()):  # sometimes the closing boundary is missing
        lines.append(separator + b"--")
        if draw(st.booleans()):
            lines.append(b"epilogue")
    return lines


@st.composite
def broken_message(draw: st.DrawFn) -> bytes:
    tree = st.recursive(leaf(), lambda children: multipart(children), max_leaves=8)
    headers = [
        b"From: " + draw(st.sampled_from([b"a@example.com", b"=?utf-7?q?+2AA-?= <a@b>", b"\xff"])),
        b"Subject: " + draw(st.binary(max_size=20) | st.just(b"=?utf-7?q?+2AA-?=")),
    ]
    lines = headers + draw(tree)
    eol = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    raw = eol.join(line.replace(b"\r", b"").replace(b"\n", b"") for line in lines)
    if draw(st.booleans()):  # cut it short
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(st.booleans()):  # splice junk in
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=20)) + raw[at:]
    return raw


class ParseNeverFailsTests(SynchronousTestCase):
    def assert_survives(self, raw: bytes) -> Email:
        parsed = parse_message("a@example.com", ["b@example.com"], raw)
        self.assertIs(parsed.raw, raw)
        self.assertFalse([w for w in parsed.warnings if "could not be parsed" in w])
        assert_encodable(self, parsed)
        return parsed

    @given(st.binary(max_size=2000))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        """Any bytes at all parse without an exception and with raw unchanged."""
        self.assert_survives(raw)

    @given(broken_message())
    def test_broken_mime(self, raw: bytes) -> None:
        """Broken MIME parses, keeps raw, and accounts for every leaf the standard library sees."""
        parsed = self.assert_survives(raw)
        try:
            reference = email.message_from_bytes(raw, policy=email.policy.default)
            leaves = leaf_parts(reference)
        except Exception:  # the reference gave up; surviving is enough
            return
        self.assertEqual(accounted_parts(parsed), len(leaves))
