"""The Graph provider over real HTTP on loopback, against the fake Graph.

This is the real path: treq, the persistent connection pool, the reactor's
TCP and timers.  Waits are kept short (tens of milliseconds) by the tuning.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from smtpproxy import tls
from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.graph.retry import Tuning
from tests.fakegraph import FakeGraph, Fault, make_email
from tests.support import certificate

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
FAST = Tuning(backoff_base=0.02, request_timeout=5.0)


class LoopbackTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake = FakeGraph(reactor)
        port = self.fake.listen(reactor)
        self.addCleanup(port.stopListening)

    def provider(
        self,
        *,
        endpoint: str | None = None,
        tuning: Tuning = FAST,
        concurrency: int = 4,
        timeout: float = 10.0,
    ) -> GraphProvider:
        config = Config.build(
            graph_tenant_id=self.fake.tenant,
            graph_client_id=self.fake.client_id,
            graph_client_secret=self.fake.client_secret,
            graph_sender=(MAILBOX,),
            graph_authority_host=endpoint or self.fake.endpoint,
            graph_endpoint=endpoint or self.fake.endpoint,
            graph_send_timeout=timeout,
            graph_max_concurrency=concurrency,
        )
        provider = GraphProvider(config, reactor, tuning=tuning)
        self.addCleanup(provider.close)
        return provider

    async def test_messages_share_one_connection_and_token(self) -> None:
        """Three messages (MIME and JSON) go over one persistent connection with one token."""
        provider = self.provider()
        await provider.send(make_email(("a@x.example",), to=("a@x.example",)))
        await provider.send(make_email(("a@x.example", "h@x.example"), to=("a@x.example",)))
        await provider.send(make_email(("a@x.example",), to=("a@x.example", "boss@x.example")))
        self.assertEqual([d.method for d in self.fake.deliveries], ["mime", "mime", "json"])
        self.assertEqual(len(self.fake.routes("token")), 1)
        self.assertEqual(len({seen.connection for seen in self.fake.requests}), 1)
        self.assertEqual(self.fake.violations, [])

    async def test_large_attachment(self) -> None:
        """A 4.5 MB attachment arrives intact through an upload session over HTTP."""
        data = bytes(range(256)) * (4_500_000 // 256)
        email = make_email(("a@x.example",), to=("a@x.example",), attachments=(("b.bin", data),))
        await self.provider().send(email)
        (delivery,) = self.fake.deliveries
        self.assertEqual(delivery.attachments, [("b.bin", data)])
        self.assertEqual(len(self.fake.routes("upload")), 2)
        self.assertEqual(self.fake.violations, [])

    async def test_dropped_connection(self) -> None:
        """A connection closed without an answer is retried on a new connection."""
        self.fake.script("sendMail", Fault(drop=True))
        await self.provider().send(make_email(("a@x.example",), to=("a@x.example",)))
        sends = self.fake.routes("sendMail")
        self.assertEqual(len(sends), 2)
        self.assertNotEqual(sends[0].connection, sends[1].connection)
        self.assertEqual(len(self.fake.deliveries), 1)

    async def test_slow_answer(self) -> None:
        """An answer slower than the request timeout is abandoned and retried, delivered once."""
        self.fake.script("sendMail", Fault(delay=5.0))
        provider = self.provider(tuning=Tuning(backoff_base=0.02, request_timeout=0.2))
        await provider.send(make_email(("a@x.example",), to=("a@x.example",)))
        self.assertEqual(len(self.fake.routes("sendMail")), 2)
        self.assertEqual(len(self.fake.deliveries), 1)

    async def test_concurrency_cap(self) -> None:
        """Eight messages with a cap of 2 never have more than 2 requests in flight."""
        self.fake.script("sendMail", *[Fault(delay=0.03)] * 8)
        provider = self.provider(concurrency=2)
        email = make_email(("a@x.example",), to=("a@x.example",))
        await gatherResults([provider.send(email) for _ in range(8)])
        self.assertEqual(self.fake.max_in_flight[MAILBOX], 2)
        self.assertEqual(len(self.fake.deliveries), 8)

    async def test_connection_refused(self) -> None:
        """Nobody listening: retried, then a 451 (never a bounce)."""
        closed = reactor.listenTCP(0, Site(self.fake.resource), interface="127.0.0.1")
        endpoint = f"http://127.0.0.1:{closed.getHost().port}"
        await closed.stopListening()
        provider = self.provider(endpoint=endpoint)
        try:
            await provider.send(make_email(("a@x.example",), to=("a@x.example",)))
        except TransientDeliveryError as e:
            self.assertEqual(reply_for_failure(e).code, 451)
            self.assertIn("gave up after 4 attempts", e.reason)
        else:
            self.fail("delivery to a closed port succeeded")

    async def test_tls_is_verified(self) -> None:
        """An https endpoint with an untrusted certificate is refused, not used."""
        cert, key = certificate()
        site = Site(self.fake.resource)
        port = reactor.listenSSL(0, site, tls.server_context(cert, key), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"https://127.0.0.1:{port.getHost().port}"
        provider = self.provider(endpoint=endpoint, tuning=Tuning(backoff_base=0.02, max_retries=1))
        try:
            await provider.send(make_email(("a@x.example",), to=("a@x.example",)))
        except TransientDeliveryError as e:
            self.assertEqual(reply_for_failure(e).code, 451)
        else:
            self.fail("an untrusted certificate was accepted")
        self.assertEqual(self.fake.requests, [])
