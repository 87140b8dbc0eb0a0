"""Providers: where accepted mail goes.

A provider is anything with a C{name} and a C{send(email)} method returning a
Deferred that fires when the backend has accepted the message.  Failing that
Deferred with L{smtpproxy.errors.TransientDeliveryError} or
L{smtpproxy.errors.PermanentDeliveryError} chooses between "try again later"
and a bounce; anything else is treated as transient.

A provider that can send a message it was given as raw bytes only (an
L{Email} whose parse was abandoned: envelope and C{raw}, nothing parsed)
says so with a true C{accepts_raw_mime} attribute; see L{accepts_raw_mime}.

New providers register a factory by name with L{register}; configuration
chooses one with L{create}.

A provider that carries binary message content unchanged (C{BODY=BINARYMIME},
RFC 3030: bare CR and LF, NUL, long lines) says so with a class attribute
C{binary_mime = True}; only then does the relay offer BINARYMIME.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config
    from smtpproxy.mime.message import Email


class Provider(Protocol):
    """Delivers parsed messages somewhere."""

    @property
    def name(self) -> str:
        """Short name used in logs, e.g. C{"stdout"} or C{"graph"}."""

    def send(self, email: Email) -> Deferred[None]:
        """Deliver C{email}; fire with None once the backend accepted it."""

    def close(self) -> Deferred[None]:
        """Release connections and timers; called once at shutdown."""


def accepts_raw_mime(provider: Provider) -> bool:
    """Can C{provider} deliver an L{Email} with C{abandoned=True} faithfully?

    The capability is optional (a provider without the attribute cannot),
    so that providers written before it existed keep working.
    """
    return bool(getattr(provider, "accepts_raw_mime", False))


ProviderFactory = Callable[["Config", "IReactorTime"], Provider]

_registry: dict[str, ProviderFactory] = {}


def register(name: str, factory: ProviderFactory) -> None:
    """Make a provider available under C{name} (the C{PROVIDER} setting)."""
    _registry[name] = factory


def names() -> list[str]:
    """Names of every registered provider, sorted."""
    _load_builtin()
    return sorted(_registry)


def create(name: str, config: Config, reactor: IReactorTime) -> Provider:
    """Build the provider called C{name}; KeyError when there is none."""
    _load_builtin()
    return _registry[name](config, reactor)


def _load_builtin() -> None:
    # Imported lazily so that importing this package stays free of side
    # effects and of the HTTP stack when only stdout is used.
    from smtpproxy.providers import stdout  # noqa: F401
    from smtpproxy.providers.graph import provider as graph  # noqa: F401
