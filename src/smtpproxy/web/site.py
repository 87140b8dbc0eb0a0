"""The HTTP listener's URL space, built from parts: health always, the mailbox when it runs.

C{/healthz} is always the health endpoint.  With C{PROVIDER=mailbox} the
mailbox (L{smtpproxy.web.mailbox.routes}) answers every other path (its
page at C{/}, Mailpit's API under C{/api/v1/}); otherwise they are the
health endpoint's JSON 404s, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smtpproxy.providers import Provider
from smtpproxy.web import health

__all__ = ["Root", "make_site"]


class Root(Resource):
    """Sends C{/healthz} to the health endpoint and the rest to the mailbox, if any."""

    isLeaf = True

    def __init__(self, health_part: Resource, mailbox: Resource | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._health = health_part
        self._mailbox = mailbox

    def render(self, request: Request) -> bytes | int:
        first = request.postpath[0] if request.postpath else b""
        if first == b"healthz" or self._mailbox is None:
            result: bytes | int = self._health.render(request)  # type: ignore[no-untyped-call]
            return result
        mailbox: bytes | int = self._mailbox.render(request)  # type: ignore[no-untyped-call]
        return mailbox


def make_site(is_stopping: Callable[[], bool], provider: Provider, reactor: IReactorTime) -> Site:
    """The site for C{HTTP_LISTEN}: health, and the mailbox when C{provider} is one."""
    from smtpproxy.providers.mailbox.provider import MailboxProvider

    mailbox: Resource | None = None
    if isinstance(provider, MailboxProvider):
        from smtpproxy.web.mailbox.routes import MailboxResource

        mailbox = MailboxResource(provider, reactor)
    root = Root(health.HealthResource(is_stopping), mailbox)
    return health.make_site(is_stopping, reactor, root)
