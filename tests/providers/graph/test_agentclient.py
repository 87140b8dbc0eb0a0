"""The provider's HTTP client over twisted.web's Agent: what it builds once, what it refuses."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from smtpproxy.providers.graph.agentclient import (
    MAX_ENDPOINTS,
    AgentClient,
    BytesProducer,
    CachedEndpoints,
    request_uri,
)
from smtpproxy.providers.graph.tunnel import GraphEndpoints


class CachedEndpointsTests(SynchronousTestCase):
    def test_one_endpoint_per_origin(self) -> None:
        """Requests to one scheme, host and port share an endpoint (no IDNA, no new TLS context
        per request); another port, host or scheme gets its own."""
        factory = CachedEndpoints(GraphEndpoints(Clock(), BrowserLikePolicyForHTTPS()))
        first = factory.endpointForURI(URI.fromBytes(b"https://graph.test/v1.0/users/a/sendMail"))
        again = factory.endpointForURI(URI.fromBytes(b"https://graph.test/v1.0/other"))
        self.assertIs(first, again)
        others = {
            id(factory.endpointForURI(URI.fromBytes(url)))
            for url in (b"http://graph.test/x", b"https://graph.test:8443/x", b"https://up.test/x")
        }
        self.assertEqual(len(others | {id(first)}), 4)

    def test_bounded(self) -> None:
        """At most MAX_ENDPOINTS are kept: many upload hosts cannot grow it without limit."""
        factory = CachedEndpoints(GraphEndpoints(Clock(), BrowserLikePolicyForHTTPS()))
        for n in range(MAX_ENDPOINTS * 3):
            factory.endpointForURI(URI.fromBytes(f"https://h{n}.test/".encode()))
            self.assertLessEqual(len(factory._endpoints), MAX_ENDPOINTS)

    def test_other_schemes_refused(self) -> None:
        """Only http and https are connected to."""
        with self.assertRaises(ValueError):
            CachedEndpoints(GraphEndpoints(Clock(), BrowserLikePolicyForHTTPS())).endpointForURI(
                URI.fromBytes(b"ftp://graph.test/")
            )


class RequestTests(SynchronousTestCase):
    def test_ascii_url_as_is(self) -> None:
        """An ASCII URL is sent exactly as built; a non-ASCII one is made a URI first."""
        url = "https://graph.test/v1.0/users/a%40b/messages/AAMk%3D/send"
        self.assertEqual(request_uri(url), url.encode())
        self.assertEqual(request_uri("https://bücher.test/ä"), b"https://xn--bcher-kva.test/%C3%A4")

    def test_redirects_never_followed(self) -> None:
        """Asking to follow redirects is an error: the bearer token must not go elsewhere."""
        client = AgentClient(object())  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            client.request("GET", "https://graph.test/", allow_redirects=True)

    def test_body_written_whole(self) -> None:
        """The body producer declares its length and writes the body in one call."""
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        producer = BytesProducer(b"payload")
        self.assertEqual(producer.length, 7)
        self.successResultOf(producer.startProducing(Consumer()))  # type: ignore[arg-type]
        self.assertEqual(written, [b"payload"])
