"""The HTTP listener: one site, several parts mounted on it, bounded as a whole.

Every HTTP part of the relay (health and readiness probes, metrics, the
submission API, the mailbox UI) is a C{twisted.web} resource mounted here
under its first path segment with L{Mount}; L{build_site} puts them together
and L{listening_factory} adds the connection cap and, with
C{HTTP_TLS_CERT_FILE}, TLS.  The site owns what every path shares:

- the network policy: C{HTTP_ALLOWED_NETWORKS}, judged on the client address
  that L{smtpproxy.web.clientaddr} derives (C{HTTP_TRUSTED_PROXIES}); a
  refused client gets a JSON C{403} on every path;
- the body limit: each mount says how large a body it takes
  (C{max_body}, zero by default); GET and HEAD never take one;
- the request deadline (C{HTTP_REQUEST_TIMEOUT}), the idle timeout and the
  flow control of L{smtpproxy.web.channel};
- the C{Host} check of the browser-facing parts (L{Mount.browser}, the
  mailbox), against DNS rebinding (L{smtpproxy.web.hosts}): C{421};
- JSON C{404} for every path no part claims, no Twisted version anywhere.

A resource behind a mount reads the client with C{request.getClientAddress()}
(already the forwarded address when a trusted proxy sent one) and answers
JSON with L{respond_json}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from smtpproxy.policy import rules as policy
from smtpproxy.web import hosts
from smtpproxy.web.channel import SERVER, BoundedChannel, BoundedRequest

if TYPE_CHECKING:
    from smtpproxy.config import Config

__all__ = [
    "IDLE_TIMEOUT",
    "SERVER",
    "BoundedSite",
    "ConnectionCap",
    "HttpSettings",
    "Mount",
    "build_site",
    "listening_factory",
    "respond_json",
]

log = Logger(namespace="smtpproxy.http")

#: Seconds an idle HTTP connection stays open between requests.  Probes make
#: one request and leave; Twisted's default (twelve hours) only keeps sockets.
IDLE_TIMEOUT = 60.0

_BODYLESS = (b"GET", b"HEAD")


class Mount(NamedTuple):
    """One part of the URL space: C{/path...} served by C{resource}.

    @ivar path: one path segment with its slash, C{"/healthz"} or C{"/v1"};
        the resource sees the rest of the path in C{request.postpath}.
    @ivar resource: a C{twisted.web} resource.
    @ivar max_body: the largest request body (bytes) any method but GET and
        HEAD may send to it; a larger declared one is answered C{413}
        before it is read.  Zero: no body at all.
    @ivar browser: a part people open in a browser (the mailbox): it answers
        only a C{Host} that L{smtpproxy.web.hosts.host_allowed} accepts,
        against DNS rebinding; others get C{421} before any body is read.
    """

    path: str
    resource: IResource
    max_body: int = 0
    browser: bool = False


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What the listener is bounded by (from the C{HTTP_*} settings)."""

    allowed_networks: policy.Networks = policy.DEFAULT_PRIVATE_NETWORKS
    trusted_proxies: policy.Networks = ()
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 64
    request_timeout: float = 10.0
    idle_timeout: float = IDLE_TIMEOUT
    # One debug line per request costs a log event even when the level
    # filters it out; it is only built when the level asks for it (as the
    # SMTP side's log_sessions).
    log_requests: bool = True

    @classmethod
    def from_config(cls, config: Config) -> HttpSettings:
        """The listener's settings from a L{smtpproxy.config.Config}."""
        return cls(
            allowed_networks=config.http_allowed_networks,
            trusted_proxies=config.http_trusted_proxies,
            allowed_hosts=config.http_allowed_hosts,
            max_connections=config.http_max_connections,
            request_timeout=config.http_request_timeout,
            log_requests=config.log_level == "debug",
        )


def respond_json(request: Request, code: int, body: object) -> bytes:
    """Set the status and headers for a JSON reply; return what to render (or write)."""
    data = json.dumps(body).encode("utf-8")
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(data)])
    # A HEAD reply carries the headers of the GET reply and no body;
    # returning the body would make Twisted log a warning and drop it.
    return b"" if request.method == b"HEAD" else data


