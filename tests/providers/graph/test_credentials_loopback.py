"""Each kind of credential, the proxy, Sent Items and a full mailbox, over real HTTP.

The provider runs as in production (treq, the connection pool, the Agent's
endpoint factory) against the fake Graph on loopback; the fake checks the
client assertions, the federated token and the metadata request as Entra
and the identity endpoints would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.config import Config
from smtpproxy.errors import DeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.graph.retry import Tuning
from tests.fakegraph import FakeGraph, client_certificate, make_email, server_certificate
from tests.providers.graph.connectproxy import ConnectProxy, Tinyproxy
from tests.support import in_thread

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
FAST = Tuning(backoff_base=0.02, request_timeout=5.0, max_retries=1)
FEDERATED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWFpbDpyZWxheSJ9.c2ln"


def _email() -> Any:
    return make_email(("a@x.example",), to=("a@x.example",))


@contextmanager
def _captured() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def _trust() -> Any:
    cert, _ = server_certificate()
    return trustRootFromCertificates([Certificate.loadPEM(cert)])


class Base(TestCase):
    timeout = 30

    def fake(self, *, tls: bool = False, **kwargs: Any) -> FakeGraph:
        fake = FakeGraph(reactor, **kwargs)
        port = fake.listen_tls(reactor) if tls else fake.listen(reactor)
        self.addCleanup(port.stopListening)
        return fake

    def provider(self, fake: FakeGraph, **settings: Any) -> GraphProvider:
        values: dict[str, Any] = {
            "graph_tenant_id": fake.tenant,
            "graph_client_id": fake.client_id,
            "graph_sender": (MAILBOX,),
            "graph_authority_host": fake.endpoint,
            "graph_endpoint": fake.endpoint,
            "graph_send_timeout": 10.0,
        }
        values.update(settings)
        provider = GraphProvider(Config.build(**values), reactor, tuning=FAST, trust_root=_trust())
        self.addCleanup(provider.close)
        return provider

    def write(self, data: bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def refused(self, provider: GraphProvider) -> tuple[int, str, str]:
        try:
            await provider.send(_email())
        except DeliveryError as e:
            reply = reply_for_failure(e)
            return reply.code, reply.status, reply.text
        raise AssertionError("the message was accepted")


class CertificateTests(Base):
    async def test_signed_assertion_per_token_request(self) -> None:
        """A certificate in a PEM file gets a token with a PS256 assertion the fake verifies
        against the registered certificate; a second token request carries a new jti."""
        pem, cert = client_certificate()
        fake = self.fake(certificate=cert, client_secret=None)
        provider = self.provider(fake, graph_client_certificate_file=self.write(pem))
        await provider.send(_email())
        fake.expire_tokens()
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 2)
        self.assertEqual(len(fake.assertions), 2)
        self.assertNotEqual(fake.assertions[0]["jti"], fake.assertions[1]["jti"])
        self.assertEqual(fake.violations, [])

    async def test_encrypted_key(self) -> None:
        """A key encrypted with GRAPH_CLIENT_CERTIFICATE_PASSWORD is used with it."""
        pem, cert = client_certificate(password=b"pem pass")
        fake = self.fake(certificate=cert, client_secret=None)
        provider = self.provider(
            fake,
            graph_client_certificate_file=self.write(pem),
            graph_client_certificate_password="pem pass",
        )
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 1)

    async def test_unregistered_certificate(self) -> None:
        """A certificate Entra does not know: 451 4.3.5 (our configuration), with the
        AADSTS code and a hint in the log, and no secret or assertion logged."""
        pem, _ = client_certificate("other")
        _, registered = client_certificate()
        fake = self.fake(certificate=registered, client_secret=None)
        provider = self.provider(fake, graph_client_certificate_file=self.write(pem))
        with _captured() as events:
            code, status, text = await self.refused(provider)
        self.assertEqual((code, status), (451, "4.3.5"))
        self.assertIn("AADSTS700027", text)
        (failed,) = [e for e in events if e.get("log_format") == "Graph request failed"]
        self.assertIn("uploaded to the app registration", failed["hint"])
        self.assertNotIn("eyJ", repr(events))
        self.assertEqual(fake.deliveries, [])

    async def test_renewed_file_is_used(self) -> None:
        """The file is read again per token: a certificate replaced in place is used
        without a restart."""
        old_pem, old = client_certificate()
        new_pem, new = client_certificate("renewed")
        fake = self.fake(certificate=old, client_secret=None)
        path = self.write(old_pem)
        provider = self.provider(fake, graph_client_certificate_file=path)
        await provider.send(_email())
        with open(path, "wb") as f:
            f.write(new_pem)
        fake.certificate = Certificate.loadPEM(new).original.to_cryptography()
        fake.expire_tokens()
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 2)
        self.assertEqual(fake.violations, [])


class FederatedTests(Base):
    async def test_token_file_reread(self) -> None:
        """The federated token is read from its file for every token request, so the
        kubelet's rotated token is the one sent; AZURE_* fill tenant and client id."""
        fake = self.fake(federated_token=FEDERATED, client_secret=None)
        path = self.write(FEDERATED.encode() + b"\n")
        provider = self.provider(
            fake,
            graph_tenant_id="",
            graph_client_id="",
            azure_tenant_id=fake.tenant,
            azure_client_id=fake.client_id,
            azure_federated_token_file=path,
        )
        await provider.send(_email())
        rotated = FEDERATED + "x"
        with open(path, "w") as f:
            f.write(rotated)
        fake.federated_token = rotated
        fake.expire_tokens()
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 2)
        self.assertEqual(fake.violations, [])

    async def test_missing_file_is_451(self) -> None:
        """A token file that is gone: 451 4.3.5 and an error line, not a traceback."""
        fake = self.fake(federated_token=FEDERATED, client_secret=None)
        provider = self.provider(fake, azure_federated_token_file=self.mktemp())
        with _captured() as events:
            code, status, _ = await self.refused(provider)
        self.assertEqual((code, status), (451, "4.3.5"))
        self.assertTrue(
            [e for e in events if e.get("log_format") == "cannot read the Graph credential"]
        )
        self.assertEqual(fake.routes("token"), [])


