"""The HTTP client the Graph provider uses in production: Twisted's C{Agent}, nothing on top.

treq's C{HTTPClient} is convenient but costs more per request than the rest
of a small message's trip through the relay (see docs/performance.md, "Graph
path CPU"): every request parses its URL with hyperlink and converts it to
a URI (IDNA checks of each label), builds a cookie jar and wraps the agent
in a C{CookieAgent} and a C{ContentDecoderAgent}.  Graph sets no cookies we
want, its replies are small JSON that we do not ask to be compressed, and
our URLs are ASCII already (built by L{GraphUrls} with C{quote}, or handed
to us by Graph for uploads), so none of that is needed.

L{AgentClient} keeps the one method of treq's interface the provider calls
(C{request(method, url, headers=, data=, allow_redirects=)}, answering an
object with C{code}, C{headers} and C{content()}), so tests still drive the
provider through treq's C{StubTreq}.  Only public Twisted API is used:
C{IAgent.request}, C{IBodyProducer} and C{readBody}.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory: written in one go."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the whole body was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class AgentResponse:
    """The part of treq's response the provider reads: status, headers, body."""

    def __init__(self, response: IResponse) -> None:
        self._response = response
        self.code: int = response.code
        self.headers: Headers = response.headers

    def content(self) -> Deferred[bytes]:
        """The whole body (Graph's replies are small)."""
        body: Deferred[bytes] = readBody(self._response)
        return body


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
        producer = None if data is None else BytesProducer(data)
        sent: Deferred[IResponse] = self._agent.request(
            method.encode("ascii"), request_uri(url), raw, producer
        )
        return sent.addCallback(AgentResponse)
