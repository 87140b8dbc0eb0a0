"""DSN (RFC 3461): parameter parsing, xtext, and the parameters carried to the provider."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import dsn
from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.payload import plan_delivery
from smtpproxy.providers.stdout import StdoutProvider
from smtpproxy.smtp.commands import CommandError, parse_mail, parse_rcpt
from tests.smtp.test_protocol_edges import Harness, reply_lines


def xtext_encode(text: str) -> str:
    """RFC 3461 4 encoding, for round trips: +HH for '+', '=', and anything not !..~."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(char if 33 <= byte <= 126 and char not in "+=" else f"+{byte:02X}")
    return "".join(out)


class XtextTests(SynchronousTestCase):
    def test_decoding(self) -> None:
        """+HH is one octet (either case of hex digit); the octets must be UTF-8."""
        self.assertEqual(dsn.xtext_decode("abc"), "abc")
        self.assertEqual(dsn.xtext_decode("a+2Bb+3Dc"), "a+b=c")
        self.assertEqual(dsn.xtext_decode("+2b"), "+")
        self.assertEqual(dsn.xtext_decode("+C3+A9t+C3+A9"), "\u00e9t\u00e9")

    def test_malformed(self) -> None:
        """A '+' without two hex digits, a space or control, '=', and non-UTF-8 octets."""
        for text in ("+", "+2", "a+ZZ", "a b", "a=b", "+FF", "tab\there", "\u00e9"):
            with self.assertRaises(ValueError, msg=text):
                dsn.xtext_decode(text)

    @given(st.text(max_size=200))
    def test_round_trip(self, text: str) -> None:
        """Whatever a client encodes (that is UTF-8), decoding gives back."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return
        self.assertEqual(dsn.xtext_decode(xtext_encode(text)), text)

    @given(st.text(max_size=300))
    def test_only_value_errors(self, text: str) -> None:
        """Any text decodes or raises ValueError, nothing else."""
        with contextlib.suppress(ValueError):
            dsn.xtext_decode(text)

    def test_linear_time(self) -> None:
        """A long run of escapes decodes in time proportional to its length."""
        started = time.perf_counter()
        dsn.xtext_decode("+41" * 200_000)
        self.assertLess(time.perf_counter() - started, 2.0)


class ParameterTests(SynchronousTestCase):
    def reply(self, parse: Any, *args: object) -> tuple[int, str]:
        with self.assertRaises(CommandError) as caught:
            parse(*args)
        return caught.exception.reply.code, caught.exception.reply.status

    def test_mail(self) -> None:
        """RET (any case) and ENVID (xtext-decoded) are accepted and kept."""
        parsed = parse_mail("FROM:<a@b.example> RET=hdrs ENVID=QQ+2B314159 SIZE=10", 100)
        self.assertEqual((parsed.ret, parsed.envid, parsed.size), ("HDRS", "QQ+314159", 10))
        self.assertEqual(parse_mail("FROM:<> RET=FULL", 100).ret, "FULL")

    def test_mail_malformed(self) -> None:
        """Bad RET, empty or too long or control-character ENVID: 501 5.5.4."""
        for params in (
            "RET=ALL",
            "RET",
            "ENVID=",
            "ENVID=" + "x" * 101,
            "ENVID=a+0Ab",
            "ENVID=+C3+A9",
            "RET=FULL RET=HDRS",
        ):
            self.assertEqual(
                self.reply(parse_mail, f"FROM:<a@b.example> {params}", 100), (501, "5.5.4"), params
            )
        self.assertEqual(parse_mail("FROM:<a@b.example> ENVID=" + "x" * 100, 100).envid, "x" * 100)

    def test_rcpt(self) -> None:
        """NOTIFY (NEVER, or events once each) and ORCPT (type lower-cased, address decoded)."""
        parsed = parse_rcpt(
            "TO:<x@example.com> NOTIFY=success,DELAY ORCPT=RFC822;x+2By@example.com"
        )
        self.assertEqual(parsed.notify, ("SUCCESS", "DELAY"))
        self.assertEqual(parsed.orcpt, ("rfc822", "x+y@example.com"))
        self.assertEqual(parse_rcpt("TO:<x@example.com> NOTIFY=NEVER").notify, ("NEVER",))

    def test_rcpt_malformed(self) -> None:
        """NEVER with others, repeats, unknown events, ORCPT without a type or address,
        with controls, or over 500 characters: 501 5.5.4."""
        for params in (
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=FAILURE,FAILURE",
            "NOTIFY=SUCCESS,",
            "NOTIFY=ALWAYS",
            "NOTIFY",
            "ORCPT=x@example.com",
            "ORCPT=rfc822;",
            "ORCPT=;x@example.com",
            "ORCPT=rfc822;a+0Db",
            "ORCPT=rfc822;" + "a" * 494,
        ):
            self.assertEqual(
                self.reply(parse_rcpt, f"TO:<x@example.com> {params}"), (501, "5.5.4"), params
            )
        self.assertIsNotNone(parse_rcpt("TO:<x@example.com> ORCPT=rfc822;" + "a" * 493).orcpt)

    def test_unknown_still_555(self) -> None:
        """A parameter nobody offers is still 555 5.5.4."""
        self.assertEqual(self.reply(parse_rcpt, "TO:<x@example.com> XFOO=1"), (555, "5.5.4"))


class TransactionTests(SynchronousTestCase):
    """The parameters travel with the transaction to the provider's Email."""

    def test_carried_to_the_provider(self) -> None:
        """RET and ENVID from MAIL, NOTIFY and ORCPT per RCPT reach Email.dsn; a recipient
        without either is not listed."""
        harness = Harness()
        protocol, transport = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com> RET=HDRS ENVID=id+2B1\r\n"
            b"RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;B@example.org\r\n"
            b"RCPT TO:<c@example.org>\r\n"
            b"RCPT TO:<d@example.org> NOTIFY=NEVER\r\n"
            b"DATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n"
        )
        self.assertEqual(reply_lines(transport)[-1][:3], "250")
        (email,) = harness.provider.emails
        self.assertEqual(
            email.dsn,
            Dsn(
                "HDRS",
                "id+1",
                (
                    RecipientDsn(
                        "b@example.org", ("FAILURE", "DELAY"), ("rfc822", "B@example.org")
                    ),
                    RecipientDsn("d@example.org", ("NEVER",), None),
                ),
            ),
        )

    def test_none_without_parameters(self) -> None:
        """A transaction without DSN parameters has Email.dsn None; the next one does not
        inherit the last one's."""
        harness = Harness()
        protocol, _ = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com> RET=FULL\r\nRCPT TO:<b@example.org>\r\n"
            b"DATA\r\n\r\nx\r\n.\r\n"
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n\r\ny\r\n.\r\n"
        )
        self.assertEqual([e.dsn for e in harness.provider.emails], [Dsn("FULL"), None])

    def test_malformed_is_501(self) -> None:
        """A malformed DSN value is 501 5.5.4 on the wire and the session continues."""
        harness = Harness()
        protocol, transport = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com> RET=SOME\r\n"
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org> NOTIFY=NEVER,DELAY\r\nNOOP\r\n"
        )
        self.assertEqual(
            [line[:9] for line in reply_lines(transport)[-4:]],
            ["501 5.5.4", "250 2.1.0", "501 5.5.4", "250 2.0.0"],
        )


