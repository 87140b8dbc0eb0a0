"""parse_message: every field of an Email, and every way a message can be broken."""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import (
    MAX_ADDRESS_HEADER,
    MAX_DEPTH,
    MAX_HEADER_BLOCK,
    MAX_MIME_HEADER,
    MAX_PARTS,
    Attachment,
    Email,
    Mailbox,
    parse_message,
)


def message(*lines: str | bytes, eol: bytes = b"\r\n") -> bytes:
    """Lines joined with C{eol} (CRLF by default); str lines are UTF-8."""
    return eol.join(line.encode("utf-8") if isinstance(line, str) else line for line in lines)


def parse(raw: bytes) -> Email:
    return parse_message("sender@example.com", ["rcpt@example.com"], raw)


SIMPLE = message(
    "From: Alice Example <alice@example.com>",
    "To: bob@example.com, Carol <carol@example.com>",
    "Cc: dave@example.com",
    "Bcc: eve@example.com",
    "Reply-To: replies@example.com",
    "Subject: Quarterly numbers",
    "Message-ID: <abc.123@example.com>",
    "Date: Mon, 3 Mar 2025 10:00:00 +0000",
    "",
    "Hello Bob,",
    "see you.",
    "",
)


def mixed(*parts: bytes, boundary: str = "BOUNDARY", subtype: str = "mixed") -> bytes:
    """A multipart message whose parts are C{parts} (each: headers, blank line, body)."""
    lines: list[bytes] = [
        b"From: a@example.com",
        f"Content-Type: multipart/{subtype}; boundary={boundary}".encode(),
        b"",
        b"preamble",
    ]
    for part in parts:
        lines += [f"--{boundary}".encode(), part]
    lines += [f"--{boundary}--".encode(), b""]
    return b"\r\n".join(lines)


def part(*lines: str | bytes) -> bytes:
    return message(*lines)


