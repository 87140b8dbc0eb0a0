"""The HTTP connection and request, bounded: what C{twisted.web} leaves open.

Three attacks on the listener as Twisted ships it (issue 14) are closed here:

- B{Pipelined requests whose replies are never read.}  Twisted's channel
  stops reading only when the transport's write buffer fills while no
  request is being handled; a request answered at once is always "being
  handled" when its reply fills the buffer, so reading never stops and
  the replies pile up (14 MB/s).  L{BoundedChannel} feeds the parser from
  its own small holding buffer, a slice at a time, and feeds nothing while
  the transport says its buffer is full or while a request's reply is
  unfinished; past L{HOLD_LIMIT} held bytes it stops reading the socket.
- B{Bodies of any size, spooled to a temporary file.}  L{BoundedRequest}
  decides at C{gotLength} (the headers are in, no body byte read yet)
  whether the body may come at all: over the path's limit (zero for every
  path that takes none, and always for GET and HEAD) the answer is C{413}
  at once and the connection closes.  A chunked body is counted as it
  arrives.  Nothing beyond the limit is ever stored.
- B{Slow requests.}  Each request must arrive whole within
  C{HTTP_REQUEST_TIMEOUT} of its first byte (of the connection, for the
  first one); arriving bytes do not move that deadline, unlike the idle
  timer.  Past it the client gets C{408} and the connection closes.

The network policy (C{HTTP_ALLOWED_NETWORKS}, C{HTTP_TRUSTED_PROXIES}) and
the browser-facing parts' C{Host} check (C{HTTP_ALLOWED_HOSTS}) are decided
at the same point as the body limit, so a refused client cannot upload
anything either.  Only public Twisted API and documented override
points are used: C{dataReceived}, C{lineReceived}, C{requestDone}, the
C{IPushProducer} methods of the channel, and C{Request.gotLength},
C{handleContentChunk}, C{requestReceived}, C{process}.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import implementer

from smtpproxy import tlsevents
from smtpproxy.policy import rules as policy
from smtpproxy.web import clientaddr, hosts

if TYPE_CHECKING:
    from smtpproxy.web.site import BoundedSite

__all__ = ["HOLD_LIMIT", "SLICE", "BoundedChannel", "BoundedRequest", "raw_response"]

#: Bytes handed to Twisted's parser at a time: the most requests answered
#: between two looks at the transport's buffer.
SLICE = 4096
#: Bytes read ahead of the parser before the socket is no longer read.
HOLD_LIMIT = 16384
#: Bodies declared smaller than this stay in memory; larger ones (always
#: within the path's limit) go to an anonymous temporary file.
MEMORY_BODY = 100_000
#: Seconds a closing connection may take to flush its last reply before it is cut.
ABORT_GRACE = 5.0

#: The C{Server} header on every response, in place of Twisted's version string.
SERVER = b"smtpproxy"

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
}


def raw_response(code: int, message: str) -> bytes:
    """A complete JSON error response that closes the connection.

    Used where no request object can answer (the request is not read yet):
    the same shape as every other error on this listener.
    """
    body = json.dumps({"status": message}).encode("ascii")
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Server: %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n"
    ) % (code, _REASONS.get(code, b"Error"), SERVER, len(body))
    return head + body


@implementer(IHandshakeListener)
class BoundedChannel(HTTPChannel):
    """One HTTP connection that reads no faster than it can answer, and not for ever."""

    site: BoundedSite

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._held: list[bytes] = []
        self._held_len = 0
        self._output_full = False
        self._busy = False
        self._feeding = False
        self._reading = True
        self._closing = False
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        #: The line being parsed; a new request reads its request line here.
        self.current_line = b""
        #: C{https} until the TLS handshake completes (L{tlsevents}); None without TLS.
        self._tls_door: str | None = None
        #: The transport as a push producer (None if it is not one), once known.
        self._producer: IPushProducer | None = None
        self._producer_known = False

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self._tls_door = "https"
        # The first request's clock starts with the connection, so a client
        # that connects and sends nothing is also gone after the deadline.
        self._arm_deadline()

    def handshakeCompleted(self) -> None:
        """Twisted's TLS finished the handshake (HTTPS): count it by version."""
        if self._tls_door is not None:
            tlsevents.completed(self._tls_door, self.transport)
            self._tls_door = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._tls_door is not None:
            tlsevents.ended(self._tls_door, reason)
            self._tls_door = None
        for call in (self._deadline, self._abort):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._abort = None
        self._held, self._held_len = [], 0
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._held.append(data)
        self._held_len += len(data)
        self._feed()

    def lineReceived(self, line: bytes) -> None:
        self.current_line = line
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def _feed(self) -> None:
        """Hand held bytes to the parser while a reply may be written."""
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._held_len and not (self._output_full or self._busy or self._closing):
                if self._deadline is None:
                    self._arm_deadline()
                held = self._held
                data = held[0] if len(held) == 1 else b"".join(held)
                if len(data) <= SLICE:
                    # Most requests arrive whole and small: no copies.
                    chunk = data
                    self._held, self._held_len = [], 0
                else:
                    chunk, rest = data[:SLICE], data[SLICE:]
                    self._held = [rest]
                    self._held_len = len(rest)
                super().dataReceived(chunk)  # type: ignore[no-untyped-call]
        finally:
            self._feeding = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Read the socket only while replies flow and little is held."""
        if not self._producer_known:
            # Looked up once: an interface adaptation per read costs more
            # than the rest of this method.  The transport is set for life.
            self._producer = IPushProducer(self.transport, None)
            self._producer_known = True
        transport = self._producer
        if transport is None or self._closing:
            return
        stop = self._output_full or self._held_len >= HOLD_LIMIT
        if stop:
            # Twisted's channel may have resumed reading on its own (after a
            # request); pausing again is harmless.
            transport.pauseProducing()
            self._reading = False
        elif not self._reading:
            self._reading = True
            transport.resumeProducing()

    # -- the transport's buffer ---------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: stop reading and answering."""
        self._output_full = True
        super().pauseProducing()  # type: ignore[no-untyped-call]
        self._update_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer drained: answer what is held, read on."""
        self._output_full = False
        super().resumeProducing()  # type: ignore[no-untyped-call]
        self._feed()

    # -- requests -------------------------------------------------------

    def request_received(self) -> None:
        """The whole request is in: its deadline is met; nothing more is parsed until done."""
        self._busy = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)  # type: ignore[no-untyped-call]
        self._busy = False
        self._feed()

    def _arm_deadline(self) -> None:
        timeout = self.site.request_timeout
        self._deadline = self.callLater(timeout, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        self.site.counted("request_timeout")
        self.refuse(408, "request timeout")

    def refuse(self, code: int, message: str) -> None:
        """Answer C{code} before the request is read, and close (cut after a grace)."""
        if self._closing:
            return
        self._closing = True
        self._held, self._held_len = [], 0
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        transport.write(raw_response(code, message))
        self.loseConnection()  # type: ignore[no-untyped-call]
        # A client that does not read would keep the socket while our
        # reply waits in the buffer.
        self._abort = self.callLater(ABORT_GRACE, cast(ITCPTransport, transport).abortConnection)

    @property
    def closing(self) -> bool:
        return self._closing

    # TimeoutMixin's callLater, set by the factory to its reactor's.
    callLater: Callable[..., IDelayedCall]


class BoundedRequest(Request):
    """A request judged at its headers: network policy, body limit, client address.

    @ivar client_host: the client address (the peer, or what a trusted
        proxy's X-Forwarded-For says), or None when unknown.
    @ivar refusal: C{(code, message)} to answer instead of the resource,
        for a refused client that sent no body.
    """

    channel: BoundedChannel

    def __init__(self, channel: BoundedChannel, *args: Any, **kwargs: Any) -> None:
        # Form bodies are never parsed into args: nothing here takes forms,
        # and the parse holds the whole body in memory again.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)  # type: ignore[no-untyped-call]
        parts = channel.current_line.split(b" ")
        self.line_method = parts[0] if len(parts) == 3 else b""
        self.line_path = parts[1].partition(b"?")[0] if len(parts) == 3 else b""
        self.client_host: str | None = None
        self.refusal: tuple[int, str] | None = None
        self._limit = 0
        self._received = 0
        self._dropped = False

    def gotLength(self, length: int | None) -> None:
        """The headers are in and no body byte is read: admit the body or answer now."""
        site = self.channel.site
        peer = policy.client_name(self.channel.getPeer())  # type: ignore[no-untyped-call]
        forwarded = self.requestHeaders.getRawHeaders(b"x-forwarded-for")
        self.client_host = clientaddr.client_host(peer, forwarded, site.trusted_proxies)
        has_body = length is None or length > 0
        if self.client_host is None or not policy.address_in(
            self.client_host, site.allowed_networks
        ):
            site.counted("network")
            self.refusal = (403, "forbidden")
            if has_body:
                self._drop(403, "forbidden")
            self.content = io.BytesIO()
            return
        if site.host_refused(self.line_path, self.requestHeaders.getRawHeaders(b"host")):
            self.refusal = (421, hosts.REFUSAL)
            if has_body:
                self._drop(421, hosts.REFUSAL)
            self.content = io.BytesIO()
            return
        self._limit = site.body_limit(self.line_method, self.line_path)
        problem = body_problem(length, self._limit)
        if problem is not None:
            site.counted("body_too_large")
            self._drop(problem, "request body too large")
            self.content = io.BytesIO()
            return
        if length is not None and length < MEMORY_BODY:
            self.content = io.BytesIO()
        else:
            # Closed by Request._cleanup, as Twisted's own content file is.
            self.content = cast(IO[bytes], tempfile.TemporaryFile())  # noqa: SIM115

    def _drop(self, code: int, message: str) -> None:
        self._dropped = True
        # No "100 Continue" for a body that is refused.
        self.requestHeaders.removeHeader(b"expect")
        self.channel.refuse(code, message)

    def handleContentChunk(self, data: bytes) -> None:
        if self._dropped:
            return
        self._received += len(data)
        if self._received > self._limit:
            # Only a chunked body gets here: a declared length was checked.
            self.channel.site.counted("body_too_large")
            self._drop(413, "request body too large")
            return
        assert self.content is not None
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._dropped or self.channel.closing:
            return
        self.channel.request_received()
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self.refusal is not None:
            from smtpproxy.web.site import respond_json

            code, message = self.refusal
            self.write(respond_json(self, code, {"status": message}))
            self.finish()  # type: ignore[no-untyped-call]
            return
        super().process()  # type: ignore[no-untyped-call]

    def getClientAddress(self) -> IPv4Address | IPv6Address | Any:
        """The client as policies see it: what a trusted proxy named, else the peer."""
        host = self.client_host
        peer = super().getClientAddress()  # type: ignore[no-untyped-call]
        if host is None or host == getattr(peer, "host", None):
            return peer
        if ":" in host:
            return IPv6Address("TCP", host, 0)
        return IPv4Address("TCP", host, 0)

    def write(self, data: bytes) -> None:
        # Every reply, error pages included, passes here before its headers
        # are sent; Request.process set Server to Twisted's version earlier.
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)  # type: ignore[no-untyped-call]


def body_problem(length: int | None, limit: int) -> int | None:
    """The status to answer at once for a body of C{length} (None: chunked), or None.

    A declared length over the limit is refused before a byte of it is
    read; a chunked body is admitted only where bodies are (and counted as
    it arrives).  GET and HEAD have a limit of zero, so any body is refused.
    """
    if length is None:
        return 413 if limit <= 0 else None
    return 413 if length > limit else None
