"""A TLS handshake to Graph that never completes: the request cannot have reached Graph.

A real loopback TCP server accepts the connection, reads the ClientHello
and never answers it (a middlebox that swallows TLS, a half-dead front
end).  The request's bytes never left the relay: they wait for the
handshake.  So the timeout must count as "no connection" (the request
had no effect, retrying cannot send twice), not as "no answer" (which
keeps the message's sending budget and marks it handed over).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.graph.retry import Tuning
from tests.fakegraph import FakeGraph, make_email

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"


class _Silent(Protocol):
    """Reads what the client sends and never answers (or hangs up, if C{hang_up})."""

    hang_up = False

    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.hang_up:
            transport: Any = self.transport
            transport.loseConnection()


class StalledHandshakeTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake = FakeGraph(reactor)
        port = self.fake.listen(reactor)
        self.addCleanup(port.stopListening)
        self.received: list[bytes] = []
        self.connections: list[_Silent] = []

        def build() -> _Silent:
            protocol = _Silent(self.received)
            self.connections.append(protocol)
            return protocol

        silent = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        self.silent = f"https://127.0.0.1:{silent.getHost().port}"
        # Tokens from the fake, for the silent server's scope.
        self.authority = self.fake.endpoint
        self.fake.endpoint = self.silent

    def tearDown(self) -> None:
        for connection in self.connections:
            transport: Any = connection.transport
            if transport is not None:
                transport.abortConnection()

    async def send_twice(self, expected: str, status: str) -> None:
        """Two messages with a budget of one recipient a day: both fail with C{expected}
        (the second is not held back for the budget, so the first gave its charge back)."""
        config = Config.build(
            graph_tenant_id=self.fake.tenant,
            graph_client_id=self.fake.client_id,
            graph_client_secret=self.fake.client_secret,
            graph_sender=(MAILBOX,),
            graph_authority_host=self.authority,
            graph_endpoint=self.silent,
            graph_send_timeout=10.0,
            graph_mailbox_recipients_per_day=1,
            graph_mailbox_messages_per_minute=0,
        )
        tuning = Tuning(backoff_base=0.02, max_retries=1, request_timeout=0.3)
        provider = GraphProvider(config, reactor, tuning=tuning)
        self.addCleanup(provider.close)
        for n in (1, 2):
            to = (f"r{n}@x.example",)
            try:
                await provider.send(make_email(to, to=to))
            except TransientDeliveryError as e:
                self.assertEqual(reply_for_failure(e).code, 451)
                self.assertIn(expected, e.reason)
                self.assertEqual(e.status, status)
            else:
                self.fail("a send to a server that never answers TLS succeeded")
        # The relay did reach the server and started TLS (a handshake record, 0x16).
        self.assertGreaterEqual(len(self.connections), 2)
        self.assertTrue(self.received and self.received[0][:1] == b"\x16")
        self.assertEqual(len(self.fake.routes("token")), 1)

    async def test_stalled_handshake_is_not_connected(self) -> None:
        """The token comes from the fake (plain HTTP); Graph is the silent server.  Each
        attempt times out in the handshake: the 451 says no connection was made, and the
        message's budget charge is given back."""
        await self.send_twice("no connection to Graph in time", "4.4.1")

    async def test_handshake_cut_short_is_not_connected(self) -> None:
        """A server that hangs up on the ClientHello: the connection failed before the
        request could leave, so it is not "possibly sent" either."""
        _Silent.hang_up = True
        self.addCleanup(setattr, _Silent, "hang_up", False)
        await self.send_twice("connection to Graph failed (HandshakeFailedError)", "4.4.2")
