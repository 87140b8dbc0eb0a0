"""The mailbox's web side: its page, Mailpit's JSON API, the sandboxed message view."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.providers import Provider
    from smtpproxy.web.site import Mount


def mount_for(provider: Provider, reactor: IReactorTime) -> Mount | None:
    """The mailbox's page and API as the site's fallback part, when C{provider} is the mailbox.

    It routes every path no other part claims (its page at C{/}, Mailpit's
    API under C{/api/v1/}), so it is the site's fallback rather than one
    more segment.
    """
    from smtpproxy.providers.mailbox.provider import MailboxProvider

    if not isinstance(provider, MailboxProvider):
        return None
    from smtpproxy.web.mailbox.routes import MAX_BODY, MailboxResource
    from smtpproxy.web.site import Mount

    # browser=True: the page and its API answer only a Host that cannot be
    # a rebound DNS name (smtpproxy.web.hosts).
    return Mount("/", MailboxResource(provider, reactor), max_body=MAX_BODY, browser=True)
