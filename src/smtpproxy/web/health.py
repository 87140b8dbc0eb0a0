"""The health endpoint: C{GET /healthz} for load balancers and orchestrators (NF5).

C{200 {"status": "ok"}} while the relay accepts mail; C{503
{"status": "stopping"}} from the moment shutdown begins, so whatever routes
traffic here stops sending new clients while mail in flight is finished.
Every other path is a JSON 404 and every other method a JSON 405: the
endpoint is meant for machines, and reveals nothing about the software
behind it (no version in C{Server}, no tracebacks).

L{health} is the whole decision as a pure function; the rest is
C{twisted.web} glue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["SERVER", "HealthResource", "health", "make_site"]

log = Logger(namespace="smtpproxy.http")

#: The C{Server} header on every response, in place of Twisted's version string.
SERVER = b"smtpproxy"

#: Seconds an idle HTTP connection stays open.  Probes make one request and
#: leave; Twisted's default (twelve hours) only keeps sockets around.
IDLE_TIMEOUT = 60.0

_ALLOWED = b"GET, HEAD"


def health(stopping: bool) -> tuple[int, dict[str, str]]:
    """The status code and body for a health check."""
    if stopping:
        return 503, {"status": "stopping"}
    return 200, {"status": "ok"}


def _respond(request: Request, code: int, body: dict[str, str]) -> bytes:
    """Set the status and headers for a JSON reply; return what to render."""
    data = json.dumps(body).encode("ascii")
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(data)])
    # A HEAD reply carries the headers of the GET reply and no body;
    # returning the body would make Twisted log a warning and drop it.
    return b"" if request.method == b"HEAD" else data


class HealthResource(Resource):
    """The whole URL space: C{/healthz}, and 404 for everything else.

    A leaf at the root, so it sees every path and no other resource (with
    Twisted's HTML error pages) is ever reached.
    """

    isLeaf = True

    def __init__(self, is_stopping: Callable[[], bool]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._is_stopping = is_stopping

    def render(self, request: Request) -> bytes:
        # postpath is the path split on "/": exactly ["healthz"], so
        # "/healthz/" and "/healthz/x" are not found.
        if request.postpath != [b"healthz"]:
            return _respond(request, 404, {"status": "not found"})
        if request.method not in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"allow", [_ALLOWED])
            return _respond(request, 405, {"status": "method not allowed"})
        code, body = health(self._is_stopping())
        return _respond(request, code, body)


class _Request(Request):
    """A request whose replies name the service, not the Twisted version."""

    def write(self, data: bytes) -> None:
        # Every reply, error pages included, passes here before its headers
        # are sent; Request.process set Server to Twisted's version earlier.
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)  # type: ignore[no-untyped-call]  # twisted.web is unannotated


class _Site(Site):
    def log(self, request: HTTPRequest) -> None:
        """One debug line per request instead of an access log file.

        The query string is left out: it is the part of a URL that carries
        tokens, and a health probe has no use for one.
        """
        client = request.getClientAddress()  # type: ignore[no-untyped-call]
        log.debug(
            "http request",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            status=request.code,
            client=getattr(client, "host", None),
        )


def make_site(
    is_stopping: Callable[[], bool],
    reactor: IReactorTime | None = None,
    root: Resource | None = None,
) -> Site:
    """The C{twisted.web} site serving C{/healthz}.

    @param is_stopping: asked on every check; true once shutdown has begun.
    @param reactor: for connection timeouts; Twisted's global one if not given.
    @param root: the resource for the whole URL space in place of the health
        endpoint alone (L{smtpproxy.web.site} builds one from parts).
    """
    kwargs: dict[str, Any] = {"timeout": IDLE_TIMEOUT}
    if reactor is not None:
        kwargs["reactor"] = reactor
    resource = root if root is not None else HealthResource(is_stopping)
    site = _Site(resource, requestFactory=_Request, **kwargs)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    site.noisy = False
    return site
