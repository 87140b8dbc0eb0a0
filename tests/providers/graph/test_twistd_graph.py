"""End to end through the real process: `twistd -n smtpproxy` sending to the fake Graph.

One test per kind of credential, and one through a CONNECT proxy with TLS
to the fake inside it.  The fake runs in this process on loopback; the
relay finds it through GRAPH_AUTHORITY_HOST and GRAPH_ENDPOINT, and trusts
its certificate through SSL_CERT_FILE, as an operator behind a
TLS-inspecting proxy would point it at their CA.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from tests.fakegraph import FakeGraph, client_certificate, server_certificate
from tests.providers.graph.connectproxy import ConnectProxy
from tests.support import TIMEOUT, in_thread, message
from tests.test_twistd import Relay, json_lines
from tests.web.test_ops import fetch

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
FEDERATED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWFpbDpyZWxheSJ9.c2ln"
# Whatever the machine running the tests has set for these is not the test's.
NEUTRAL = {
    name: ""
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_AUTHORITY_HOST",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
    )
}


class TwistdGraphTests(TestCase):
    timeout = 60

    def fake(self, *, tls: bool = False, **kwargs: Any) -> FakeGraph:
        fake = FakeGraph(reactor, **kwargs)
        port = fake.listen_tls(reactor) if tls else fake.listen(reactor)
        self.addCleanup(port.stopListening)
        return fake

    def write(self, data: bytes) -> str:
        # Absolute: the relay runs in a directory of its own.
        path: str = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def send_through(self, fake: FakeGraph, **settings: str) -> list[dict[str, Any]]:
        """Start the relay with C{settings}, send one message, stop it; its log events."""
        env = {
            **NEUTRAL,
            "GRAPH_SENDER": MAILBOX,
            "GRAPH_AUTHORITY_HOST": fake.endpoint,
            "GRAPH_ENDPOINT": fake.endpoint,
            "SSL_CERT_FILE": self.write(server_certificate()[0]),
            **settings,
        }
        relay = Relay(self, (), **env)

        def scenario() -> tuple[bytes, int]:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                client.sendmail(
                    "app@example.org",
                    ["a@x.example"],
                    message("Invoice 7", "Numbers.\r\n", To="a@x.example"),
                )
            _, err = relay.stop()
            return err, relay.process.returncode

        err, code = await in_thread(scenario)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len(fake.deliveries), 1, err.decode())
        self.assertEqual(fake.violations, [])
        return json_lines(err)

    def credential(self, events: list[dict[str, Any]]) -> str:
        (line,) = [e for e in events if e.get("msg") == "Graph credential"]
        kind: str = line["kind"]
        return kind

    async def test_client_secret_through_proxy(self) -> None:
        """HTTPS_PROXY (lower case here): every request to Entra and Graph goes through
        the proxy's CONNECT tunnel with the credentials from the URL, TLS inside."""
        fake = self.fake(tls=True)
        proxy = ConnectProxy(("relay", "proxy-pw"))
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://relay:proxy-pw@127.0.0.1:{port.getHost().port}"
        events = await self.send_through(
            fake,
            GRAPH_TENANT_ID=fake.tenant,
            GRAPH_CLIENT_ID=fake.client_id,
            GRAPH_CLIENT_SECRET=fake.client_secret or "",
            https_proxy=url,
            HTTPS_PROXY=url,
        )
        self.assertEqual(self.credential(events), "client secret")
        self.assertTrue(proxy.tunnels)
        self.assertEqual({t.status for t in proxy.tunnels}, {200})
        self.assertNotIn("proxy-pw", repr(events))
        (proxied,) = [e for e in events if e.get("msg") == "Graph requests go through the proxy"]
        self.assertEqual(proxied["proxy"], f"127.0.0.1:{port.getHost().port}")

    async def test_client_certificate(self) -> None:
        """GRAPH_CLIENT_CERTIFICATE_FILE with an encrypted key: the fake verifies the
        signed assertion; start-up names the certificate's thumbprint."""
        pem, cert = client_certificate(password=b"pw for key")
        fake = self.fake(tls=True, certificate=cert, client_secret=None)
        events = await self.send_through(
            fake,
            GRAPH_TENANT_ID=fake.tenant,
            GRAPH_CLIENT_ID=fake.client_id,
            GRAPH_CLIENT_CERTIFICATE_FILE=self.write(pem),
            GRAPH_CLIENT_CERTIFICATE_PASSWORD="pw for key",
        )
        self.assertEqual(self.credential(events), "client certificate")
        self.assertEqual(len(fake.assertions), 1)
        self.assertNotIn("pw for key", repr(events))

    async def test_workload_identity(self) -> None:
        """The AKS webhook's variables alone (AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID,
        AZURE_TENANT_ID) with GRAPH_SENDER: the token file is exchanged for a token."""
        fake = self.fake(federated_token=FEDERATED, client_secret=None)
        events = await self.send_through(
            fake,
            AZURE_FEDERATED_TOKEN_FILE=self.write(FEDERATED.encode()),
            AZURE_CLIENT_ID=fake.client_id,
            AZURE_TENANT_ID=fake.tenant,
        )
        self.assertEqual(self.credential(events), "workload identity federation")
        self.assertNotIn(FEDERATED, repr(events))

    async def test_managed_identity(self) -> None:
        """GRAPH_MANAGED_IDENTITY=true with a user-assigned identity: the token comes from
        the metadata endpoint (Metadata: true), none from Entra's token endpoint."""
        fake = self.fake(client_secret=None, managed_client_id="mi-client")
        events = await self.send_through(
            fake,
            GRAPH_MANAGED_IDENTITY="true",
            GRAPH_MANAGED_IDENTITY_CLIENT_ID="mi-client",
            GRAPH_MANAGED_IDENTITY_ENDPOINT=f"{fake.endpoint}/metadata/identity/oauth2/token",
        )
        self.assertEqual(self.credential(events), "managed identity")
        self.assertEqual(len(fake.routes("managedToken")), 1)
        self.assertEqual(fake.routes("token"), [])


class TwistdGraphMetricsTests(TestCase):
    timeout = 60

    async def test_requests_counted_on_metrics(self) -> None:
        """At LOG_LEVEL=warn (no event per request), /metrics still counts Graph's answers.

        The provider counts requests by status itself; the process wires that
        counter to /metrics: one token request (200) and one sendMail (202).
        """
        fake = FakeGraph(reactor)
        port = fake.listen(reactor)
        self.addCleanup(port.stopListening)
        relay = Relay(
            self,
            (),
            **NEUTRAL,
            LOG_LEVEL="warn",
            GRAPH_TENANT_ID=fake.tenant,
            GRAPH_CLIENT_ID=fake.client_id,
            GRAPH_CLIENT_SECRET=fake.client_secret or "",
            GRAPH_SENDER=MAILBOX,
            GRAPH_AUTHORITY_HOST=fake.endpoint,
            GRAPH_ENDPOINT=fake.endpoint,
        )

        def scenario() -> tuple[int, bytes]:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                client.sendmail(
                    "app@example.org",
                    ["a@x.example"],
                    message("Invoice 8", "Numbers.\r\n", To="a@x.example"),
                )
            return fetch(relay.http_port, "/metrics")

        code, text = await in_thread(scenario)
        self.assertEqual(code, 200)
        counted = {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples
            if sample.name == "smtpproxy_graph_requests_total"
        }
        self.assertEqual(counted, {"200": 1.0, "202": 1.0})
        self.assertEqual(len(fake.deliveries), 1)
