"""The Microsoft Graph provider: payloads, retries, tokens and its settings.

L{create} is the entry point (group C{smtpproxy.providers}); it imports the
HTTP stack only when a Graph provider is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpproxy.providers.graph.settings import SETTINGS_GROUP as SETTINGS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config
    from smtpproxy.providers import Provider

__all__ = ["SETTINGS", "create"]


def create(config: Config, reactor: IReactorTime) -> Provider:
    """Build the Graph provider from the settings in C{config}."""
    from smtpproxy.providers.graph.provider import GraphProvider

    return GraphProvider(config, reactor)