class EnvelopeAndHeaderTests(SynchronousTestCase):
    def test_envelope_and_raw(self) -> None:
        """The envelope is copied as given and raw is the very bytes object passed in."""
        email = parse_message("", ("x@example.com", "y@example.com"), SIMPLE)
        self.assertEqual(email.envelope_from, "")
        self.assertEqual(email.envelope_to, ("x@example.com", "y@example.com"))
        self.assertIs(email.raw, SIMPLE)

    def test_address_fields(self) -> None:
        """From, To, Cc, Bcc and Reply-To become tuples of Mailbox in header order."""
        email = parse(SIMPLE)
        self.assertEqual(email.from_, (Mailbox("Alice Example", "alice@example.com"),))
        self.assertEqual(
            email.to, (Mailbox("", "bob@example.com"), Mailbox("Carol", "carol@example.com"))
        )
        self.assertEqual(email.cc, (Mailbox("", "dave@example.com"),))
        self.assertEqual(email.bcc, (Mailbox("", "eve@example.com"),))
        self.assertEqual(email.reply_to, (Mailbox("", "replies@example.com"),))
        self.assertEqual(email.warnings, ())

    def test_simple_fields(self) -> None:
        """Subject, Message-ID and Date come from their headers; the body is the text."""
        email = parse(SIMPLE)
        self.assertEqual(email.subject, "Quarterly numbers")
        self.assertEqual(email.message_id, "<abc.123@example.com>")
        self.assertEqual(email.date, "Mon, 3 Mar 2025 10:00:00 +0000")
        self.assertEqual(email.text, "Hello Bob,\r\nsee you.\r\n")
        self.assertIsNone(email.html)
        self.assertEqual(email.attachments, ())

    def test_headers_in_order_and_unfolded(self) -> None:
        """Every top-level header is kept, in order, duplicates too, with folding removed."""
        raw = message(
            "Received: from a",
            "\tby b; Mon, 3 Mar 2025",
            "X-Tag: one",
            "x-tag: two",
            "Subject: =?utf-8?q?caf=C3=A9?=",
            "",
            "body",
        )
        self.assertEqual(
            parse(raw).headers,
            (
                ("Received", "from a\tby b; Mon, 3 Mar 2025"),
                ("X-Tag", "one"),
                ("x-tag", "two"),
                ("Subject", "=?utf-8?q?caf=C3=A9?="),
            ),
        )

    def test_encoded_words(self) -> None:
        """RFC 2047 encoded words are decoded in the subject and in display names."""
        raw = message(
            "From: =?iso-8859-1?q?J=F6rg?= <jorg@example.com>",
            "Subject: =?utf-8?b?w6lsw6h2ZQ==?= and =?utf-8?q?caf=C3=A9?=",
            "",
            "",
        )
        email = parse(raw)
        self.assertEqual(email.subject, "élève and café")
        self.assertEqual(email.from_, (Mailbox("Jörg", "jorg@example.com"),))

    def test_utf8_headers(self) -> None:
        """Raw UTF-8 in headers (RFC 6532) is read as text, without a warning."""
        raw = message("From: Jöhn <jöhn@exämple.org>", "Subject: Grüße", "", "hi")
        email = parse(raw)
        self.assertEqual(email.subject, "Grüße")
        self.assertEqual(email.from_, (Mailbox("Jöhn", "jöhn@exämple.org"),))
        self.assertEqual(email.warnings, ())

    def test_undecodable_header_bytes(self) -> None:
        """8-bit header bytes that are not UTF-8 become replacement characters, with a warning."""
        email = parse(message(b"Subject: caf\xe9", b"", b"x"))
        self.assertEqual(email.subject, "caf\ufffd")
        self.assertIn(("Subject", "caf\ufffd"), email.headers)
        self.assertEqual(len(email.warnings), 1)
        self.assertIn("Subject", email.warnings[0])

    def test_encoded_words_that_break_the_decoder(self) -> None:
        """Encoded words the standard library cannot decode do not raise or leak surrogates."""
        raw = message(
            "From: =?utf-7?q?+2AA-?= <a@example.com>",
            "Subject: =?utf-7?q?+2AA-?= and =?unknown-8bit?q?caf=E9?=",
            "",
            "",
        )
        email = parse(raw)
        self.assertEqual(email.subject, "=?utf-7?q?+2AA-?= and =?unknown-8bit?q?caf=E9?=")
        self.assertEqual(email.from_, (Mailbox("", "a@example.com"),))
        self.assertEqual(len(email.warnings), 2)

    def test_unknown_8bit_encoded_word(self) -> None:
        """An encoded word in an unknown 8-bit charset decodes with a replacement character."""
        email = parse(message("Subject: =?unknown-8bit?q?caf=E9?=", "", ""))
        self.assertEqual(email.subject, "caf\ufffd")

    def test_groups_are_flattened(self) -> None:
        """Addresses inside groups are listed; an empty group adds nothing and no warning."""
        raw = message(
            "To: Team: a@example.com, B <b@example.com>;, c@example.com",
            "Cc: undisclosed-recipients:;",
            "",
            "",
        )
        email = parse(raw)
        self.assertEqual(
            [m.address for m in email.to], ["a@example.com", "b@example.com", "c@example.com"]
        )
        self.assertEqual(email.cc, ())
        self.assertEqual(email.warnings, ())

    def test_repeated_address_headers_combine(self) -> None:
        """Two To headers (invalid but common) contribute all their addresses."""
        raw = message("To: a@example.com", "To: b@example.com", "", "")
        self.assertEqual([m.address for m in parse(raw).to], ["a@example.com", "b@example.com"])

    def test_malformed_address_header(self) -> None:
        """A broken address list does not raise: readable addresses are kept, with a warning."""
        raw = message('To: <<<@@ broken,, good@example.com, "unclosed <x@example.com', "", "")
        email = parse(raw)
        addresses = [m.address for m in email.to]
        self.assertIn("good@example.com", addresses)
        self.assertIn("x@example.com", addresses)
        self.assertEqual(len(email.warnings), 1)
        self.assertIn("'To'", email.warnings[0])

    def test_address_the_parser_crashes_on(self) -> None:
        """A header that makes the standard library's address parser raise is survived."""
        raw = message("To: unlisted-recipients:; (no To-header on input)", "", "")
        email = parse(raw)
        self.assertEqual(email.to, ())
        self.assertIn("'To'", email.warnings[0])

    def test_null_address_dropped(self) -> None:
        """'<>' is not a mailbox; the header is reported as malformed."""
        email = parse(message("From: MAILER DAEMON <>", "", ""))
        self.assertEqual(email.from_, ())
        self.assertEqual(len(email.warnings), 1)

    def test_overlong_address_header(self) -> None:
        """Past the length bound, addresses are picked out by pattern instead of parsed."""
        addresses = [f"user{i}@example.com" for i in range(MAX_ADDRESS_HEADER // 10)]
        raw = message("To: " + ", ".join(addresses), "", "")
        email = parse(raw)
        self.assertEqual([m.address for m in email.to], addresses)
        self.assertIn("too long", email.warnings[0])

    def test_missing_headers(self) -> None:
        """No headers at all: empty fields, and the whole input is the text."""
        email = parse(b"just a line\r\nand another\r\n")
        self.assertEqual(email.headers, ())
        self.assertEqual(email.subject, "")
        self.assertIsNone(email.message_id)
        self.assertIsNone(email.date)
        self.assertEqual(email.from_, ())
        self.assertEqual(email.text, "just a line\r\nand another\r\n")

    def test_empty_message(self) -> None:
        """Zero bytes parse to an empty text body."""
        email = parse(b"")
        self.assertEqual(email.text, "")
        self.assertEqual(email.headers, ())
        self.assertEqual(email.attachments, ())

    def test_header_only(self) -> None:
        """Headers without a separator or body (even without a final CRLF) are headers."""
        email = parse(b"Subject: only\r\nTo: a@example.com")
        self.assertEqual(email.subject, "only")
        self.assertEqual(email.to, (Mailbox("", "a@example.com"),))
        self.assertEqual(email.text, "")

    def test_missing_separator(self) -> None:
        """A line that is not a header ends the headers and starts the body."""
        email = parse(b"Subject: s\r\nthis is body\r\n")
        self.assertEqual(email.subject, "s")
        self.assertEqual(email.text, "this is body\r\n")

    def test_unix_from_line(self) -> None:
        """An mbox 'From ' line before the headers is not a header."""
        email = parse(b"From someone Mon Mar  3 10:00:00 2025\r\nSubject: s\r\n\r\nbody")
        self.assertEqual(email.headers, (("Subject", "s"),))
        self.assertEqual(email.text, "body")

    def test_huge_header_block(self) -> None:
        """A header block past the bound is read in part, with a warning; the body is found."""
        raw = b"Subject: s\r\n" + b"X-Filler: yes\r\n" * (MAX_HEADER_BLOCK // 10) + b"\r\nbody"
        email = parse(raw)
        self.assertEqual(email.subject, "s")
        self.assertEqual(email.text, "body")
        self.assertLess(len(email.headers), MAX_HEADER_BLOCK // 10)
        self.assertIn("header block", email.warnings[0])


class BodyTests(SynchronousTestCase):
    def test_alternative(self) -> None:
        """multipart/alternative gives a text and an HTML body and no attachment."""
        raw = mixed(
            part("Content-Type: text/plain; charset=utf-8", "", "plain"),
            part("Content-Type: text/html; charset=utf-8", "", "<p>html</p>"),
            subtype="alternative",
        )
        email = parse(raw)
        self.assertEqual((email.text, email.html), ("plain", "<p>html</p>"))
        self.assertEqual(email.attachments, ())
        self.assertEqual(email.warnings, ())

    def test_nested_structure(self) -> None:
        """Bodies are found through mixed/related/alternative; the rest are attachments."""
        inner_alternative = mixed(
            part("Content-Type: text/plain", "", "the text"),
            part("Content-Type: text/html", "", '<img src="cid:logo@x">'),
            boundary="ALT",
            subtype="alternative",
        ).split(b"\r\n\r\n", 1)[1]
        related = mixed(
            part("Content-Type: multipart/alternative; boundary=ALT", "", inner_alternative),
            part(
                "Content-Type: image/png",
                "Content-ID: <logo@x>",
                "Content-Transfer-Encoding: base64",
                "",
                base64.b64encode(b"\x89PNG data").decode(),
            ),
            boundary="REL",
            subtype="related",
        ).split(b"\r\n\r\n", 1)[1]
        raw = mixed(
            part("Content-Type: multipart/related; boundary=REL", "", related),
            part(
                "Content-Type: Application/PDF; name=report.pdf",
                "Content-Disposition: attachment; filename=report.pdf",
                "Content-Transfer-Encoding: base64",
                "",
                base64.encodebytes(b"%PDF-1.7 " * 40).decode().replace("\n", "\r\n"),
            ),
        )
        email = parse(raw)
        self.assertEqual(email.text, "the text")
        self.assertEqual(email.html, '<img src="cid:logo@x">')
        self.assertEqual(
            email.attachments,
            (
                Attachment(None, "image/png", b"\x89PNG data", inline=True, content_id="logo@x"),
                Attachment("report.pdf", "application/pdf", b"%PDF-1.7 " * 40),
            ),
        )
        self.assertEqual(email.warnings, ())

    def test_charsets(self) -> None:
        """Text is decoded with its declared charset, after its transfer encoding."""
        raw = mixed(
            part(
                "Content-Type: text/plain; charset=iso-8859-1",
                "Content-Transfer-Encoding: quoted-printable",
                "",
                "caf=E9 cr=E8me=",
                " br=FBl=E9e",
            ),
            part(
                "Content-Type: text/html; charset=utf-8",
                "Content-Transfer-Encoding: base64",
                "",
                base64.b64encode("<b>žluťoučký</b>".encode()).decode(),
            ),
        )
        email = parse(raw)
        self.assertEqual(email.text, "café crème brûlée")
        self.assertEqual(email.html, "<b>žluťoučký</b>")
        self.assertEqual(email.warnings, ())

    def test_unknown_charset(self) -> None:
        """An unknown charset is read as UTF-8 with replacements, and reported."""
        raw = message("Content-Type: text/plain; charset=x-made-up", "", "caf\xe9").replace(
            b"\xc3\xa9", b"\xe9"
        )
        email = parse(raw)
        self.assertEqual(email.text, "caf\ufffd")
        self.assertIn("x-made-up", email.warnings[0])

    def test_undecodable_text(self) -> None:
        """Bytes invalid in the declared charset become replacement characters, reported."""
        email = parse(message(b"Content-Type: text/plain; charset=utf-8", b"", b"ok \xff\xfe"))
        self.assertEqual(email.text, "ok \ufffd\ufffd")
        self.assertIn("not valid", email.warnings[0])

    def test_text_with_lone_surrogates(self) -> None:
        """UTF-7 can encode a lone surrogate; the text gets a replacement character instead."""
        email = parse(message("Content-Type: text/plain; charset=utf-7", "", "a+2AA-b"))
        self.assertEqual(email.text, "a\ufffdb")
        self.assertIn("surrogates", email.warnings[0])

    def test_ascii_label_on_utf8_text(self) -> None:
        """Text labelled us-ascii (or unlabelled) but written in UTF-8 reads correctly."""
        email = parse(message("Content-Type: text/plain; charset=us-ascii", "", "naïve"))
        self.assertEqual(email.text, "naïve")
        self.assertEqual(email.warnings, ())

    def test_extra_text_parts_are_attachments(self) -> None:
        """Only the first text/plain is the body; later ones, and named ones, are kept."""
        raw = mixed(
            part("Content-Type: text/plain", "", "first"),
            part("Content-Type: image/gif", "Content-Disposition: inline", "", "GIF89a"),
            part("Content-Type: text/plain", "", "footer"),
            part("Content-Type: text/plain; name=notes.txt", "", "notes"),
            part("Content-Type: text/html", "Content-Disposition: attachment", "", "<p>"),
        )
        email = parse(raw)
        self.assertEqual(email.text, "first")
        self.assertIsNone(email.html)
        self.assertEqual(
            email.attachments,
            (
                Attachment(None, "image/gif", b"GIF89a", inline=True),
                Attachment(None, "text/plain", b"footer"),
                Attachment("notes.txt", "text/plain", b"notes"),
                Attachment(None, "text/html", b"<p>"),
            ),
        )

    def test_inline_rules(self) -> None:
        """A Content-ID makes a part inline only inside multipart/related."""
        raw = mixed(
            part("Content-Type: text/plain", "", "body"),
            part("Content-Type: image/png", "Content-ID: <a@x>", "", "png"),
        )
        (attachment,) = parse(raw).attachments
        self.assertFalse(attachment.inline)
        self.assertEqual(attachment.content_id, "a@x")

    def test_encoded_filenames(self) -> None:
        """RFC 2231 and RFC 2047 filenames are decoded."""
        raw = mixed(
            part("Content-Type: text/plain", "", "body"),
            part(
                "Content-Type: application/pdf",
                "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf",
                "",
                "x",
            ),
            part('Content-Type: image/png; name="=?utf-8?q?f=C3=B6to.png?="', "", "y"),
        )
        names = [a.filename for a in parse(raw).attachments]
        self.assertEqual(names, ["résumé.pdf", "föto.png"])

    def test_exact_part_bytes(self) -> None:
        """An unencoded part's data is its bytes, less the line end before the boundary."""
        raw = mixed(
            part("Content-Type: application/octet-stream", "", "line 1\r\nline 2\r\n"),
        )
        (attachment,) = parse(raw).attachments
        self.assertEqual(attachment.data, b"line 1\r\nline 2\r\n")

    def test_lf_line_endings(self) -> None:
        """A message with bare LF line endings parses like its CRLF twin."""
        crlf = mixed(
            part("Content-Type: text/plain", "", "text"),
            part("Content-Type: application/zip; name=a.zip", "", "PK"),
        )
        email = parse(crlf.replace(b"\r\n", b"\n"))
        self.assertEqual(email.text, "text")
        self.assertEqual(email.attachments, (Attachment("a.zip", "application/zip", b"PK"),))

    def test_uuencode(self) -> None:
        """x-uuencode bodies are decoded."""
        raw = mixed(
            part("Content-Type: text/plain", "", "body"),
            part(
                "Content-Type: application/octet-stream; name=a.txt",
                "Content-Transfer-Encoding: x-uuencode",
                "",
                "begin 644 a.txt",
                "%:&5L;&\\`",
                "`",
                "end",
            ),
        )
        self.assertEqual(parse(raw).attachments[0].data, b"hello")


class EmbeddedMessageTests(SynchronousTestCase):
    INNER = message("Subject: Original: report", "From: x@example.com", "", "inner text", "")

    def test_rfc822_kept_whole(self) -> None:
        """A message/rfc822 part is one attachment of the embedded bytes, named by its subject."""
        raw = mixed(
            part("Content-Type: text/plain", "", "see attached"),
            part("Content-Type: message/rfc822", "", self.INNER.decode()),
        )
        email = parse(raw)
        self.assertEqual(email.text, "see attached")
        (attachment,) = email.attachments
        self.assertEqual(attachment.content_type, "message/rfc822")
        self.assertEqual(attachment.data, self.INNER)
        self.assertEqual(attachment.filename, "Original  report.eml")

    def test_rfc822_names(self) -> None:
        """A part's own filename wins; with no subject at all the name is message.eml."""
        raw = mixed(
            part("Content-Type: message/rfc822; name=fwd.eml", "", self.INNER.decode()),
            part("Content-Type: message/rfc822", "", "From: y@example.com", "", "body"),
        )
        names = [a.filename for a in parse(raw).attachments]
        self.assertEqual(names, ["fwd.eml", "message.eml"])

    def test_digest_parts_default_to_messages(self) -> None:
        """In multipart/digest a part without Content-Type is an embedded message."""
        raw = mixed(part("", self.INNER.decode()), subtype="digest")
        (attachment,) = parse(raw).attachments
        self.assertEqual(attachment.content_type, "message/rfc822")
        self.assertEqual(attachment.data, self.INNER)

    def test_delivery_status(self) -> None:
        """Other message/* parts are kept with their own type."""
        raw = mixed(
            part("Content-Type: text/plain", "", "bounce"),
            part(
                "Content-Type: message/delivery-status",
                "",
                "Reporting-MTA: dns; mx.example.com",
                "",
                "Final-Recipient: rfc822; a@example.com",
            ),
            subtype="report; report-type=delivery-status",
        )
        (status,) = parse(raw).attachments
        self.assertEqual(status.content_type, "message/delivery-status")
        self.assertTrue(status.data.startswith(b"Reporting-MTA"))


class MalformedTests(SynchronousTestCase):
    def attachment_of(self, cte: str, body: str | bytes) -> tuple[Attachment, tuple[str, ...]]:
        raw = mixed(
            part("Content-Type: text/plain", "", "body"),
            part(
                f"Content-Type: image/png; name=a.png\r\nContent-Transfer-Encoding: {cte}", "", body
            ),
        )
        email = parse(raw)
        (attachment,) = email.attachments
        return attachment, email.warnings

    def test_bad_base64_padding(self) -> None:
        """Base64 with its padding missing is decoded anyway, with a warning."""
        attachment, warnings = self.attachment_of("base64", "aGVsbG8gd29ybGQ")
        self.assertEqual(attachment.data, b"hello world")
        self.assertIn("base64", warnings[0])

    def test_base64_pasted_together(self) -> None:
        """Two base64 texts glued together are both decoded."""
        attachment, warnings = self.attachment_of("base64", "aGVsbG8=\r\nd29ybGQ=")
        self.assertEqual(attachment.data, b"helloworld")
        self.assertEqual(len(warnings), 1)

    def test_base64_garbage(self) -> None:
        """Base64 that is no base64 at all yields what it can, and a warning."""
        attachment, warnings = self.attachment_of("base64", "!!!\xff===x")
        self.assertEqual(attachment.data, b"")
        self.assertEqual(len(warnings), 1)

    def test_base64_with_stray_characters(self) -> None:
        """Line breaks, blanks and stray symbols inside base64 are skipped."""
        attachment, warnings = self.attachment_of("base64", "aGVs bG8g\r\n d29y*bGQ=")
        self.assertEqual(attachment.data, b"hello world")
        self.assertEqual(warnings, ())

    def test_bad_quoted_printable(self) -> None:
        """Invalid quoted-printable escapes are kept as they are."""
        attachment, warnings = self.attachment_of("quoted-printable", "a=ZZb=4")
        self.assertEqual(attachment.data, b"a=ZZb=4")
        self.assertEqual(warnings, ())

    def test_misspelt_encoding(self) -> None:
        """Common misspellings of transfer encodings are understood."""
        self.assertEqual(
            self.attachment_of("quoted printable", "a=3Db"),
            (Attachment("a.png", "image/png", b"a=b"), ()),
        )
        self.assertEqual(
            self.attachment_of("base64;", "aGk="), (Attachment("a.png", "image/png", b"hi"), ())
        )

    def test_unknown_encoding(self) -> None:
        """An unknown transfer encoding keeps the bytes undecoded, with a warning."""
        attachment, warnings = self.attachment_of("x-rot13", "uryyb")
        self.assertEqual(attachment.data, b"uryyb")
        self.assertIn("x-rot13", warnings[0])

    def test_broken_uuencode(self) -> None:
        """uuencoded data without its begin line is kept undecoded, with a warning."""
        attachment, warnings = self.attachment_of("x-uuencode", "%:&5L;&\\`")
        self.assertEqual(attachment.data, b"%:&5L;&\\`")
        self.assertEqual(len(warnings), 1)

    def test_multipart_without_boundary(self) -> None:
        """A multipart with no boundary parameter is kept as one raw attachment."""
        raw = message("Content-Type: multipart/mixed", "", "--x", "", "text", "--x--")
        email = parse(raw)
        self.assertIsNone(email.text)
        (attachment,) = email.attachments
        self.assertEqual(attachment.content_type, "application/octet-stream")
        self.assertEqual(attachment.data, b"--x\r\n\r\ntext\r\n--x--")
        self.assertIn("boundary", email.warnings[0])

    def test_boundary_never_used(self) -> None:
        """A boundary that never appears keeps the whole body as one raw attachment."""
        raw = message("Content-Type: multipart/mixed; boundary=nope", "", "just text")
        email = parse(raw)
        self.assertEqual(email.attachments[0].data, b"just text")
        self.assertIn("first boundary", email.warnings[0])

    def test_missing_closing_boundary(self) -> None:
        """Without its closing boundary the last part runs to the end; all parts are kept."""
        raw = mixed(
            part("Content-Type: text/plain", "", "text"),
            part("Content-Type: image/png", "", "png"),
        ).rsplit(b"--BOUNDARY--", 1)[0]
        email = parse(raw)
        self.assertEqual(email.text, "text")
        self.assertEqual(email.attachments, (Attachment(None, "image/png", b"png"),))
        self.assertIn("closing boundary", email.warnings[0])

    def test_epilogue_reported(self) -> None:
        """Text after the closing boundary is reported, not silently ignored."""
        raw = mixed(part("Content-Type: text/plain", "", "text")) + b"stray words\r\n"
        self.assertIn("after the closing boundary", parse(raw).warnings[0])

    def test_eight_bit_garbage(self) -> None:
        """Binary junk in headers, boundaries and bodies does not raise."""
        raw = (
            b'Subject: \xff\xfe\x00\r\nContent-Type: multipart/mixed; boundary="\xe9"\r\n\r\n'
            b'--\xe9\r\nContent-Type: text/plain; charset="\xff"\r\n\r\n\x80\x81\r\n--\xe9--'
        )
        email = parse(raw)
        self.assertIs(email.raw, raw)
        self.assertTrue(email.attachments)

    def test_parameters_the_header_parser_raises_on(self) -> None:
        """RFC 2231 parameters in a codec that cannot decode them cost only their header."""
        raw = mixed(
            part("Content-Type: text/plain", "", "body"),
            part("Content-Type: image/png; name*=idna''x", "", "png"),
            part(
                "Content-Type: image/gif", "Content-Disposition: inline; filename*=idna''y", "", "g"
            ),
        )
        email = parse(raw)
        self.assertEqual(email.text, "body")
        self.assertEqual(
            email.attachments,
            (
                Attachment(None, "application/octet-stream", b"png"),
                Attachment(None, "image/gif", b"g"),
            ),
        )
        self.assertEqual(
            email.warnings,
            (
                "part 2: Content-Type could not be read (UnicodeError); kept as raw bytes",
                "part 3: content-disposition could not be read (UnicodeError), ignored",
            ),
        )

    def test_top_level_parameters_the_header_parser_raises_on(self) -> None:
        """The same at the top level: the body is kept raw and the other headers are read."""
        raw = message("Subject: s", "Content-Type: text/plain; charset*=idna''x", "", "text")
        email = parse(raw)
        self.assertEqual(email.subject, "s")
        self.assertEqual(
            email.attachments, (Attachment(None, "application/octet-stream", b"text"),)
        )

    def test_deep_nesting(self) -> None:
        """Multiparts nested past the bound are kept raw, without a recursion error."""
        depth = MAX_DEPTH + 5
        raw = b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
            for i in range(depth)
        )
        email = parse(raw + b"Content-Type: text/plain\r\n\r\ndeep")
        self.assertEqual(len(email.attachments), 1)
        self.assertTrue(any(f"more than {MAX_DEPTH} deep" in w for w in email.warnings))

    def test_too_many_parts(self) -> None:
        """Past the part bound the rest of a multipart is kept as one raw attachment."""
        parts = [
            part("Content-Type: application/x-thing", "", f"{i}") for i in range(MAX_PARTS + 5)
        ]
        email = parse(mixed(*parts))
        self.assertEqual(len(email.attachments), MAX_PARTS)
        self.assertEqual(email.attachments[-1].content_type, "application/octet-stream")
        self.assertIn(f"more than {MAX_PARTS} parts", email.warnings[0])

    def test_oversized_content_type(self) -> None:
        """A Content-Type header too long to parse safely keeps the part as raw bytes."""
        raw = message("Content-Type: text/plain; x=" + "a" * MAX_MIME_HEADER, "", "body")
        email = parse(raw)
        self.assertEqual(
            email.attachments, (Attachment(None, "application/octet-stream", b"body"),)
        )
        self.assertIn("Content-Type", email.warnings[0])

    def test_no_body_after_boundary(self) -> None:
        """A multipart cut off right after a boundary line still parses."""
        raw = message("Content-Type: multipart/mixed; boundary=b", "", "--b")
        email = parse(raw)
        self.assertEqual(email.text, "")
        self.assertIn("closing boundary", email.warnings[0])

    def test_lone_carriage_returns(self) -> None:
        """Bare CR line endings are line endings, as in the standard library."""
        raw = mixed(
            part("Content-Type: text/plain", "", "a"), part("Content-Type: image/png", "", "p")
        ).replace(b"\r\n", b"\r")
        email = parse(raw)
        self.assertEqual(email.text, "a")
        self.assertEqual(email.attachments[0].data, b"p")
