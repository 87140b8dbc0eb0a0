"""Large mail through the real `twistd smtpproxy` process to the fake Graph on loopback.

The relay runs as operators run it (its own process, configured by the
environment); the fake Graph runs in the test's reactor and rebuilds what
recipients would get: the MIME draft plus the attachments uploaded to it.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from tests.fakegraph import FakeGraph, parse_mime
from tests.providers.graph.test_mimeparts import CALENDAR, HEADERS, large_message
from tests.support import TIMEOUT, in_thread
from tests.test_twistd import Relay

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    """Send C{data}; the reply to the end of data (250, or the error)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT * 4) as client:
        try:
            client.sendmail("planner@example.org", ["a@x.example"], data)
        except smtplib.SMTPDataError as e:
            error = e.smtp_error
            return e.smtp_code, error if isinstance(error, bytes) else error.encode()
    return 250, b""


class LargeMailThroughTwistdTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.fake = FakeGraph(reactor)
        port = self.fake.listen(reactor)
        self.addCleanup(port.stopListening)
        self.relay = Relay(
            self,
            PROVIDER="graph",
            GRAPH_TENANT_ID=self.fake.tenant,
            GRAPH_CLIENT_ID=self.fake.client_id,
            GRAPH_CLIENT_SECRET=self.fake.client_secret or "",
            GRAPH_SENDER=MAILBOX,
            GRAPH_AUTHORITY_HOST=self.fake.endpoint,
            GRAPH_ENDPOINT=self.fake.endpoint,
        )

    async def started(self) -> None:
        await in_thread(self.relay.wait_listening)

    async def test_20mb_message_keeps_headers_and_parts(self) -> None:
        """A 20 MB message goes as a MIME draft plus uploads; what Graph sends has the original
        Message-ID, References, In-Reply-To, List-Unsubscribe, the text/plain alternative, the
        calendar part and every attachment, byte for byte."""
        await self.started()
        sizes = (5_000_000, 4_000_000, 3_500_000, 2_500_000, 1000)
        raw = large_message(sizes)
        self.assertGreater(len(raw), 20_000_000)
        code, text = await in_thread(_send, self.relay.smtp_port, raw)
        self.assertEqual((code, text), (250, b""))
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.method, "mime-draft")
        self.assertEqual(delivery.recipients, ("a@x.example",))
        assert delivery.mime is not None
        sent = parse_mime(delivery.mime)
        for name, value in HEADERS:
            self.assertEqual(sent[name], value)
        self.assertEqual(sent["Subject"], "Quarterly review")
        plain = sent.get_body(("plain",))
        html = sent.get_body(("html",))
        assert plain is not None and html is not None
        self.assertEqual(plain.get_content().rstrip(), "The plain text version.")
        self.assertIn("The HTML version.", html.get_content())
        (calendar,) = [p for p in sent.walk() if p.get_content_type() == "text/calendar"]
        self.assertEqual(calendar.get_content().splitlines(), CALENDAR.splitlines())
        expected = {f"part-{n}.pdf": bytes([n + 1]) * size for n, size in enumerate(sizes)}
        self.assertEqual({name: data for name, data in delivery.attachments if name}, expected)
        routes = [seen.route for seen in self.fake.requests]
        self.assertEqual(routes.count("createUploadSession"), 3)
        self.assertEqual(routes.count("addAttachment"), 1)
        self.assertEqual(routes.count("sendMail"), 0)
        self.assertEqual(self.fake.violations, [])

    async def test_signed_10mb_message_is_refused(self) -> None:
        """A signed 10 MB message cannot go whole and must not be split: 554 5.3.4, and
        nothing reaches Graph but the token request, if any."""
        await self.started()
        raw = large_message((10_000_000,), signed=True)
        code, text = await in_thread(_send, self.relay.smtp_port, raw)
        self.assertEqual(code, 554)
        self.assertIn(b"5.3.4", text)
        self.assertIn(b"signature", text)
        self.assertEqual(self.fake.deliveries, [])
        self.assertEqual([s.route for s in self.fake.requests if s.route != "token"], [])

    async def test_small_message_is_one_mime_send(self) -> None:
        """A small message is unchanged: one MIME sendMail, headers as sent."""
        await self.started()
        raw = large_message((1000,))
        code, _ = await in_thread(_send, self.relay.smtp_port, raw)
        self.assertEqual(code, 250)
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.method, "mime")
        self.assertEqual([s.route for s in self.fake.requests], ["token", "sendMail"])
        assert delivery.mime is not None
        self.assertEqual(delivery.mime.partition(b"\r\n\r\n")[2], raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(self.fake.violations, [])
