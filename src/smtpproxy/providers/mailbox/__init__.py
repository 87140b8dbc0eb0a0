"""The mailbox provider (C{PROVIDER=mailbox}): keep mail to read in a browser or over an API.

L{create} is the entry point (group C{smtpproxy.providers}); the web side is
L{smtpproxy.web.mailbox}, mounted on C{HTTP_LISTEN} by L{smtpproxy.web.site}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpproxy.providers.mailbox.settings import SETTINGS_GROUP as SETTINGS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config
    from smtpproxy.providers import Provider

__all__ = ["SETTINGS", "create"]


def create(config: Config, reactor: IReactorTime) -> Provider:
    """Build the mailbox from C{config}, and the provider it releases through, if any."""
    from smtpproxy import providers
    from smtpproxy.providers.mailbox.provider import create_mailbox
    from smtpproxy.providers.mailbox.settings import MailboxSettings

    settings = MailboxSettings.from_config(config)
    release_to = None
    if settings.release_provider:
        release_to = providers.create(settings.release_provider, config, reactor)
    return create_mailbox(settings, reactor, release_to)