EMAIL_DSN = Dsn(
    "HDRS", "env\x1bid", (RecipientDsn("b@example.org", ("SUCCESS",), ("rfc822", "o@x")),)
)


class ProviderTests(SynchronousTestCase):
    def email(self, with_dsn: bool = True) -> Any:
        raw = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nhi\r\n"
        email = parse_message("a@example.com", ["b@example.org"], raw)
        if not with_dsn:
            return email
        return dataclasses.replace(email, dsn=EMAIL_DSN)

    def test_stdout_text(self) -> None:
        """The text block shows the parameters, control characters neutralised."""
        stream = io.StringIO()
        StdoutProvider(stream).send(self.email())
        text = stream.getvalue()
        self.assertIn("DSN: RET=HDRS ENVID=env\ufffdid\n", text)
        self.assertIn("DSN-Recipient: <b@example.org> NOTIFY=SUCCESS ORCPT=rfc822;o@x\n", text)
        stream = io.StringIO()
        StdoutProvider(stream).send(self.email(with_dsn=False))
        self.assertNotIn("DSN", stream.getvalue())

    def test_stdout_json(self) -> None:
        """The JSON line has a C{dsn} object (null without parameters)."""
        stream = io.StringIO()
        StdoutProvider(stream, output_format="json").send(self.email())
        record = json.loads(stream.getvalue())
        self.assertEqual(
            record["dsn"],
            {
                "ret": "HDRS",
                "envid": "env\x1bid",
                "recipients": [
                    {
                        "address": "b@example.org",
                        "notify": ["SUCCESS"],
                        "orcpt": {"type": "rfc822", "address": "o@x"},
                    }
                ],
            },
        )
        stream = io.StringIO()
        StdoutProvider(stream, output_format="json").send(self.email(with_dsn=False))
        self.assertIsNone(json.loads(stream.getvalue())["dsn"])

    def test_graph_ignores(self) -> None:
        """Graph has nothing to put them in: the requests are the same with or without."""
        senders = ["relay@contoso.example"]
        for mode in ("auto", "json"):
            self.assertEqual(
                plan_delivery(self.email(), senders, mode),
                plan_delivery(self.email(with_dsn=False), senders, mode),
            )
