"""The upstream conversation's pure parts: encoding, replies, capabilities, plans, outcomes."""

from __future__ import annotations

from twisted.mail.smtp import SMTPClient, quoteaddr
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
    reply_for_failure,
)
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import AllRefusedPermanentError, AllRefusedTemporaryError
from smtpproxy.providers.smtp import wire

FULL = wire.Capabilities(
    frozenset({"PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "SIZE"}), 1000, ("PLAIN",)
)


def email(raw: bytes = b"Subject: x\r\n\r\nbody\r\n", **changes: object) -> Email:
    values: dict[str, object] = {
        "envelope_from": "a@example.com",
        "envelope_to": ("b@example.org",),
        "raw": raw,
    }
    values.update(changes)
    return Email(**values)  # type: ignore[arg-type]


class BodyEncodingTests(SynchronousTestCase):
    def test_stock_transform_doubles_carriage_returns(self) -> None:
        """Defect: Twisted's transformChunk turns a CRLF message's line ends into CR CR LF;
        encode_body leaves CRLF alone."""
        stock = SMTPClient.transformChunk(SMTPClient(b"x"), b"a\r\nb\r\n")
        self.assertEqual(stock, b"a\r\r\nb\r\r\n")
        self.assertEqual(wire.encode_body(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n")

    def test_stock_transform_misses_a_leading_dot(self) -> None:
        """Defect: a dot opening the message (or a chunk) is not stuffed by Twisted; here it is."""
        stock = SMTPClient.transformChunk(SMTPClient(b"x"), b".\n")
        self.assertEqual(stock, b".\r\n")  # which the server reads as the end of the message
        self.assertEqual(wire.encode_body(b".\r\n"), b"..\r\n.\r\n")
        self.assertEqual(wire.encode_body(b".x\r\n..y\r\n"), b"..x\r\n...y\r\n.\r\n")

    def test_round_trip_is_byte_for_byte(self) -> None:
        """A CRLF body decodes back to itself, dots and all, with or without a final CRLF."""
        for raw in (
            b"",
            b"x",
            b"x\r\n",
            b".\r\n.\r\n..\r\n",
            b"a\r\n.\r\nb",
            b"\r\n.\r\n",
            "Grüße\r\n".encode(),
        ):
            encoded = wire.encode_body(raw)
            self.assertTrue(encoded.endswith(b"\r\n.\r\n") or encoded == b".\r\n", raw)
            expected = raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"
            self.assertEqual(wire.decode_body(encoded), expected, raw)

    def test_bare_line_ends_become_crlf(self) -> None:
        """A bare LF or CR goes out as CRLF, so LF.LF cannot end the message early upstream
        (SMTP smuggling); the dot after it is stuffed."""
        self.assertEqual(wire.encode_body(b"a\n.\nb\rc\r\n"), b"a\r\n..\r\nb\r\nc\r\n.\r\n")
        self.assertEqual(wire.encode_body(b"a\n.\r\n"), b"a\r\n..\r\n.\r\n")

    def test_linear_time_on_many_dots(self) -> None:
        """Ten megabytes of dot lines encode in one pass (bytes.replace), not per line in Python."""
        raw = b".\r\n" * 3_500_000
        encoded = wire.encode_body(raw)
        self.assertEqual(len(encoded), len(raw) + 3_500_000 + 3)


class ReplyTests(SynchronousTestCase):
    def test_multi_line_reply(self) -> None:
        """Continuation lines build one reply with its enhanced status taken from the first line."""
        reader = wire.ReplyReader()
        self.assertIsNone(reader.feed(b"550-5.1.1 first"))
        reply = reader.feed(b"550 5.1.1 second")
        assert reply is not None
        self.assertEqual((reply.code, reply.status, reply.text), (550, "5.1.1", "first second"))

    def test_strict_codes(self) -> None:
        """Defect: Twisted reads int(line[:3]): ' 25', '+25' and '25 ' pass as codes; not here."""
        for line in (b" 25 x", b"+25 x", b"25 ", b"abc", b"250x", b"650 x", b""):
            self.assertRaises(wire.ReplyError, wire.ReplyReader().feed, line)

    def test_code_may_not_change_within_a_reply(self) -> None:
        """A continuation of 250 ending as 550 is a broken upstream, not a 550."""
        reader = wire.ReplyReader()
        reader.feed(b"250-a")
        self.assertRaises(wire.ReplyError, reader.feed, b"550 b")

    def test_reply_is_bounded(self) -> None:
        """Defect: Twisted collects continuation lines without limit; the reader stops at 100."""
        reader = wire.ReplyReader()
        for _ in range(wire.MAX_REPLY_LINES):
            reader.feed(b"250-x")
        self.assertRaises(wire.ReplyError, reader.feed, b"250-x")

    def test_text_is_clipped_and_cleaned(self) -> None:
        """Upstream text reaches our reply as one printable line of bounded length."""
        reply = wire.Reply(451, (b"4.3.0 evil\x1b[31m\r\n250 ok\x00" + b"y" * 1000,))
        self.assertNotIn("\r", reply.text)
        self.assertNotIn("\n", reply.text)
        self.assertNotIn("\x1b", reply.text)
        self.assertLessEqual(len(reply.text), wire.MAX_REPLY_TEXT)
        rendered = reply_for_failure(wire.failure(reply, "refused")).render()
        self.assertNotIn(b"\r", rendered)
        self.assertNotIn(b"\n", rendered)


class CapabilityTests(SynchronousTestCase):
    def test_keywords_ignore_case(self) -> None:
        """Defect: Twisted looks up b'STARTTLS' and b'AUTH' as written; 'starttls' counts here."""
        found = wire.parse_capabilities(
            [b"upstream.test", b"starttls", b"Pipelining", b"size 5000", b"auth=login plain"]
        )
        self.assertTrue(found.starttls)
        self.assertTrue(found.pipelining)
        self.assertEqual(found.size, 5000)
        self.assertEqual(found.auth, ("LOGIN", "PLAIN"))

    def test_first_line_is_the_name(self) -> None:
        """The server's name on the first line is not a keyword, even if it reads like one."""
        self.assertFalse(wire.parse_capabilities([b"STARTTLS", b"SIZE"]).starttls)

    def test_size_without_limit(self) -> None:
        """SIZE without a number means no fixed limit (0); no SIZE at all is None."""
        self.assertEqual(wire.parse_capabilities([b"x", b"SIZE"]).size, 0)
        self.assertIsNone(wire.parse_capabilities([b"x"]).size)


class PlanTests(SynchronousTestCase):
    def test_addresses_go_out_as_given(self) -> None:
        """Defect: Twisted's quoteaddr cannot encode a UTF-8 address (RFC 6531); the plan
        sends it, and a quoted local part, as given."""
        self.assertRaises(UnicodeEncodeError, quoteaddr, "jörg@example.org")
        plan = wire.plan(
            email(envelope_from='"a b"@example.com', envelope_to=("jörg@example.org",)), FULL
        )
        self.assertTrue(plan.mail.startswith(b'MAIL FROM:<"a b"@example.com>'))
        self.assertIn(b"SMTPUTF8", plan.mail)
        self.assertEqual(plan.rcpts, ("RCPT TO:<jörg@example.org>".encode(),))

    def test_null_sender(self) -> None:
        """The null sender of a bounce stays <>."""
        self.assertTrue(wire.plan(email(envelope_from=""), FULL).mail.startswith(b"MAIL FROM:<>"))

    def test_parameters_when_offered(self) -> None:
        """SIZE, BODY=8BITMIME, SMTPUTF8 and the DSN parameters go out when offered and needed."""
        dsn = Dsn(
            "HDRS",
            "id+1 x",
            (RecipientDsn("b@example.org", ("SUCCESS", "FAILURE"), ("rfc822", "o=b@example.org")),),
        )
        raw = "Subject: Grüße\r\n\r\nx\r\n".encode()
        plan = wire.plan(email(raw, dsn=dsn), FULL)
        self.assertEqual(
            plan.mail,
            f"MAIL FROM:<a@example.com> SIZE={len(raw)} BODY=8BITMIME SMTPUTF8 RET=HDRS "
            "ENVID=id+2B1+20x".encode(),
        )
        self.assertEqual(
            plan.rcpts,
            (b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+3Db@example.org",),
        )

    def test_nothing_unoffered(self) -> None:
        """An upstream offering nothing gets bare MAIL and RCPT, DSN parameters left out."""
        dsn = Dsn("FULL", None, (RecipientDsn("b@example.org", ("NEVER",), None),))
        plan = wire.plan(email(dsn=dsn), wire.Capabilities())
        self.assertEqual(plan.mail, b"MAIL FROM:<a@example.com>")
        self.assertEqual(plan.rcpts, (b"RCPT TO:<b@example.org>",))

    def test_latin1_header_is_not_smtputf8(self) -> None:
        """8-bit headers that are not UTF-8 ask for 8BITMIME only (they are no RFC 6532 message)."""
        plan = wire.plan(email(b"Subject: caf\xe9\r\n\r\nx\r\n"), FULL)
        self.assertIn(b"BODY=8BITMIME", plan.mail)
        self.assertNotIn(b"SMTPUTF8", plan.mail)

    def test_over_size_refused_before_sending(self) -> None:
        """A message over the upstream's SIZE is a 552 5.3.4 before any command is sent."""
        error = self.assertRaises(PermanentDeliveryError, wire.plan, email(b"x" * 1001), FULL)
        self.assertEqual((error.code, error.status), (552, "5.3.4"))

    def test_no_8bitmime(self) -> None:
        """8-bit content to an upstream without 8BITMIME is refused (5.6.3), never rewritten."""
        error = self.assertRaises(
            PermanentDeliveryError, wire.plan, email(b"\xe9\r\n"), wire.Capabilities()
        )
        self.assertEqual(error.status, "5.6.3")

    def test_no_smtputf8(self) -> None:
        """A UTF-8 address to an upstream without SMTPUTF8 is 553 5.6.7 (RFC 6531 3.5)."""
        error = self.assertRaises(
            PermanentDeliveryError,
            wire.plan,
            email(envelope_to=("jörg@example.org",)),
            wire.Capabilities(frozenset({"8BITMIME"})),
        )
        self.assertEqual((error.code, error.status), (553, "5.6.7"))


OK = wire.Reply(250, (b"2.0.0 ok",))


class OutcomeTests(SynchronousTestCase):
    def test_some_refused(self) -> None:
        """Accepted recipients get the message; the refused ones are reported with their reply."""
        refused = wire.Reply(550, (b"5.1.1 no such user",))
        got = wire.outcome(("a@x", "b@x"), OK, (OK, refused), wire.Reply(354), OK)
        self.assertEqual(got.accepted, ("a@x",))
        self.assertEqual(got.refused, (("b@x", refused),))

    def test_all_refused_permanently(self) -> None:
        """Every recipient refused with 5xx: a permanent failure carrying the upstream's reply."""
        refused = wire.Reply(550, (b"5.1.1 no such user",))
        error = self.assertRaises(
            PermanentDeliveryError, wire.outcome, ("a@x",), OK, (refused,), None, None
        )
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertIn("no such user", reply.text)

    def test_temporary_refusal_wins(self) -> None:
        """One 4xx among the refusals makes the whole failure temporary (a retry can help)."""
        error = self.assertRaises(
            TransientDeliveryError,
            wire.outcome,
            ("a@x", "b@x"),
            OK,
            (wire.Reply(550, (b"5.1.1 no",)), wire.Reply(452, (b"4.2.2 full",))),
            None,
            None,
        )
        self.assertEqual(reply_for_failure(error).status, "4.2.2")

    def test_all_refused_names_each_recipient(self) -> None:
        """Every recipient refused: the error still answers our client as one reply (4xx when
        any refusal was 4xx, 5xx when all were), and names each recipient's own reply so
        the queue can fail the 5xx ones at once."""
        busy, gone = wire.Reply(450, (b"4.2.1 busy",)), wire.Reply(550, (b"5.1.1 no",))
        mixed = self.assertRaises(
            AllRefusedTemporaryError, wire.outcome, ("a@x", "b@x"), OK, (gone, busy), None, None
        )
        self.assertEqual((reply_for_failure(mixed).code, mixed.status), (451, "4.2.1"))
        self.assertEqual(
            [(r.address, r.code, r.status, r.permanent) for r in mixed.refused],
            [("a@x", 550, "5.1.1", True), ("b@x", 450, "4.2.1", False)],
        )
        final = self.assertRaises(
            AllRefusedPermanentError, wire.outcome, ("a@x", "b@x"), OK, (gone, gone), None, None
        )
        self.assertEqual((reply_for_failure(final).code, final.status), (550, "5.1.1"))
        self.assertEqual([r.address for r in final.refused], ["a@x", "b@x"])

    def test_sender_refused(self) -> None:
        """A refused MAIL decides, whatever the pipelined RCPTs got back."""
        error = self.assertRaises(
            TransientDeliveryError,
            wire.outcome,
            ("a@x",),
            wire.Reply(421, (b"4.7.0 try later",)),
            (wire.Reply(503, (b"5.5.1 need MAIL",)),),
            wire.Reply(503),
            None,
        )
        self.assertIn("try later", error.reason)

    def test_final_reply_decides(self) -> None:
        """A 5xx after the body is a permanent failure of the same code; a 4xx is 451."""
        error = self.assertRaises(
            PermanentDeliveryError,
            wire.outcome,
            ("a@x",),
            OK,
            (OK,),
            wire.Reply(354),
            wire.Reply(554, (b"5.7.1 spam",)),
        )
        self.assertEqual(reply_for_failure(error).code, 554)
        error2 = self.assertRaises(
            TransientDeliveryError,
            wire.outcome,
            ("a@x",),
            OK,
            (OK,),
            wire.Reply(354),
            wire.Reply(452, (b"4.3.1 disk",)),
        )
        self.assertEqual(reply_for_failure(error2).code, 451)

    def test_status_class_follows_code(self) -> None:
        """An upstream 550 with a 4.x.x status (or none) still gives a 5.x.x status."""
        error = wire.failure(wire.Reply(550, (b"4.1.1 odd",)), "x")
        self.assertEqual(error.status, "5.0.0")


class XtextTests(SynchronousTestCase):
    def test_xtext(self) -> None:
        """Plus, equals, blanks and controls are +HH; the rest as is (RFC 3461 4)."""
        self.assertEqual(wire.xtext("a+b=c d\x01"), "a+2Bb+3Dc+20d+01")
