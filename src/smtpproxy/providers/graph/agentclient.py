"""The HTTP client the Graph provider uses in production: Twisted's C{Agent}, nothing on top.

treq's C{HTTPClient} is convenient but costs more per request than the rest
of a small message's trip through the relay (see docs/performance.md, "Graph
path CPU"): every request parses its URL with hyperlink and converts it to
a URI (IDNA checks of each label), builds a cookie jar and wraps the agent
in a C{CookieAgent} and a C{ContentDecoderAgent}.  Graph sets no cookies we
want, its replies are small JSON that we do not ask to be compressed, and
our URLs are ASCII already (built by L{GraphUrls} with C{quote}, or handed
to us by Graph for uploads), so none of that is needed.

Twisted's C{Agent} itself, through its standard endpoint factory, builds
a new endpoint for every request, even one that goes out on a pooled
connection: the host goes through IDNA each time and, for HTTPS, a new TLS
context is made (trust roots loaded again).  L{CachedEndpoints} builds the
endpoint once per scheme, host and port and hands the same one out again;
an endpoint is a recipe for connecting and may be used for any number of
connections.

L{AgentClient} keeps the one method of treq's interface the provider calls
(C{request(method, url, headers=, data=, allow_redirects=)}, answering an
object with C{code}, C{headers} and C{content()}), so tests still drive the
provider through treq's C{StubTreq}.  Only public Twisted API is used:
C{IAgent.request}, C{IBodyProducer}, C{IResponse.deliverBody} with an
C{IProtocol}, C{Agent.usingEndpointFactory} with an C{IAgentEndpointFactory},
C{HostnameEndpoint} and C{wrapClientTLS}.

The body is read by L{BodyReader} rather than Twisted's C{readBody}: on
this Twisted, C{readBody} issues a C{DeprecationWarning} for every response
(the body's transport has no C{abortConnection}), which goes through the
warnings machinery each time, and its end-of-body test (C{Failure.check})
walks the class names of the reason; both showed per request in the
profile.  L{BodyReader} also bounds what it keeps (L{MAX_BODY}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    PartialDownloadError,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

#: Endpoints kept at most (a relay talks to Entra ID, Graph and Graph's upload host).
MAX_ENDPOINTS = 16
#: The longest response body kept: Graph's answers are small JSON documents.
MAX_BODY = 16 * 1024 * 1024

#: Set by a caller around L{AgentClient.request} for a request whose arrival
#: matters (Graph's send requests): called once the request's body starts
#: going out, i.e. the connection is made and the request is on the wire.
#: A context variable so that the treq-shaped C{request} keeps its signature
#: (tests drive the provider through treq's C{StubTreq}, which never calls it).
ON_THE_WIRE: ContextVar[Callable[[], None] | None] = ContextVar("on_the_wire", default=None)


class ResponseTooLargeError(Exception):
    """A response body longer than L{MAX_BODY}: the connection is dropped."""


class EndpointFactory(Protocol):
    """What L{CachedEndpoints} wraps: an C{IAgentEndpointFactory}, typed."""

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint to reach C{uri}'s host and port."""


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """One endpoint per scheme, host and port, made on first use (see the module docstring).

    The endpoints themselves come from C{inner} (the provider's
    L{smtpproxy.providers.graph.tunnel.GraphEndpoints}: direct or through
    C{HTTPS_PROXY}, TLS for https); this only remembers them.
    """

    def __init__(self, inner: EndpointFactory) -> None:
        self._inner = inner
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is not None:
            return endpoint
        if uri.scheme not in (b"http", b"https"):
            raise ValueError(f"unsupported scheme {uri.scheme!r}")
        try:
            uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("non-ASCII host in a request URI") from None
        endpoint = self._inner.endpointForURI(uri)
        if len(self._endpoints) >= MAX_ENDPOINTS:
            self._endpoints.clear()
        self._endpoints[key] = endpoint
        return endpoint


def pooled_agent(reactor: Any, pool: HTTPConnectionPool, endpoints: EndpointFactory) -> IAgent:
    """Twisted's Agent over C{pool}, with C{endpoints}' endpoints made once (L{CachedEndpoints})."""
    agent: IAgent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
        reactor, CachedEndpoints(endpoints), pool=pool
    )
    return agent


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory: written in one go."""

    def __init__(self, data: bytes, on_the_wire: Callable[[], None] | None = None) -> None:
        self._data = data
        self.length = len(data)
        self._on_the_wire = on_the_wire

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._on_the_wire is not None:
            self._on_the_wire()
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the whole body was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class BodyReader(StreamProtocol):
    """Collects a response body (at most L{MAX_BODY} bytes) and fires C{done} with it.

    Like C{readBody}: a body cut short without a length to check fails
    with C{PartialDownloadError}, any other end than a complete body with
    its reason.  Cancelling C{done} drops the connection, which cannot
    carry another request with half a response left in it.
    """

    def __init__(self, code: int, phrase: bytes, limit: int = MAX_BODY) -> None:
        self._code = code
        self._phrase = phrase
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._parts = []
            self.done.errback(ResponseTooLargeError(f"response body over {self._limit} bytes"))
            self._stop()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        # isinstance rather than reason.check(): check() compares class names.
        value = reason.value
        if isinstance(value, ResponseDone):
            self.done.callback(b"".join(self._parts))
        elif isinstance(value, PotentialDataLoss):
            body = b"".join(self._parts)
            self.done.errback(PartialDownloadError(self._code, self._phrase, body))
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]


class AgentResponse:
    """The part of treq's response the provider reads: status, headers, body."""

    def __init__(self, response: IResponse) -> None:
        self._response = response
        self.code: int = response.code
        self.headers: Headers = response.headers

    def content(self) -> Deferred[bytes]:
        """The whole body (Graph's replies are small), read by a L{BodyReader}."""
        response = self._response
        reader = BodyReader(response.code, response.phrase)
        response.deliverBody(reader)  # type: ignore[no-untyped-call]
        return reader.done


def request_uri(url: str) -> bytes:
    """C{url} as the bytes C{Agent.request} takes.

    The provider's URLs are ASCII (percent-encoded paths, A-label hosts);
    one that is not is encoded as a URI would be: the host by IDNA, the
    rest percent-encoded, which is the conversion treq does on every call.
    """
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        from hyperlink import URL

        text: str = URL.from_text(url).to_uri().to_text()
        return text.encode("ascii")


class AgentClient:
    """A treq-shaped requester straight over an C{IAgent} (see the module docstring)."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        allow_redirects: bool = False,
    ) -> Deferred[AgentResponse]:
        """Send one request; fire with its response once the headers are in.

        @param allow_redirects: must be False: a redirect would carry the
            bearer token to another host, so redirects are never followed
            (the response is returned as it is, like treq does when told so).
        """
        if allow_redirects:
            raise ValueError("AgentClient never follows redirects")
        raw = Headers()
        for name, value in (headers or {}).items():
            raw.addRawHeader(name.encode("ascii"), value.encode("latin-1"))
        producer = None if data is None else BytesProducer(data, ON_THE_WIRE.get())
        sent: Deferred[IResponse] = self._agent.request(
            method.encode("ascii"), request_uri(url), raw, producer
        )
        return sent.addCallback(AgentResponse)
