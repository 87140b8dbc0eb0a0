"""SMTPUTF8 (RFC 6531) end to end: the command syntax in memory, real smtplib on loopback.

The in-memory tests drive one session over a StringTransport; the wire
tests send with Python's smtplib (C{mail_options=["SMTPUTF8"]} and
C{send_message}, which declares SMTPUTF8 by itself for a UTF-8 address)
through the stdout provider and through the Graph provider to the strict
fake Graph, and check what arrived.
"""

from __future__ import annotations

import base64
import json
import smtplib
import uuid
from email import policy
from email.message import EmailMessage
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.providers.stdout import StdoutProvider
from tests.fakegraph import FakeGraph, mime_addresses, parse_mime
from tests.providers.graph.test_smtp import relay_to_fake_graph
from tests.smtp.test_protocol_edges import Harness, reply_codes, reply_lines
from tests.support import TIMEOUT, RecordingProvider, RecordingStream, in_thread, start_relay

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
SUBJECT = "Grüße aus Köln \u2013 Zählerstand ✓"


def session(harness: Harness, lines: list[str]) -> list[int]:
    """Feed C{lines} (CRLF added, UTF-8 encoded) to one new session; the reply codes."""
    protocol, transport = harness.connect()
    protocol.dataReceived("".join(line + "\r\n" for line in lines).encode())
    return reply_codes(transport)


