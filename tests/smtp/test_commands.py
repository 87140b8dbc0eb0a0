"""Parsing of MAIL/RCPT arguments and command lines, without sockets."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.smtp.commands import CommandError, parse_mail, parse_rcpt, split_command


class CommandTests(SynchronousTestCase):
    def code(self, f: Any, *args: object) -> int:
        with self.assertRaises(CommandError) as caught:
            f(*args)
        code: int = caught.exception.reply.code
        return code

    def test_split_command(self) -> None:
        """Verbs are upper-cased; CR, LF and NUL get 501; UTF-8 only passes in MAIL/RCPT."""
        self.assertEqual(split_command(b"mail FROM:<a@b.c>"), ("MAIL", "FROM:<a@b.c>"))
        self.assertEqual(split_command(b"  NOOP  "), ("NOOP", ""))
        self.assertEqual(self.code(split_command, b"MA\x00IL"), 501)
        self.assertEqual(self.code(split_command, b"EHLO a\rb"), 501)
        self.assertEqual(self.code(split_command, b"NOOP a\nb"), 501)
        self.assertEqual(self.code(split_command, b"NOOP\r"), 501)
        self.assertEqual(
            split_command("MAIL FROM:<\u00e9@b.c>".encode()), ("MAIL", "FROM:<\u00e9@b.c>")
        )
        self.assertEqual(self.code(split_command, "EHLO \u00e9".encode()), 500)
        self.assertEqual(self.code(split_command, b"MAIL FROM:<\xc3@b.c>"), 501)

    def test_mail_forms(self) -> None:
        """Null sender, spaces after the colon, missing brackets and parameters."""
        self.assertEqual(parse_mail("FROM:<>", 100).sender, "")
        self.assertEqual(parse_mail("from: <a@b.example>", 100).sender, "a@b.example")
        self.assertEqual(parse_mail("FROM:a@b.example", 100).sender, "a@b.example")
        parsed = parse_mail("FROM:<a@b.example> SIZE=99 BODY=8BITMIME AUTH=<>", 100)
        self.assertEqual((parsed.size, parsed.body), (99, "8BITMIME"))
        self.assertEqual(parse_mail("FROM:<@relay.example:a@b.example>", 100).sender, "a@b.example")

    def test_mail_errors(self) -> None:
        """Bad syntax is 501, unknown parameters 555, SIZE over the limit 552."""
        self.assertEqual(self.code(parse_mail, "FROM <a@b.example>", 100), 501)
        self.assertEqual(self.code(parse_mail, "FROM:<a b@example.com>", 100), 501)
        self.assertEqual(self.code(parse_mail, "FROM:<a@b.example", 100), 501)
        self.assertEqual(self.code(parse_mail, "FROM:<a@b.example> SIZE=101", 100), 552)
        self.assertEqual(self.code(parse_mail, "FROM:<a@b.example> SIZE=x", 100), 501)
        self.assertEqual(self.code(parse_mail, "FROM:<a@b.example> XFOO=1", 100), 555)
        self.assertEqual(self.code(parse_mail, "FROM:<" + "a" * 65 + "@b.example>", 100), 501)

    def test_rcpt(self) -> None:
        """Recipients need an address; literals and quoted local parts are valid."""
        self.assertEqual(parse_rcpt("TO:<x@[192.0.2.1]>").recipient, "x@[192.0.2.1]")
        self.assertEqual(parse_rcpt('TO:<"a>b"@example.com>').recipient, '"a>b"@example.com')
        self.assertEqual(self.code(parse_rcpt, "TO:<>"), 501)
        self.assertEqual(self.code(parse_rcpt, "TO:<x@example.com> XFOO=1"), 555)
        self.assertEqual(self.code(parse_rcpt, "TO:<x@-bad-.example>"), 501)

    @given(st.text(max_size=300))
    def test_parsers_only_raise_command_errors(self, text: str) -> None:
        """Whatever the argument, the parsers return a value or a CommandError."""
        for parse in (lambda t: parse_mail(t, 1000), parse_rcpt):
            with contextlib.suppress(CommandError):
                parse(text)

    @given(st.binary(max_size=600))
    def test_split_command_only_raises_command_errors(self, line: bytes) -> None:
        """Any bytes give a (verb, argument) pair or a CommandError."""
        try:
            verb, argument = split_command(line)
        except CommandError:
            return
        self.assertTrue(verb.isascii() and argument.isascii())


class MailFromTests(SynchronousTestCase):
    def test_bare_sender_is_qualified(self) -> None:
        """C{MAIL FROM:<root>} is taken as C{root@domain}, as Postfix's append_at_myorigin
        does; with no domain to add it is refused as before."""
        self.assertEqual(parse_mail("FROM:<root>", 100, "example.org").sender, "root@example.org")
        self.assertEqual(
            parse_mail("FROM:root SIZE=10", 100, "example.org").sender, "root@example.org"
        )
        self.assertEqual(parse_mail("FROM:<>", 100, "example.org").sender, "")
        self.assertEqual(parse_mail("FROM:<a@b.example>", 100, "example.org").sender, "a@b.example")
        with self.assertRaises(CommandError) as caught:
            parse_mail("FROM:<root>", 100)
        self.assertEqual(caught.exception.reply.code, 501)
        with self.assertRaises(CommandError):
            parse_mail("FROM:<ro ot>", 100, "example.org")