class NotFound(Resource):
    """JSON 404 for any path no part claims (no Twisted HTML page)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return respond_json(request, 404, {"status": "not found"})


class Switchable(Resource):
    """A mount whose resource may come and go: C{current()} or, while it is None, L{NotFound}.

    The submission API is off until a key exists and keys are read again
    on SIGHUP, so what C{/v1} serves is decided per request, not at start.
    """

    def __init__(self, current: Callable[[], IResource | None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._current = current
        self._missing = NotFound()  # type: ignore[no-untyped-call]

    def active(self) -> bool:
        """Is there a resource now?  While not, the mount takes no body either."""
        return self._current() is not None

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        target = self._current()
        if target is None:
            return self._missing
        child: IResource = target.getChildWithDefault(path, request)  # type: ignore[no-untyped-call]
        return child

    def render(self, request: Request) -> bytes:
        target = self._current()
        rendered: bytes = (target or self._missing).render(request)
        return rendered


class _Root(Resource):
    """The mounts by first path segment; everything else the fallback's, or L{NotFound}."""

    def __init__(self, mounts: dict[bytes, Mount], fallback: Mount | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._mounts = mounts
        self._fallback = fallback
        self._missing = NotFound()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Request) -> IResource:
        mount = self._mounts.get(path)
        if mount is not None:
            return mount.resource
        if self._fallback is not None:
            # The fallback (the mailbox's pages and API) routes the whole
            # path itself: give the segment back.
            if request.prepath and request.postpath is not None:
                request.postpath.insert(0, request.prepath.pop())
            return self._fallback.resource
        return self._missing

    def render(self, request: Request) -> bytes:
        return self._missing.render(request)


