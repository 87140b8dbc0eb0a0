"""End to end: curl and treq -> the real twistd -> the Graph provider -> the fake Graph.

The relay runs as its own process, configured only by environment
variables, with and without a SQLite queue; the fake Graph listens in this
process.  Raw submissions must reach Graph exactly as the same bytes sent
over SMTP do (and unchanged where Graph forces no change); JSON
submissions must arrive as the request described them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import smtplib
import subprocess
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.fakegraph import Delivery, FakeGraph, mime_addresses, parse_mime
from tests.support import TIMEOUT, async_test, in_thread
from tests.test_twistd import Relay

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
SECRET = "e2e-" + "k" * 40
CURL = shutil.which("curl")

RAW = (
    b"From: Relay <relay@contoso.example>\r\n"
    b"To: Alice <alice@fabrikam.example>\r\n"
    b"Subject: Raw over HTTP\r\n"
    b"Message-ID: <raw-1@contoso.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b"Line two, exactly as sent.\r\n"
)


class ApiRelayTests(TestCase):
    def start(self, queue: bool = False) -> tuple[FakeGraph, Relay]:
        fake = FakeGraph(reactor, mailboxes=(MAILBOX,))
        port = fake.listen(reactor)
        self.addCleanup(port.stopListening)
        settings = {
            "GRAPH_TENANT_ID": fake.tenant,
            "GRAPH_CLIENT_ID": fake.client_id,
            "GRAPH_CLIENT_SECRET": fake.client_secret or "",
            "GRAPH_SENDER": MAILBOX,
            "GRAPH_AUTHORITY_HOST": fake.endpoint,
            "GRAPH_ENDPOINT": fake.endpoint,
            "HTTP_API_KEYS": f"e2e:{SECRET}",
        }
        if queue:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            settings["QUEUE_URL"] = f"sqlite:///{directory}/queue.db"
        relay = Relay(self, (), **settings)
        return fake, relay

    async def started(self, relay: Relay) -> None:
        await in_thread(relay.wait_listening)

    async def deliveries(self, fake: FakeGraph, count: int) -> list[Delivery]:
        for _ in range(300):
            if len(fake.deliveries) >= count:
                return fake.deliveries
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{count} deliveries expected, Graph got {len(fake.deliveries)}")

    async def treq_json(self, relay: Relay, document: dict[str, Any]) -> tuple[int, Any]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.post(
            f"http://127.0.0.1:{relay.http_port}/v1/messages",
            data=json.dumps(document).encode(),
            headers=Headers(
                {
                    b"authorization": [f"Bearer {SECRET}".encode()],
                    b"content-type": [b"application/json"],
                }
            ),
        )
        return response.code, json.loads(await response.content())

    def curl_raw(self, relay: Relay, data: bytes) -> tuple[int, Any]:
        """POST message/rfc822 with curl; blocking (run it in a thread)."""
        assert CURL is not None
        url = (
            f"http://127.0.0.1:{relay.http_port}/v1/messages/raw"
            "?from=relay@contoso.example&to=alice@fabrikam.example"
        )
        result = subprocess.run(
            [
                CURL,
                "-sS",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                url,
                "-H",
                f"Authorization: Bearer {SECRET}",
                "-H",
                "Content-Type: message/rfc822",
                "--data-binary",
                "@-",
            ],
            input=data,
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), json.loads(body)

    def smtp_raw(self, relay: Relay, data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
            client.sendmail("relay@contoso.example", ["alice@fabrikam.example"], data)

    async def check_raw(self, queue: bool) -> None:
        fake, relay = self.start(queue)
        await self.started(relay)
        code, body = await in_thread(self.curl_raw, relay, RAW)
        self.assertEqual((code, body["status"]), (202, "queued") if queue else (200, "delivered"))
        await in_thread(self.smtp_raw, relay, RAW)
        by_http, by_smtp = await self.deliveries(fake, 2)
        self.assertEqual(by_http.mime, RAW)
        self.assertEqual(by_http.mime, by_smtp.mime)
        self.assertEqual(by_http.to, ("alice@fabrikam.example",))

    async def check_json(self, queue: bool) -> None:
        fake, relay = self.start(queue)
        await self.started(relay)
        code, body = await self.treq_json(
            relay,
            {
                "from": {"address": MAILBOX, "name": "Billing"},
                "to": ["alice@fabrikam.example"],
                "bcc": ["audit@fabrikam.example"],
                "subject": "Invoice 1008 \u2013 paid",
                "text": "Thank you.\n",
                "html": "<p>Thank you.</p>",
                "headers": {"X-Invoice": "1008"},
                "attachments": [
                    {
                        "filename": "invoice.pdf",
                        "content_type": "application/pdf",
                        "content": base64.b64encode(b"%PDF-1.4 fake").decode(),
                    }
                ],
            },
        )
        self.assertEqual((code, body["status"]), (202, "queued") if queue else (200, "delivered"))
        [delivery] = await self.deliveries(fake, 1)
        self.assertEqual(delivery.to, ("alice@fabrikam.example",))
        self.assertEqual(delivery.bcc, ("audit@fabrikam.example",))
        assert delivery.mime is not None
        sent = parse_mime(delivery.mime)
        self.assertEqual(sent["Subject"], "Invoice 1008 \u2013 paid")
        self.assertEqual(sent["X-Invoice"], "1008")
        self.assertEqual(mime_addresses(sent, "from"), (MAILBOX,))
        self.assertEqual(sent["Message-ID"], f"<{body['request_id']}@relay.test>")
        text = sent.get_body(("plain",))
        assert text is not None
        # On the wire every line ends in CRLF (policy SMTP); the text is the same.
        self.assertEqual(text.get_content().replace("\r\n", "\n"), "Thank you.\n")
        [attachment] = list(sent.iter_attachments())
        self.assertEqual(
            (attachment.get_filename(), attachment.get_content()), ("invoice.pdf", b"%PDF-1.4 fake")
        )

    @async_test
    async def test_raw_direct_byte_exact(self) -> None:
        """curl posts message/rfc822; the relay answers 200 delivered once Graph accepted,
        and Graph got exactly the bytes sent, the same as for the bytes sent over SMTP."""
        if CURL is None:
            self.skipTest("curl is not installed")
        await self.check_raw(queue=False)

    @async_test
    async def test_raw_queued_byte_exact(self) -> None:
        """With QUEUE_URL=sqlite: 202 queued, and the worker delivers the exact bytes."""
        if CURL is None:
            self.skipTest("curl is not installed")
        await self.check_raw(queue=True)

    @async_test
    async def test_json_direct_as_built(self) -> None:
        """treq posts JSON; Graph receives the built message: subject, display name, custom
        header, text body, attachment, Bcc only in the envelope."""
        await self.check_json(queue=False)

    @async_test
    async def test_json_queued_as_built(self) -> None:
        """The same JSON through the SQLite queue arrives the same way, after 202."""
        await self.check_json(queue=True)
