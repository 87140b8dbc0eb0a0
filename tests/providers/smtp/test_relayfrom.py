"""RELAY_FROM's header edit (smtpproxy.providers.smtp.relayfrom), on bytes, without sockets."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.providers.smtp.relayfrom import force_sender

SENDER = "relay@example.com"
BODY = b"\r\n.leading dot\r\nFrom: not a header, body text\r\nGr\xc3\xbc\xc3\x9fe \t \r\n\r\n"


def forced(raw: bytes, envelope_from: str = "app@example.org") -> tuple[str, bytes]:
    email = force_sender(parse_message(envelope_from, ["b@example.org"], raw), SENDER)
    return email.envelope_from, email.raw


class ForceSenderTests(SynchronousTestCase):
    def test_author_becomes_reply_to(self) -> None:
        """From is replaced (display name kept), the original From's value becomes Reply-To
        byte for byte, both first; every other field in order and the body are untouched."""
        raw = (
            b'Subject: Scan\r\nFrom:  "Scanner 3" <scan@apps.example>\r\n'
            b"DKIM-Signature: v=1;\r\n\tb=abc\r\nTo: b@example.org\r\n" + BODY
        )
        envelope, out = forced(raw)
        self.assertEqual(envelope, SENDER)
        self.assertEqual(
            out,
            b'From: Scanner 3 <relay@example.com>\r\nReply-To:  "Scanner 3" <scan@apps.example>\r\n'
            b"Subject: Scan\r\nDKIM-Signature: v=1;\r\n\tb=abc\r\nTo: b@example.org\r\n" + BODY,
        )
        self.assertTrue(out.endswith(BODY))

    def test_existing_reply_to_is_kept(self) -> None:
        """A message with a Reply-To keeps it as the only one; no second Reply-To is added."""
        raw = b"From: a@apps.example\r\nreply-to: desk@apps.example\r\n" + BODY
        _, out = forced(raw)
        self.assertEqual(out, b"From: relay@example.com\r\nreply-to: desk@apps.example\r\n" + BODY)

    def test_without_from(self) -> None:
        """No From: the new From alone, no Reply-To; a null sender stays null."""
        envelope, out = forced(b"Subject: x\r\n" + BODY, envelope_from="")
        self.assertEqual((envelope, out), ("", b"From: relay@example.com\r\nSubject: x\r\n" + BODY))

    def test_every_from_removed_and_framing_lines_dropped(self) -> None:
        """Several From fields all go (Reply-To from the first); a leading mbox line would end
        the header block behind our fields, so it goes too; a folded From goes whole."""
        raw = (
            b"From someone Mon Jan  1 00:00:00 2024\r\nFrom: one@a.example,\r\n two@a.example\r\n"
            b"X-A: 1\r\nFROM: three@a.example\r\n" + BODY
        )
        _, out = forced(raw)
        self.assertEqual(
            out,
            b"From: relay@example.com\r\nReply-To: one@a.example,\r\n two@a.example\r\n"
            b"X-A: 1\r\n" + BODY,
        )

    def test_header_only_and_bare_lf(self) -> None:
        """A message that ends inside its header block gets it closed; bare-LF messages
        get LF in the fields we write."""
        _, out = forced(b"Subject: x\r\nFrom: a@apps.example")
        self.assertEqual(
            out, b"From: relay@example.com\r\nReply-To: a@apps.example\r\nSubject: x\r\n\r\n"
        )
        _, out = forced(b"From: a@apps.example\nSubject: x\n\nbody\n")
        self.assertEqual(
            out, b"From: relay@example.com\nReply-To: a@apps.example\nSubject: x\n\nbody\n"
        )

    def test_linear_time(self) -> None:
        """A header block of 200,000 fields and a 20 MB body are edited in well under a
        second each (a quadratic edit would take minutes)."""
        many = b"From: a@apps.example\r\n" + b"X-N: 1\r\n" * 200_000 + b"\r\nbody\r\n"
        big = b"From: a@apps.example\r\n\r\n" + b"x" * 78 + b"\r\n" * 250_000
        for raw in (many, big):
            email = parse_message("a@apps.example", ["b@example.org"], raw)
            started = time.perf_counter()
            out = force_sender(email, SENDER).raw
            self.assertLess(time.perf_counter() - started, 2.0)
            self.assertTrue(out.endswith(raw[raw.index(b"\r\n\r\n") :]))
