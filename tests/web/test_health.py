"""Tests for L{smtpproxy.web.health}: the health endpoint over a real loopback socket."""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from smtpproxy.web import health as http
from smtpproxy.web import site as web_site


class PureTests(SynchronousTestCase):
    """The decision and the site's settings, without sockets."""

    def test_health(self) -> None:
        """Running is 200 "ok"; stopping is 503 "stopping"."""
        self.assertEqual(http.health(False), (200, {"status": "ok"}))
        self.assertEqual(http.health(True), (503, {"status": "stopping"}))

    def test_site_settings(self) -> None:
        """No tracebacks in replies, a short idle timeout, no factory start/stop chatter."""
        site = web_site.build_site([http.mount(lambda: False)], reactor=reactor)
        self.assertFalse(site.displayTracebacks)
        self.assertEqual(site.timeOut, web_site.IDLE_TIMEOUT)
        self.assertFalse(site.noisy)


class _Tracking(WrappingFactory):
    """Counts server-side connections so a test can wait until all are closed.

    Without this a test could end while the server still holds a socket the
    client has just closed, and trial would (rightly) call the reactor dirty.
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def closed(self) -> defer.Deferred[None]:
        """Fires once no connection is open."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


class Loopback:
    """A site listening on a free loopback port, with a treq client for it.

    Cleaned up with the test: the client's kept connections closed, then
    the server's connections waited out, then the port closed.
    """

    def __init__(self, case: TestCase, site: Any) -> None:
        self.tracking = _Tracking(site)
        tcp: IReactorTCP = reactor
        # WrappingFactory predates Twisted's typed ServerFactory.
        self.listening = tcp.listenTCP(0, self.tracking, interface="127.0.0.1")  # type: ignore[arg-type]
        self.base = f"http://127.0.0.1:{self.listening.getHost().port}"  # type: ignore[attr-defined]
        self.pool = HTTPConnectionPool(reactor)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))
        case.addCleanup(self.shut)

    def shut(self) -> defer.Deferred[None]:
        async def run() -> None:
            await self.pool.closeCachedConnections()
            await self.tracking.closed()
            await defer.maybeDeferred(self.listening.stopListening)

        return defer.Deferred.fromCoroutine(run())


@implementer(ILogObserver)
class _Collect:
    """Keeps the events of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)


class EndpointTests(TestCase):
    """GET /healthz and everything around it, with treq as the client."""

    def setUp(self) -> None:
        self.stopping = False
        self.lengths: list[object] = []
        self.site = web_site.build_site([http.mount(lambda: self.stopping)], reactor=reactor)
        self.loopback = Loopback(self, self.site)
        self.client, self.base = self.loopback.client, self.loopback.base

    async def fetch(self, method: str, path: str) -> tuple[int, Any, bytes]:
        """Make one request; return the status, the headers and the body."""
        response = await self.client.request(method, self.base + path)
        body = await response.content()
        self.lengths.append(response.length)
        return response.code, response.headers, body

    def check(self, method: str, path: str, code: int, body: object) -> defer.Deferred[Any]:
        """One request gets C{code} and the JSON C{body}, with our standard headers."""

        async def run() -> Any:
            status, headers, data = await self.fetch(method, path)
            self.assertEqual(status, code, f"{method} {path}")
            self.assertEqual(json.loads(data), body)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual(headers.getRawHeaders(b"server"), [web_site.SERVER])
            # Twisted's client moves Content-Length from the headers to .length.
            self.assertEqual(self.lengths[-1], len(data))
            return headers

        return defer.Deferred.fromCoroutine(run())

    def test_ok(self) -> defer.Deferred[Any]:
        """A running service answers 200 {"status": "ok"}, not cacheable."""

        def more(headers: Any) -> None:
            self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])

        return self.check("GET", "/healthz", 200, {"status": "ok"}).addCallback(more)

    def test_query_ignored(self) -> defer.Deferred[Any]:
        """A query string does not change the answer."""
        return self.check("GET", "/healthz?verbose=1", 200, {"status": "ok"})

    def test_stopping(self) -> defer.Deferred[None]:
        """Once shutdown begins the same endpoint answers 503 {"status": "stopping"}."""

        async def run() -> None:
            await self.check("GET", "/healthz", 200, {"status": "ok"})
            self.stopping = True
            await self.check("GET", "/healthz", 503, {"status": "stopping"})

        return defer.Deferred.fromCoroutine(run())

    def test_head(self) -> defer.Deferred[None]:
        """HEAD gets the status and headers of GET and no body."""

        async def run() -> None:
            for stopping, code in ((False, 200), (True, 503)):
                self.stopping = stopping
                _, _, get_body = await self.fetch("GET", "/healthz")
                status, headers, body = await self.fetch("HEAD", "/healthz")
                self.assertEqual((status, body), (code, b""))
                self.assertEqual(headers.getRawHeaders(b"server"), [web_site.SERVER])
                # A HEAD reply has no body, so the client leaves Content-Length in place.
                self.assertEqual(headers.getRawHeaders(b"content-length"), [b"%d" % len(get_body)])

        return defer.Deferred.fromCoroutine(run())

    def test_other_methods(self) -> defer.Deferred[None]:
        """Other methods get 405 with an Allow header."""

        async def run() -> None:
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                headers = await self.check(
                    method, "/healthz", 405, {"status": "method not allowed"}
                )
                self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

        return defer.Deferred.fromCoroutine(run())

    def test_other_paths(self) -> defer.Deferred[None]:
        """Every other path is a JSON 404 (no Twisted HTML page, no version)."""

        async def run() -> None:
            for path in ("/", "/healthz/", "/healthz/x", "/HEALTHZ", "/status", "/a/b/c"):
                await self.check("GET", path, 404, {"status": "not found"})
            await self.check("POST", "/elsewhere", 404, {"status": "not found"})

        return defer.Deferred.fromCoroutine(run())

    def test_crash_hides_details(self) -> defer.Deferred[None]:
        """If the check itself raises, the client gets a bare 500: no traceback, no version."""

        def broken() -> bool:
            raise RuntimeError("internal detail xyzzy")

        # The site routes by its mounts: replace the health check in place.
        self.site.mounts[b"healthz"] = web_site.Mount("/healthz", http.HealthResource(broken))

        async def run() -> None:
            status, headers, body = await self.fetch("GET", "/healthz")
            self.assertEqual(status, 500)
            self.assertNotIn(b"xyzzy", body)
            self.assertNotIn(b"Traceback", body)
            self.assertEqual(headers.getRawHeaders(b"server"), [web_site.SERVER])
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        return defer.Deferred.fromCoroutine(run())

    def test_access_line(self) -> defer.Deferred[None]:
        """Each request is one debug event with method, path and status, never the query."""
        collect = _Collect("smtpproxy.http")
        events = collect.events
        globalLogPublisher.addObserver(collect)
        self.addCleanup(globalLogPublisher.removeObserver, collect)

        async def run() -> None:
            await self.fetch("GET", "/healthz?token=abc123")
            self.assertEqual(len(events), 1)
            event = events[0]
            self.assertEqual(event["log_level"].name, "debug")
            self.assertEqual(
                (event["method"], event["path"], event["status"], event["client"]),
                ("GET", "/healthz", 200, "127.0.0.1"),
            )
            self.assertNotIn("abc123", repr({k: v for k, v in event.items() if k != "log_logger"}))

        return defer.Deferred.fromCoroutine(run())
