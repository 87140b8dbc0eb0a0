"""The upstream SMTP provider (C{PROVIDER=smtp}): relay every message to one SMTP server.

L{create} is the entry point (group C{smtpproxy.providers}); the client
stack is imported only when the provider is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpproxy.providers.smtp.settings import SETTINGS_GROUP as SETTINGS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config
    from smtpproxy.providers import Provider

__all__ = ["SETTINGS", "create"]


def create(config: Config, reactor: IReactorTime) -> Provider:
    """Build the upstream SMTP provider from the settings in C{config}."""
    from smtpproxy.providers.smtp.provider import SmtpProvider
    from smtpproxy.providers.smtp.settings import RelaySettings

    return SmtpProvider(RelaySettings.from_config(config), reactor)