class CommandSyntaxTests(SynchronousTestCase):
    """The RFC 6531 command syntax, one in-memory session per test."""

    def test_advertised(self) -> None:
        """EHLO lists SMTPUTF8 beside 8BITMIME."""
        protocol, transport = Harness().connect()
        protocol.dataReceived(b"EHLO c\r\n")
        keywords = {line[4:] for line in transport.value().split(b"\r\n")[2:]}
        self.assertLessEqual({b"SMTPUTF8", b"8BITMIME"}, keywords)

    def test_declared_transaction_carries_utf8_addresses(self) -> None:
        """C{MAIL FROM:<josé@exämple.test> SMTPUTF8 SIZE= BODY=8BITMIME} and UTF-8 RCPTs
        are accepted; the provider gets the addresses as sent."""
        harness = Harness()
        codes = session(
            harness,
            [
                "EHLO c",
                "MAIL FROM:<josé@exämple.test> SMTPUTF8 SIZE=100 BODY=8BITMIME",
                "RCPT TO:<zoë@例え.テスト>",
                'RCPT TO:<"jü rgen"@b.example>',
                "DATA",
                f"Subject: {SUBJECT}\r\n\r\nHällo\r\n.",
            ],
        )
        self.assertEqual(codes, [220, 250, 250, 250, 250, 354, 250])
        (email,) = harness.provider.emails
        self.assertEqual(email.envelope_from, "josé@exämple.test")
        self.assertEqual(email.envelope_to, ("zoë@例え.テスト", '"jü rgen"@b.example'))
        self.assertEqual(email.subject, SUBJECT)

    def test_undeclared_transaction_refuses_utf8_addresses(self) -> None:
        """Without SMTPUTF8 a UTF-8 sender or recipient gets 553 5.6.7 and the session
        goes on: the ASCII recipient after it is accepted."""
        harness = Harness()
        protocol, transport = harness.connect()
        lines = [
            "EHLO c",
            "MAIL FROM:<josé@b.example>",
            "MAIL FROM:<a@b.example>",
            "RCPT TO:<zoë@b.example>",
            "RCPT TO:<z@exämple.test>",
            "RCPT TO:<z@b.example>",
        ]
        protocol.dataReceived("".join(line + "\r\n" for line in lines).encode())
        self.assertEqual(reply_codes(transport), [220, 250, 553, 250, 553, 553, 250])
        self.assertIn(
            "553 5.6.7 Non-ASCII sender address needs SMTPUTF8", reply_lines(transport)[2]
        )

    def test_declaration_lasts_one_transaction(self) -> None:
        """SMTPUTF8 belongs to the transaction: after RSET, and after a delivered message,
        a MAIL without it may not carry a UTF-8 recipient again."""
        codes = session(
            Harness(),
            [
                "EHLO c",
                "MAIL FROM:<a@b.example> SMTPUTF8",
                "RCPT TO:<zoë@b.example>",
                "DATA",
                "Subject: x\r\n\r\nx\r\n.",
                "MAIL FROM:<a@b.example>",
                "RCPT TO:<zoë@b.example>",
                "RSET",
                "MAIL FROM:<a@b.example> SMTPUTF8",
                "RSET",
                "MAIL FROM:<a@b.example>",
                "RCPT TO:<zoë@b.example>",
            ],
        )
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250, 250, 553, 250, 250, 250, 250, 553])

    def test_malformed_utf8_gets_a_reply_not_a_traceback(self) -> None:
        """Truncated, overlong, surrogate and out-of-range sequences in MAIL: 501 5.5.2
        each, the session stays usable (NOOP 250)."""
        protocol, transport = Harness(max_errors=100).connect()
        data = b"EHLO c\r\n"
        for bad in (b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff"):
            data += b"MAIL FROM:<a" + bad + b"@b.example> SMTPUTF8\r\n"
        protocol.dataReceived(data + b"NOOP\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 501, 501, 501, 501, 501, 250])
        self.assertNotIn(b"Traceback", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_other_syntax_errors(self) -> None:
        """SMTPUTF8 with a value, a bad IDN, UTF-8 in EHLO: 501, 501, 500."""
        codes = session(
            Harness(),
            [
                "EHLO c",
                "MAIL FROM:<a@b.example> SMTPUTF8=1",
                "MAIL FROM:<a@ex..ämple> SMTPUTF8",
                "EHLO exämple.test",
            ],
        )
        self.assertEqual(codes, [220, 250, 501, 501, 500])

    def test_postfix_shape_without_smtputf8(self) -> None:
        """What Postfix sends for a cron mail with a UTF-8 subject: an ASCII envelope with
        BODY=8BITMIME and no SMTPUTF8, raw UTF-8 in the header, an 8-bit body.  Accepted."""
        harness = Harness()
        codes = session(
            harness,
            [
                "EHLO postfix.example",
                "MAIL FROM:<root@host.example> BODY=8BITMIME SIZE=200",
                "RCPT TO:<ops@b.example>",
                "DATA",
                f"From: root@host.example\r\nSubject: {SUBJECT}\r\n\r\nZähler: 42 m³\r\n.",
            ],
        )
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250])
        (email,) = harness.provider.emails
        self.assertEqual((email.subject, email.text), (SUBJECT, "Zähler: 42 m³\r\n"))
        self.assertIn(f"Subject: {SUBJECT}".encode(), email.raw)


def utf8_message(sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"José Núñez <{sender}>"
    message["To"] = f"Zoë <{recipient}>"
    message["Subject"] = SUBJECT
    message["Message-ID"] = "<utf8-1@example.org>"
    message.set_content("Hällo wörld, 42 m³\n")
    return message


def send_message(port: int, message: EmailMessage) -> dict[str, Any]:
    """smtplib's send_message: it declares SMTPUTF8 itself when an address needs it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        refused: dict[str, Any] = client.send_message(message)
        return refused


def sendmail(port: int, option: str, sender: str, recipients: list[str], data: bytes) -> None:
    """smtplib's sendmail with one MAIL parameter (C{SMTPUTF8}, or C{BODY=8BITMIME})."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.sendmail(sender, recipients, data, mail_options=[option])


def refused_code(port: int, sender: str, recipient: str) -> int:
    """The code for a UTF-8 RCPT in a MAIL without SMTPUTF8 (smtplib sends it as UTF-8)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo()
        client.mail(sender)
        client.command_encoding = "utf-8"
        code, _ = client.rcpt(recipient)
        return code


class StdoutWireTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.stream = RecordingStream()
        provider = cast(RecordingProvider, StdoutProvider(self.stream))
        self.relay = start_relay(self, provider=provider, tls_enabled=False)

    async def test_sendmail_with_smtputf8(self) -> None:
        """C{sendmail(..., mail_options=["SMTPUTF8"])} with UTF-8 addresses on both sides:
        the stdout block shows the addresses and the subject as written."""
        raw = utf8_message("josé@exämple.test", "zoë@例え.テスト").as_bytes(policy=policy.SMTPUTF8)
        await in_thread(
            sendmail, self.relay.port, "SMTPUTF8", "josé@exämple.test", ["zoë@例え.テスト"], raw
        )
        (block,) = self.stream.writes
        self.assertIn("Envelope-From: <josé@exämple.test>\n", block)
        self.assertIn("Envelope-To: <zoë@例え.テスト>\n", block)
        self.assertIn("From: José Núñez <josé@exämple.test>\n", block)
        self.assertIn("To: Zoë <zoë@例え.テスト>\n", block)
        self.assertIn(f"Subject: {SUBJECT}\n", block)
        self.assertIn("| Hällo wörld, 42 m³", block)

    async def test_send_message_declares_smtputf8(self) -> None:
        """C{send_message} with a UTF-8 local part: smtplib declares SMTPUTF8, the relay
        takes it, and the subject arrives as written."""
        message = utf8_message("josé@exämple.test", "ops@b.example")
        refused = await in_thread(send_message, self.relay.port, message)
        self.assertEqual(refused, {})
        (block,) = self.stream.writes
        self.assertIn("Envelope-From: <josé@exämple.test>\n", block)
        self.assertIn(f"Subject: {SUBJECT}\n", block)

    async def test_undeclared_utf8_recipient_refused(self) -> None:
        """A UTF-8 RCPT after a MAIL without SMTPUTF8: 553, and nothing is printed."""
        code = await in_thread(refused_code, self.relay.port, "a@b.example", "zoë@b.example")
        self.assertEqual(code, 553)
        self.assertEqual(self.stream.writes, [])


class GraphWireTests(TestCase):
    """smtplib -> relay -> Graph provider -> the fake Graph, over loopback."""

    timeout = 30

    def setUp(self) -> None:
        self.fake, self.relay = relay_to_fake_graph(self)

    async def test_idn_domains_go_as_mime_in_ascii(self) -> None:
        """ASCII local parts at IDN domains and a UTF-8 subject (send_message, SMTPUTF8):
        raw MIME with an ASCII header block; Graph reads the subject and names back, the
        recipients as A-labels; the body arrives byte for byte."""
        message = utf8_message("jose@exämple.test", "zoe@例え.テスト")
        await in_thread(send_message, self.relay.port, message)
        (delivery,) = self.fake.deliveries
        self.assertEqual(self.fake.violations, [])
        self.assertEqual(delivery.method, "mime")
        self.assertEqual(delivery.to, ("zoe@xn--r8jz45g.xn--zckzah",))
        assert delivery.mime is not None
        head, _, body = delivery.mime.partition(b"\r\n\r\n")
        self.assertTrue(head.isascii())
        sent = message.as_bytes(policy=policy.SMTPUTF8)
        self.assertEqual(body, sent.partition(b"\r\n\r\n")[2])
        parsed: Any = parse_mime(delivery.mime)
        self.assertEqual(parsed["subject"], SUBJECT)
        self.assertEqual(str(parsed["to"]), "Zoë <zoe@xn--r8jz45g.xn--zckzah>")
        self.assertEqual(mime_addresses(parsed, "reply-to"), ("jose@xn--exmple-cua.test",))

    async def test_eai_recipient_goes_as_json(self) -> None:
        """A UTF-8 local part (C{josé@exämple.test}) has no ASCII form: the message goes as
        JSON, the recipient with its UTF-8 local part and an A-label domain, the subject as
        text."""
        message = utf8_message("app@example.org", "josé@exämple.test")
        await in_thread(send_message, self.relay.port, message)
        (delivery,) = self.fake.deliveries
        self.assertEqual(self.fake.violations, [])
        self.assertEqual(delivery.method, "json")
        self.assertEqual(delivery.to, ("josé@xn--exmple-cua.test",))
        assert delivery.message is not None
        self.assertEqual(delivery.message["subject"], SUBJECT)
        self.assertIn("Hällo wörld", delivery.message["body"]["content"])

    async def test_postfix_shape_goes_as_mime(self) -> None:
        """An ASCII envelope, BODY=8BITMIME without SMTPUTF8, a raw UTF-8 subject and an
        8-bit body (what Postfix relays for cron): delivered as raw MIME, subject encoded,
        body unchanged."""
        raw = (
            f"From: root@host.example\r\nTo: ops@b.example\r\nSubject: {SUBJECT}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\nZähler: 42 m³\r\n"
        ).encode()
        envelope = ("root@host.example", ["ops@b.example"])
        await in_thread(sendmail, self.relay.port, "BODY=8BITMIME", *envelope, raw)
        (delivery,) = self.fake.deliveries
        self.assertEqual(self.fake.violations, [])
        self.assertEqual(delivery.method, "mime")
        assert delivery.mime is not None
        self.assertEqual(parse_mime(delivery.mime)["subject"], SUBJECT)
        self.assertTrue(delivery.mime.endswith("\r\n\r\nZähler: 42 m³\r\n".encode()))


class FakeStrictnessTests(SynchronousTestCase):
    """The fake holds the relay to what docs/graph.md says Graph accepts."""

    def setUp(self) -> None:
        self.fake = FakeGraph(Clock(), mailboxes=(MAILBOX,))
        self.stub: Any = StubTreq(self.fake.resource)
        form = {
            "client_id": self.fake.client_id,
            "client_secret": self.fake.client_secret,
            "scope": "http://graph.test/.default",
            "grant_type": "client_credentials",
        }
        answer = self.call(
            f"http://login.test/{self.fake.tenant}/oauth2/v2.0/token",
            "&".join(f"{k}={v}" for k, v in form.items()).encode(),
            "application/x-www-form-urlencoded",
        )
        self.token = answer["access_token"]

    def call(self, url: str, body: bytes, content_type: str, token: str = "") -> Any:
        headers = {"client-request-id": str(uuid.uuid4()), "Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        response = self.successResultOf(self.stub.post(url, data=body, headers=headers))
        payload = self.successResultOf(response.content())
        return json.loads(payload) if payload else response.code

    def send(self, body: bytes, content_type: str) -> Any:
        url = f"http://graph.test/v1.0/users/{MAILBOX}/sendMail"
        return self.call(url, body, content_type, self.token)

    def test_raw_utf8_header_is_a_violation(self) -> None:
        """MIME with a raw UTF-8 subject: Graph would take it (202) and garble it; the
        fake takes it too and records the violation."""
        mime = f"From: {MAILBOX}\r\nTo: a@b.example\r\nSubject: {SUBJECT}\r\n\r\nx\r\n"
        self.assertEqual(self.send(base64.b64encode(mime.encode()), "text/plain"), 202)
        self.assertEqual(
            self.fake.violations, ["sendMail: 8-bit bytes in MIME header fields Subject"]
        )

    def test_unicode_domain_refused_eai_local_part_accepted(self) -> None:
        """JSON recipients: a UTF-8 local part is accepted, a U-label domain is refused
        with ErrorInvalidRecipients and recorded as the relay's mistake."""
        good = {"emailAddress": {"address": "josé@xn--exmple-cua.test"}}
        bad = {"emailAddress": {"address": "zoe@exämple.test"}}
        for recipient, expected in ((good, 202), (bad, "ErrorInvalidRecipients")):
            document = {"message": {"subject": SUBJECT, "toRecipients": [recipient]}}
            answer = self.send(json.dumps(document).encode(), "application/json")
            result = answer if isinstance(answer, int) else answer["error"]["code"]
            self.assertEqual(result, expected)
        self.assertEqual(len(self.fake.violations), 1)
        self.assertIn("exämple.test", self.fake.violations[0])