class BoundedSite(Site):
    """The site: its mounts, the network policy, the body limits, the counters."""

    protocol = BoundedChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel

    def __init__(
        self,
        mounts: dict[bytes, Mount],
        settings: HttpSettings,
        reactor: IReactorTime | None,
        on_refusal: Callable[[str], None],
        fallback: Mount | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout": settings.idle_timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        super().__init__(_Root(mounts, fallback), requestFactory=BoundedRequest, **kwargs)  # type: ignore[no-untyped-call]
        self.mounts = mounts
        self.fallback = fallback
        self.allowed_networks = settings.allowed_networks
        self.trusted_proxies = settings.trusted_proxies
        self.allowed_hosts = settings.allowed_hosts
        self.host_refusals = hosts.RefusalLog()
        self.request_timeout = settings.request_timeout
        self.log_requests = settings.log_requests
        self.displayTracebacks = False
        self.noisy = False
        self._on_refusal = on_refusal

    def _mount(self, path: bytes) -> Mount | None:
        """The part that serves C{path} (a request line's path, without the query)."""
        return self.mounts.get(path[1:].partition(b"/")[0]) or self.fallback

    def host_refused(self, path: bytes, values: Sequence[bytes] | None) -> bool:
        """Is C{path} a browser-facing part's, and the C{Host} header one it does not answer?

        Refusals are logged (the first, then at most one a minute, with the
        count left out) and counted as C{"host"}.
        """
        mount = self._mount(path)
        if mount is None or not mount.browser:
            return False
        if hosts.host_allowed(values, self.allowed_hosts):
            return False
        self.counted("host")
        unlogged = self.host_refusals.record(self.reactor.seconds())
        if unlogged is not None:
            log.warn(
                "http request refused: Host not allowed",
                host=hosts.shown(values),
                path=path[:100].decode("ascii", "replace"),
                unlogged_before=unlogged,
            )
        return True

    def body_limit(self, method: bytes, path: bytes) -> int:
        """The largest body a request for C{path} with C{method} may send."""
        if method in _BODYLESS or not path.startswith(b"/"):
            return 0
        mount = self._mount(path)
        if mount is None:
            return 0
        if isinstance(mount.resource, Switchable) and not mount.resource.active():
            # Switched off: as absent as a path nobody mounted.
            return 0
        return mount.max_body

    def counted(self, reason: str) -> None:
        """A request or connection was refused for C{reason} (for the metrics)."""
        self._on_refusal(reason)

    def log(self, request: HTTPRequest) -> None:
        """One debug line per request instead of an access log file.

        The query string is left out: it is the part of a URL that carries
        tokens.
        """
        if not self.log_requests:
            return
        client = request.getClientAddress()  # type: ignore[no-untyped-call]
        log.debug(
            "http request",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            status=request.code,
            client=getattr(client, "host", None),
        )


def _ignore(reason: str) -> None:
    pass


def build_site(
    parts: Iterable[Mount],
    settings: HttpSettings | None = None,
    reactor: IReactorTime | None = None,
    on_refusal: Callable[[str], None] = _ignore,
    fallback: Mount | None = None,
) -> BoundedSite:
    """The site serving C{parts}.

    @param settings: the bounds; the defaults when not given.
    @param reactor: for timeouts; Twisted's global one if not given.
    @param fallback: what serves every path no part claims (its C{path} is
        not used), e.g. the mailbox's page and API; else a JSON 404.
    @param on_refusal: called with a reason (C{"network"},
        C{"body_too_large"}, C{"request_timeout"}, C{"host"}) for each refusal.
    @raise ValueError: a path that is not one segment, or mounted twice.
    """
    mounts: dict[bytes, Mount] = {}
    for part in parts:
        segment = part.path.encode("ascii")
        if not segment.startswith(b"/") or b"/" in segment[1:] or len(segment) < 2:
            raise ValueError(f"mount path {part.path!r} is not one segment such as /healthz")
        if segment[1:] in mounts:
            raise ValueError(f"mount path {part.path!r} is mounted twice")
        mounts[segment[1:]] = part
    return BoundedSite(mounts, settings or HttpSettings(), reactor, on_refusal, fallback)


class ConnectionCap(WrappingFactory):
    """At most C{limit} connections open; the next ones are closed at once.

    Outermost, in front of TLS, so a refused connection costs no handshake.
    """

    def __init__(
        self, wrapped: IProtocolFactory, limit: int, on_refusal: Callable[[str], None]
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]  # twisted.protocols is unannotated
        self.noisy = False
        self.limit = limit
        self.open_connections = 0
        self._on_refusal = on_refusal
        # close_all's waiters: fired when the last connection has closed.
        self._closed: list[defer.Deferred[None]] = []

    # None refuses the connection (Factory.buildProtocol allows it; WrappingFactory
    # narrows its annotation, not its callers).
    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper | None:  # type: ignore[override]
        if self.open_connections >= self.limit:
            self._on_refusal("connection_cap")
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.open_connections += 1
        return protocol

    def unregisterProtocol(self, p: Protocol) -> None:
        self.open_connections -= 1
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols and self._closed:
            closed, self._closed = self._closed, []
            for done in closed:
                done.callback(None)

    def close_all(self, clock: IReactorTime, timeout: float) -> defer.Deferred[None]:
        """Close every open connection once what was written to it has gone out.

        The stop's last step.  An answer decided in the stop's final
        reactor turn (a 202 for a message the queue has just committed)
        sits in its connection's send buffer; the reactor's own shutdown
        drops connections without flushing them, and that client would
        hear nothing for a stored message and send it again.
        C{loseConnection} closes only after the buffer is written; a
        client that does not read is cut off (C{abortConnection}) after
        C{timeout} seconds so that it cannot hold the stop up.
        """
        if not self.protocols:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._closed.append(done)
        for protocol in list(self.protocols):
            _transport(protocol).loseConnection()

        def cut_off() -> None:
            for protocol in list(self.protocols):
                _transport(protocol).abortConnection()

        timer = clock.callLater(timeout, cut_off)

        def over(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return done.addCallback(over)


def _transport(protocol: ProtocolWrapper) -> ITCPTransport:
    """The socket's transport under one wrapped connection."""
    return cast(ITCPTransport, protocol.transport)


def listening_factory(
    site: BoundedSite,
    settings: HttpSettings,
    tls: CertificateOptions | None,
    reactor: IReactorTime,
    on_refusal: Callable[[str], None] = _ignore,
) -> ConnectionCap:
    """What C{HTTP_LISTEN} listens with: the cap outside, then TLS (if any), then the site."""
    wrapped: IProtocolFactory = site
    if tls is not None:
        wrapped = TLSMemoryBIOFactory(tls, False, site, reactor)
    return ConnectionCap(wrapped, settings.max_connections, on_refusal)
