"""The liveness probe: C{GET /healthz} for load balancers and orchestrators (NF5).

C{200 {"status": "ok"}} while the relay accepts mail; C{503
{"status": "stopping"}} from the moment shutdown begins, so whatever routes
traffic here stops sending new clients while mail in flight is finished.
Other methods get a JSON 405.  Readiness (can the relay deliver right now?)
is C{/readyz}, in L{smtpproxy.web.ready}.

L{health} is the whole decision as a pure function; the rest is
C{twisted.web} glue, mounted on the site of L{smtpproxy.web.site}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request

from smtpproxy.web.site import Mount, respond_json

__all__ = ["ALLOWED", "HealthResource", "health", "mount", "only_get"]

ALLOWED = b"GET, HEAD"


def health(stopping: bool) -> tuple[int, dict[str, str]]:
    """The status code and body for a health check."""
    if stopping:
        return 503, {"status": "stopping"}
    return 200, {"status": "ok"}


def only_get(request: Request) -> bytes | None:
    """The reply for a probe path asked with a wrong method or a deeper path, or None."""
    # postpath is what follows the mount: "/healthz/" and "/healthz/x" are not found.
    if request.postpath:
        return respond_json(request, 404, {"status": "not found"})
    if request.method not in (b"GET", b"HEAD"):
        request.responseHeaders.setRawHeaders(b"allow", [ALLOWED])
        return respond_json(request, 405, {"status": "method not allowed"})
    return None


class HealthResource(Resource):
    """C{/healthz}: a leaf, so no other resource (with Twisted's HTML pages) is reached."""

    isLeaf = True

    def __init__(self, is_stopping: Callable[[], bool]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._is_stopping = is_stopping

    def render(self, request: Request) -> bytes:
        wrong = only_get(request)
        if wrong is not None:
            return wrong
        code, body = health(self._is_stopping())
        return respond_json(request, code, body)


def mount(is_stopping: Callable[[], bool]) -> Mount:
    """C{/healthz} for the site."""
    return Mount("/healthz", HealthResource(is_stopping))