class ManagedIdentityTests(Base):
    async def test_instance_metadata(self) -> None:
        """GRAPH_MANAGED_IDENTITY: a GET to the metadata endpoint with Metadata: true and
        Graph as the resource; the token it returns (expires_in as text) is used."""
        fake = self.fake(client_secret=None)
        provider = self.provider(
            fake,
            graph_tenant_id="",
            graph_client_id="",
            graph_managed_identity=True,
            graph_managed_identity_endpoint=f"{fake.endpoint}/metadata/identity/oauth2/token",
        )
        await provider.send(_email())
        await provider.send(_email())
        self.assertEqual(len(fake.routes("managedToken")), 1)
        self.assertEqual(fake.routes("token"), [])
        self.assertEqual(len(fake.deliveries), 2)
        self.assertEqual(fake.violations, [])

    async def test_user_assigned_unknown(self) -> None:
        """A user-assigned identity the host does not have: 451 4.3.5, not retried."""
        fake = self.fake(client_secret=None, managed_client_id="the-right-one")
        provider = self.provider(
            fake,
            graph_managed_identity=True,
            graph_managed_identity_client_id="a-wrong-one",
            graph_managed_identity_endpoint=f"{fake.endpoint}/metadata/identity/oauth2/token",
        )
        code, status, _ = await self.refused(provider)
        self.assertEqual((code, status), (451, "4.3.5"))
        self.assertEqual(len(fake.routes("managedToken")), 1)

    async def test_app_service(self) -> None:
        """IDENTITY_ENDPOINT and IDENTITY_HEADER (App Service) win over the metadata
        endpoint; the answer has only expires_on, which is read too."""
        fake = self.fake(client_secret=None, identity_header="app-service-secret")
        provider = self.provider(
            fake,
            graph_managed_identity=True,
            identity_endpoint=f"{fake.endpoint}/msi/token",
            identity_header="app-service-secret",
        )
        await provider.send(_email())
        self.assertEqual(len(fake.routes("appServiceToken")), 1)
        self.assertEqual(len(fake.deliveries), 1)
        self.assertEqual(fake.violations, [])


