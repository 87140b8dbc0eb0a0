"""End to end: smtplib -> the relay's SMTP server -> the Graph provider -> the fake Graph.

Everything is real except Microsoft: real sockets on loopback for SMTP and
for HTTP, the real parser, the real delivery path and reply mapping.
"""

from __future__ import annotations

import smtplib
from collections import Counter
from email import policy
from email.message import EmailMessage
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.trial.unittest import TestCase

from smtpproxy import delivery as delivery_module
from smtpproxy.config import Config
from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.graph.retry import Tuning
from smtpproxy.smtp.protocol import session_settings
from tests.fakegraph import FakeGraph, Fault, mime_addresses, parse_mime
from tests.support import TIMEOUT, Relay, in_thread, start_relay

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"


def _sendmail(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.sendmail(sender, recipients, data)


def _failure(port: int, data: bytes) -> tuple[int, bytes]:
    """Send and return the SMTP error the relay answered with."""
    try:
        _sendmail(port, "app@example.org", ["a@x.example"], data)
    except smtplib.SMTPDataError as e:
        error = e.smtp_error
        return e.smtp_code, error if isinstance(error, bytes) else error.encode()
    raise AssertionError("the relay accepted the message")


def _message(attachment: bytes | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "Billing App <app@example.org>"
    message["To"] = "Alice <a@x.example>"
    message["Cc"] = "c@x.example"
    message["Bcc"] = "not-in-envelope@x.example"
    message["Subject"] = "Invoice 1007"
    message["Message-ID"] = "<invoice-1007@example.org>"
    message["In-Reply-To"] = "<order-77@example.org>"
    message["References"] = "<order-77@example.org>"
    message["List-Unsubscribe"] = "<mailto:unsubscribe@example.org>"
    message.set_content("Your invoice.\n")
    message.add_alternative("<p>Your invoice.</p>", subtype="html")
    if attachment is not None:
        message.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="invoice.pdf"
        )
    return message.as_bytes(policy=policy.SMTP)


def relay_to_fake_graph(case: TestCase) -> tuple[FakeGraph, Relay]:
    """A fake Graph on loopback and a relay whose Graph provider sends to it."""
    fake = FakeGraph(reactor)
    port = fake.listen(reactor)
    case.addCleanup(port.stopListening)
    config = Config.build(
        graph_tenant_id=fake.tenant,
        graph_client_id=fake.client_id,
        graph_client_secret=fake.client_secret,
        graph_sender=(MAILBOX,),
        graph_authority_host=fake.endpoint,
        graph_endpoint=fake.endpoint,
    )
    provider = GraphProvider(config, reactor, tuning=Tuning(backoff_base=0.02))
    case.addCleanup(provider.close)
    # As in production (tap), the session qualifies MAIL FROM with the provider's mailbox.
    domain = session_settings(config, mailboxes=provider.mailboxes).default_domain
    relay = start_relay(
        case, provider=cast(Any, provider), tls_enabled=False, default_domain=domain
    )
    return fake, relay


class GraphThroughSmtpTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake, self.relay = relay_to_fake_graph(self)

    async def test_each_envelope_recipient_once(self) -> None:
        """To and Cc keep their roles, the envelope-only recipient is a hidden Bcc, the Bcc
        header's stranger receives nothing, and the message arrives as sent."""
        raw = _message()
        envelope = ["a@x.example", "c@x.example", "hidden@x.example"]
        await in_thread(_sendmail, self.relay.port, "app@example.org", envelope, raw)
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.method, "mime")
        self.assertEqual(Counter(delivery.recipients), Counter(envelope))
        self.assertEqual(delivery.bcc, ("hidden@x.example",))
        for address in envelope:
            copy = delivery.copy_for(address)
            assert copy is not None
            self.assertNotIn(b"hidden@x.example", copy)
            self.assertNotIn(b"not-in-envelope", copy)
        assert delivery.mime is not None
        head, _, body = delivery.mime.partition(b"\r\n\r\n")
        self.assertEqual(body, raw.partition(b"\r\n\r\n")[2])
        self.assertIn(f"From: Billing App <{MAILBOX}>".encode(), head)
        self.assertIn(b"Reply-To: Billing App <app@example.org>", head)
        for field in (b"In-Reply-To:", b"References:", b"List-Unsubscribe:", b"Message-ID:"):
            self.assertIn(field, head)
        self.assertEqual(self.fake.violations, [])

    async def test_unqualified_root_is_delivered(self) -> None:
        """Cron's C{MAIL FROM:<root>} with C{From: root}: 250, and Graph gets a valid
        Reply-To (root at the sending mailbox's domain) instead of refusing the message."""
        # The parser notes "From: root" as malformed, and delivery logs that note under
        # the key "warning", which trial's log observer takes for a Python warning (and
        # fails on); this test reads the wire, so delivery's log goes to a list.
        events: list[LogEvent] = []
        self.patch(delivery_module, "log", Logger(observer=cast(ILogObserver, events.append)))

        def send() -> dict[str, object]:
            body = b"From: root\r\nTo: a@x.example\r\nSubject: Cron <root@host>\r\n\r\nok\r\n"
            with smtplib.SMTP("127.0.0.1", self.relay.port, timeout=TIMEOUT) as client:
                client.ehlo()
                code, _ = client.docmd("MAIL", "FROM:<root>")
                answers: dict[str, object] = {"mail": code}
                answers["rcpt"] = client.docmd("RCPT", "TO:<a@x.example>")[0]
                answers["data"] = client.data(body)[0]
            return answers

        answers = await in_thread(send)
        self.assertEqual(answers, {"mail": 250, "rcpt": 250, "data": 250})
        (delivery,) = self.fake.deliveries
        assert delivery.mime is not None
        parsed = parse_mime(delivery.mime)
        self.assertEqual(mime_addresses(parsed, "reply-to"), ("root@contoso.example",))
        self.assertEqual(mime_addresses(parsed, "from"), (MAILBOX,))
        self.assertEqual(delivery.recipients, ("a@x.example",))
        self.assertEqual(self.fake.violations, [])
        sent = [e for e in events if e.get("log_format") == "message delivered"]
        self.assertEqual([e["sender"] for e in sent], ["root@contoso.example"])

    async def test_large_attachment(self) -> None:
        """A 3.5 MB attachment travels through an upload session and arrives intact."""
        data = bytes(range(256)) * (3_500_000 // 256)
        await in_thread(
            _sendmail, self.relay.port, "app@example.org", ["a@x.example"], _message(data)
        )
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.method, "draft")
        self.assertEqual(dict(delivery.attachments)["invoice.pdf"], data)
        self.assertEqual(len(self.fake.routes("upload")), 1)
        self.assertEqual(self.fake.violations, [])

    async def test_rejection_is_a_bounce_with_graph_code(self) -> None:
        """Graph's 400 reaches the SMTP client as 550 with Graph's error code."""
        self.fake.script(
            "sendMail", Fault(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
        )
        code, text = await in_thread(_failure, self.relay.port, _message())
        self.assertEqual(code, 550)
        self.assertIn(b"5.1.1 Graph ErrorInvalidRecipients", text)

    async def test_outage_is_451(self) -> None:
        """Graph unavailable through every retry: the SMTP client is told to try later."""
        self.fake.script("sendMail", *[Fault(503)] * 4)
        code, _ = await in_thread(_failure, self.relay.port, _message())
        self.assertEqual(code, 451)
        self.assertEqual(len(self.fake.routes("sendMail")), 4)
