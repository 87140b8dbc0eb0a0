"""The provider's HTTP client over twisted.web's Agent: what it builds once, what it refuses."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, PartialDownloadError, ResponseDone
from twisted.web.http import PotentialDataLoss

from smtpproxy.providers.graph.agentclient import (
    MAX_BODY,
    MAX_ENDPOINTS,
    AgentClient,
    BodyReader,
    BytesProducer,
    CachedEndpoints,
    ResponseTooLargeError,
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


class _Transport:
    """The body's transport as far as the reader uses it: it can be told to stop."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def _reader(limit: int = MAX_BODY) -> tuple[BodyReader, _Transport]:
    reader = BodyReader(200, b"OK", limit)
    transport = _Transport()
    reader.makeConnection(transport)
    return reader, transport


class BodyReaderTests(SynchronousTestCase):
    def test_whole_body(self) -> None:
        """The pieces, joined, once the response is done; the connection is left alone."""
        reader, transport = _reader()
        reader.dataReceived(b'{"id":')
        reader.dataReceived(b'"x"}')
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), b'{"id":"x"}')
        self.assertFalse(transport.stopped)

    def test_cut_short(self) -> None:
        """A body that may be incomplete fails as readBody's would (PartialDownloadError)."""
        reader, _ = _reader()
        reader.dataReceived(b"par")
        reader.connectionLost(Failure(PotentialDataLoss()))
        failure = self.failureResultOf(reader.done, PartialDownloadError)
        self.assertEqual(failure.value.response, b"par")

    def test_other_reasons_passed_on(self) -> None:
        """A connection lost mid-body fails with that reason."""
        reader, _ = _reader()
        reader.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(reader.done, ConnectionLost)

    def test_bounded(self) -> None:
        """Past the limit nothing more is kept, the read fails and the connection is dropped."""
        reader, transport = _reader(limit=8)
        reader.dataReceived(b"12345")
        reader.dataReceived(b"6789")
        self.failureResultOf(reader.done, ResponseTooLargeError)
        self.assertTrue(transport.stopped)
        reader.dataReceived(b"more")
        reader.connectionLost(Failure(ResponseDone()))

    def test_cancel_drops_the_connection(self) -> None:
        """Cancelling the read (the request timed out) stops the half-read response."""
        reader, transport = _reader()
        reader.done.cancel()
        self.failureResultOf(reader.done, CancelledError)
        self.assertTrue(transport.stopped)
        reader.connectionLost(Failure(ResponseDone()))