class SentItemsAndQuotaTests(Base):
    async def test_save_to_sent_items_false(self) -> None:
        """GRAPH_SAVE_TO_SENT_ITEMS=false: a JSON sendMail says saveToSentItems false; MIME
        cannot say it (Graph has no such switch), so that copy is saved."""
        fake = self.fake()
        json_mode = self.provider(
            fake,
            graph_client_secret=fake.client_secret,
            graph_save_to_sent_items=False,
            graph_send_mode="json",
        )
        await json_mode.send(_email())
        mime_mode = self.provider(
            fake, graph_client_secret=fake.client_secret, graph_save_to_sent_items=False
        )
        await mime_mode.send(_email())
        default = self.provider(
            fake, graph_client_secret=fake.client_secret, graph_send_mode="json"
        )
        await default.send(_email())
        self.assertEqual(
            [(d.method, d.saved_to_sent_items) for d in fake.deliveries],
            [("json", False), ("mime", True), ("json", True)],
        )
        self.assertEqual(fake.violations, [])

    async def test_full_mailbox(self) -> None:
        """413 ErrorQuotaExceeded: 452 4.2.2 at once (one request, no retry), and an
        error line naming the mailbox."""
        fake = self.fake()
        fake.full_mailboxes.add(MAILBOX)
        provider = self.provider(fake, graph_client_secret=fake.client_secret)
        with _captured() as events:
            code, status, _ = await self.refused(provider)
        self.assertEqual((code, status), (452, "4.2.2"))
        self.assertEqual(len(fake.routes("sendMail")), 1)
        (line,) = [e for e in events if "over its storage quota" in e.get("log_format", "")]
        self.assertEqual((line["mailbox"], line["log_level"].name), (MAILBOX, "error"))


class ProxyTests(Base):
    def proxy(self, credentials: tuple[str, str] | None = None) -> tuple[ConnectProxy, int]:
        proxy = ConnectProxy(credentials)
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return proxy, port.getHost().port

    async def test_tunnel_with_credentials(self) -> None:
        """HTTPS_PROXY with user:password: token and Graph requests go through CONNECT
        tunnels carrying Proxy-Authorization, TLS to the fake inside (the proxy relays
        only ciphertext); the fake sees every request."""
        fake = self.fake(tls=True)
        proxy, port = self.proxy(("relay", "p@ss word"))
        provider = self.provider(
            fake,
            graph_client_secret=fake.client_secret,
            https_proxy=f"http://relay:p%40ss%20word@127.0.0.1:{port}",
        )
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 1)
        self.assertTrue(proxy.tunnels)
        target = fake.endpoint.removeprefix("https://")
        for tunnel in proxy.tunnels:
            self.assertEqual((tunnel.target, tunnel.status), (target, 200))
            self.assertEqual(tunnel.authorization, "Basic cmVsYXk6cEBzcyB3b3Jk")
            self.assertNotIn(b"client-secret-value", bytes(tunnel.client_bytes))
            self.assertNotIn(b"sendMail", bytes(tunnel.client_bytes))
        self.assertEqual(fake.violations, [])

    async def test_wrong_proxy_credentials(self) -> None:
        """A proxy that answers 407: 451 (nothing reached Graph), and the log has the
        status and a hint, never the password."""
        fake = self.fake(tls=True)
        _, port = self.proxy(("relay", "right"))
        provider = self.provider(
            fake,
            graph_client_secret=fake.client_secret,
            https_proxy=f"http://relay:wrong-pw@127.0.0.1:{port}",
        )
        with _captured() as events:
            code, _, _ = await self.refused(provider)
        self.assertEqual(code, 451)
        self.assertEqual(fake.requests, [])
        refusals = [
            e for e in events if e.get("log_format") == "could not open a tunnel through the proxy"
        ]
        self.assertEqual(refusals[0]["status"], 407)
        self.assertIn("HTTPS_PROXY", refusals[0]["hint"])
        self.assertNotIn("wrong-pw", repr(events))

    async def test_no_proxy_bypasses(self) -> None:
        """NO_PROXY naming the host: direct, the proxy sees nothing; loopback is not
        bypassed unless listed (the test above went through the proxy to localhost)."""
        fake = self.fake(tls=True)
        proxy, port = self.proxy()
        provider = self.provider(
            fake,
            graph_client_secret=fake.client_secret,
            https_proxy=f"127.0.0.1:{port}",
            no_proxy="example.com, localhost",
        )
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 1)
        self.assertEqual(proxy.tunnels, [])

    async def test_tinyproxy(self) -> None:
        """Through Debian's tinyproxy with Basic credentials: delivered, and tinyproxy's
        own log shows the CONNECT to the fake."""
        directory = self.mktemp()
        os.makedirs(directory)
        try:
            tiny = await in_thread(Tinyproxy, directory, ("relay", "tiny-secret"))
        except FileNotFoundError:
            raise SkipTest("tinyproxy is not installed (apt-get install tinyproxy)") from None
        self.addCleanup(tiny.stop)
        fake = self.fake(tls=True)
        provider = self.provider(
            fake,
            graph_client_secret=fake.client_secret,
            https_proxy=f"http://relay:tiny-secret@127.0.0.1:{tiny.port}",
        )
        await provider.send(_email())
        self.assertEqual(len(fake.deliveries), 1)
        self.assertEqual(fake.violations, [])
        self.assertIn(fake.endpoint.removeprefix("https://"), tiny.connects())
