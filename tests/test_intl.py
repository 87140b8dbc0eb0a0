"""Internationalised mail without sockets: IDN domains, SMTPUTF8 arguments, Graph headers."""

from __future__ import annotations

import base64
import json
from email import policy
from email.parser import BytesParser
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.mime import ascii_header_block
from smtpproxy.providers.graph.payload import JsonSend, MimeSend, plan_delivery
from smtpproxy.smtp.commands import (
    CommandError,
    check_address,
    parse_mail,
    parse_rcpt,
    split_command,
)

MAILBOX = "relay@contoso.example"


def reply(f: Any, *args: Any) -> tuple[int, str]:
    """The code and enhanced status of the CommandError C{f(*args)} raises."""
    try:
        f(*args)
    except CommandError as e:
        return e.reply.code, e.reply.status
    raise AssertionError(f"{f.__name__}{args!r} did not raise")


class ArgumentTests(SynchronousTestCase):
    def test_smtputf8_with_other_parameters(self) -> None:
        """SMTPUTF8 is accepted alone and with SIZE and BODY, in any case, in any order."""
        parsed = parse_mail("FROM:<josé@exämple.test> SIZE=99 SMTPUTF8 BODY=8BITMIME", 100)
        self.assertEqual(
            (parsed.sender, parsed.size, parsed.body, parsed.smtputf8),
            ("josé@exämple.test", 99, "8BITMIME", True),
        )
        self.assertTrue(parse_mail("FROM:<a@b.example> smtputf8", 100).smtputf8)
        self.assertFalse(parse_mail("FROM:<a@b.example>", 100).smtputf8)
        self.assertEqual(parse_mail("FROM:<> SMTPUTF8", 100).sender, "")

    def test_smtputf8_takes_no_value(self) -> None:
        """RFC 6531 3.4: C{SMTPUTF8=yes} is a syntax error."""
        self.assertEqual(reply(parse_mail, "FROM:<a@b.example> SMTPUTF8=yes", 100), (501, "5.5.4"))

    def test_utf8_address_needs_the_declaration(self) -> None:
        """Without SMTPUTF8 a UTF-8 sender or recipient gets 553 5.6.7 (RFC 6531 3.5)."""
        self.assertEqual(reply(parse_mail, "FROM:<josé@b.example>", 100), (553, "5.6.7"))
        self.assertEqual(reply(parse_mail, "FROM:<a@exämple.test>", 100), (553, "5.6.7"))
        self.assertEqual(reply(parse_rcpt, "TO:<zoë@b.example>"), (553, "5.6.7"))
        self.assertEqual(reply(parse_rcpt, "TO:<zoë@b.example>", False), (553, "5.6.7"))
        self.assertEqual(parse_rcpt("TO:<zoë@例え.テスト>", True).recipient, "zoë@例え.テスト")

    def test_utf8_address_syntax(self) -> None:
        """UTF-8 dot-strings and quoted strings pass; a bad IDN, C1 controls, bidirectional
        overrides and line separators do not."""
        self.assertEqual(check_address('"jü rgen"@例え.テスト', "sender"), '"jü rgen"@例え.テスト')
        self.assertEqual(
            check_address("δοκιμή@παράδειγμα.δοκιμή", "sender"), "δοκιμή@παράδειγμα.δοκιμή"
        )
        for bad in ("a@ex..ämple", "jo\u0085sé@b.example", "jo\u202esé@b.example", "a\u2028@b.c"):
            self.assertEqual(reply(check_address, bad, "recipient")[0], 501, bad)

    def test_lengths_count_octets(self) -> None:
        """RFC 6531 3.3: 64 octets of local part, 256 of path, counted in UTF-8 octets."""
        self.assertEqual(check_address("é" * 32 + "@b.example", "sender"), "é" * 32 + "@b.example")
        self.assertEqual(reply(check_address, "é" * 33 + "@b.example", "sender"), (501, "5.1.7"))
        long_domain = ".".join(["ä" * 20] * 8) + ".example"
        self.assertEqual(reply(check_address, "a@" + long_domain, "recipient"), (501, "5.1.3"))

    def test_command_bytes(self) -> None:
        """Strict UTF-8: malformed sequences (truncated, overlong, surrogates, past U+10FFFF)
        are 501 in MAIL/RCPT; valid UTF-8 outside MAIL/RCPT/VRFY/EXPN is 500."""
        self.assertEqual(split_command("RCPT TO:<zoë@b.c>".encode()), ("RCPT", "TO:<zoë@b.c>"))
        for bad in (b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"):
            line = b"MAIL FROM:<a" + bad + b"@b.example> SMTPUTF8"
            self.assertEqual(reply(split_command, line), (501, "5.5.2"), bad)
        self.assertEqual(reply(split_command, "EHLO exämple.test".encode()), (500, "5.5.2"))
        self.assertEqual(reply(split_command, "HELO \u00e9".encode()), (500, "5.5.2"))

    @given(st.binary(max_size=300), st.booleans())
    def test_any_bytes_only_raise_command_errors(self, data: bytes, declared: bool) -> None:
        """Whatever bytes follow MAIL FROM: or RCPT TO:, the parsers answer or raise
        CommandError: never another exception."""
        for prefix, parse in ((b"MAIL FROM:", 0), (b"RCPT TO:", 1)):
            try:
                _, argument = split_command(prefix + data.replace(b"\r", b"").replace(b"\n", b""))
                if parse == 0:
                    parse_mail(argument + (" SMTPUTF8" if declared else ""), 10**6)
                else:
                    parse_rcpt(argument, declared)
            except CommandError:
                pass


def header_block(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[0]


class AsciiHeaderTests(SynchronousTestCase):
    RAW = (
        "From: José Núñez <jose@exämple.test>\r\n"
        'To: "Zoë, Z." <zoe@例え.テスト>, Team: a@b.example;\r\n'
        "Subject: Grüße \u2013 résumé ✓\r\n"
        "X-Note: plain\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hällo wörld\r\n"
    ).encode()

    def test_fields_become_ascii_and_read_back_the_same(self) -> None:
        """8-bit fields are rewritten in ASCII (encoded words, A-labels); a MIME parser
        reads the same subject and names back; the body and ASCII fields are untouched."""
        converted = ascii_header_block(self.RAW)
        assert converted is not None
        self.assertTrue(header_block(converted).isascii())
        self.assertEqual(converted.partition(b"\r\n\r\n")[2], self.RAW.partition(b"\r\n\r\n")[2])
        for field in (b"X-Note: plain\r\n", b"Content-Transfer-Encoding: 8bit\r\n"):
            self.assertIn(field, converted)
        message: Any = BytesParser(policy=policy.default).parsebytes(converted)
        self.assertEqual(message["subject"], "Grüße \u2013 résumé ✓")
        self.assertEqual(str(message["from"]), "José Núñez <jose@xn--exmple-cua.test>")
        to = message["to"]
        self.assertEqual(
            [(a.display_name, a.addr_spec) for a in to.addresses],
            [("Zoë, Z.", "zoe@xn--r8jz45g.xn--zckzah"), ("", "a@b.example")],
        )
        self.assertEqual([g.display_name for g in to.groups], [None, "Team"])

    def test_ascii_message_is_returned_as_is(self) -> None:
        """Nothing 8-bit in the header block: the very same bytes object, no work done."""
        raw = b"Subject: hi\r\n\r\nH\xc3\xa4llo\r\n"
        self.assertIs(ascii_header_block(raw), raw)

    def test_no_ascii_form(self) -> None:
        """A UTF-8 local part, or 8-bit bytes in Message-ID or Date, cannot be written in
        ASCII: None, so that the message goes another way."""
        for field in ("To: zoë@b.example", "Message-ID: <é@b.example>", "Date: Mon (é)"):
            self.assertIsNone(ascii_header_block(f"{field}\r\n\r\nx".encode()), field)

    def test_legacy_8bit_and_empty_addresses(self) -> None:
        """Bytes that are not UTF-8 are read with replacement characters (as the JSON form
        reads them); a field naming only an empty address is left out."""
        converted = ascii_header_block(b'Subject: caf\xe9\r\nReply-To: "H\xc4" <>\r\n\r\nx')
        assert converted is not None
        message: Any = BytesParser(policy=policy.default).parsebytes(converted)
        self.assertEqual(message["subject"], "caf\ufffd")
        self.assertIsNone(message["reply-to"])

    def test_adjacent_encoded_words_in_a_rewritten_name(self) -> None:
        """An 8-bit address field rebuilt in ASCII keeps a name of adjacent encoded words
        as RFC 2047 6.2 reads it (a character cut across two words, no blank between),
        not with the space and lone surrogates the library's address parser reads."""
        converted = ascii_header_block(
            "To: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?= <c@b.example>, Zoë <z@b.example>\r\n"
            "\r\nx".encode()
        )
        assert converted is not None
        message: Any = BytesParser(policy=policy.default).parsebytes(converted)
        self.assertEqual(
            [(a.display_name, a.addr_spec) for a in message["to"].addresses],
            [("café", "c@b.example"), ("Zoë", "z@b.example")],
        )

    def test_stray_line_is_body_text(self) -> None:
        """A line without a colon ends the header block for every parser: it is body text,
        kept as it is, 8-bit or not."""
        raw = "Subject: ok\r\nstray sentence é\r\n\r\nbody\r\n".encode()
        self.assertEqual(ascii_header_block(raw), raw)


class PlanTests(SynchronousTestCase):
    def email(self, envelope: list[str], to: str, subject: str = "Grüße") -> Any:
        raw = (
            f"From: App <app@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\nHällo\r\n"
        ).encode()
        return parse_message("app@example.org", envelope, raw)

    def test_idn_domain_goes_as_mime_with_a_labels(self) -> None:
        """An IDN recipient and a UTF-8 subject still go as raw MIME: ASCII header block,
        the Bcc the relay writes in A-labels, the body byte for byte."""
        email = self.email(["zoe@exämple.test", "hidden@例え.テスト"], "Zoë <zoe@exämple.test>")
        plan = plan_delivery(email, [MAILBOX], "auto")
        assert isinstance(plan, MimeSend)
        mime = base64.b64decode(plan.body)
        self.assertTrue(header_block(mime).isascii())
        self.assertIn(b"Bcc: hidden@xn--r8jz45g.xn--zckzah\r\n", mime)
        self.assertTrue(mime.endswith("\r\n\r\nHällo\r\n".encode()))
        self.assertIn("8-bit header fields written as RFC 2047 encoded words", plan.notes)

    def test_eai_recipient_goes_as_json(self) -> None:
        """A UTF-8 local part has no ASCII form: JSON, with the local part as UTF-8 and the
        domain as A-labels, the subject as text."""
        email = self.email(["josé@exämple.test"], "José <josé@exämple.test>")
        plan = plan_delivery(email, [MAILBOX], "auto")
        assert isinstance(plan, JsonSend)
        message = json.loads(plan.body)["message"]
        self.assertEqual(
            message["toRecipients"],
            [{"emailAddress": {"address": "josé@xn--exmple-cua.test", "name": "José"}}],
        )
        self.assertEqual(message["subject"], "Grüße")
        self.assertEqual(message["replyTo"][0]["emailAddress"]["address"], "app@example.org")
