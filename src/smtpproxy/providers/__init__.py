"""Providers: where accepted mail goes.

A provider is anything with a C{name} and a C{send(email)} method returning a
Deferred that fires when the backend has accepted the message.  Failing that
Deferred with L{smtpproxy.errors.TransientDeliveryError} or
L{smtpproxy.errors.PermanentDeliveryError} chooses between "try again later"
and a bounce; anything else is treated as transient.  A backend that took
the message for some recipients only fires with a
L{smtpproxy.providers.result.PartlyRefused} naming the others; one that
takes all or none (most) fires with None and keeps its C{Deferred[None]}.
Such a partial delivery is only for a caller that retries recipients one
by one (C{Email.per_recipient_retry}, the queue): for any other, a backend
that can still hold the message back does so while any recipient is
refused temporarily (L{smtpproxy.providers.result.whole_message_deferral}).

A provider that can send a message it was given as raw bytes only (an
L{Email} whose parse was abandoned: envelope and C{raw}, nothing parsed)
says so with a true C{accepts_raw_mime} attribute; see L{accepts_raw_mime}.

Providers are found through the entry-point group C{smtpproxy.providers}: each
entry names a factory C{create(config, reactor)}, and the factory's module may
declare the provider's own settings as C{SETTINGS} (a
L{smtpproxy.config.SettingGroup}), so another installed package adds a
provider without editing this one.  The built-in providers are registered
directly too, so the relay also runs from a source tree that was never
installed.  Configuration chooses one with L{create}.

A provider that carries binary message content unchanged (C{BODY=BINARYMIME},
RFC 3030: bare CR and LF, NUL, long lines) says so with a class attribute
C{binary_mime = True}; only then does the relay offer BINARYMIME.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smtpproxy.config import Config
    from smtpproxy.errors import DeliveryError
    from smtpproxy.mime.message import Email
    from smtpproxy.providers.result import PartlyRefused


class Provider(Protocol):
    """Delivers parsed messages somewhere."""

    @property
    def name(self) -> str:
        """Short name used in logs, e.g. C{"stdout"} or C{"graph"}."""

    def send(self, email: Email) -> Deferred[None] | Deferred[PartlyRefused | None]:
        """Deliver C{email}; fire once the backend accepted it.

        With None when it took the message for every recipient, with a
        L{PartlyRefused} when it took it for some and refused the others.
        """

    def close(self) -> Deferred[None]:
        """Release connections and timers; called once at shutdown."""


def accepts_raw_mime(provider: Provider) -> bool:
    """Can C{provider} deliver an L{Email} with C{abandoned=True} faithfully?

    The capability is optional (a provider without the attribute cannot),
    so that providers written before it existed keep working.
    """
    return bool(getattr(provider, "accepts_raw_mime", False))


def ready_check(provider: Provider) -> Callable[[], Deferred[None]] | None:
    """How to ask C{provider} whether it can deliver now (C{/readyz}), if it can say.

    Optional like L{accepts_raw_mime}: a provider without C{check_ready}
    (stdout) is always ready once running.
    """
    check = getattr(provider, "check_ready", None)
    return check if callable(check) else None


def mailboxes(provider: Provider) -> tuple[str, ...]:
    """The mailboxes C{provider} sends as, if it has any (Graph's C{GRAPH_SENDER}).

    Optional like L{accepts_raw_mime}: the first one's domain qualifies a
    bare C{MAIL FROM:<root>} when C{SMTP_DEFAULT_DOMAIN} is unset.
    """
    found = getattr(provider, "mailboxes", ())
    return tuple(str(mailbox) for mailbox in found) if isinstance(found, tuple) else ()


#: The per-route cap of a provider that states none (stdout): no cap.
UNLIMITED = 1_000_000


def mailbox_concurrency(provider: Provider) -> int:
    """Deliveries one of C{provider}'s mailboxes may have in flight at once.

    Optional like L{mailboxes}: Graph says C{GRAPH_MAX_CONCURRENCY}; a
    provider without the attribute has no such limit.  The durable queue
    counts it across every relay sharing the queue.
    """
    found = getattr(provider, "mailbox_concurrency", None)
    return found if isinstance(found, int) and found > 0 else UNLIMITED


def envelope_refusal(provider: Provider) -> Callable[[str], DeliveryError | None] | None:
    """The provider's check of a transaction's C{MAIL} and C{RCPT}, if it has one.

    Optional like L{accepts_raw_mime}: a provider with an C{envelope_refusal}
    method is asked at C{"sender"} and each C{"recipient"} stage and may
    answer with the L{DeliveryError} to refuse it with (the mailbox's chaos
    does).  Looked up once per session, so providers without it cost nothing.
    """
    check = getattr(provider, "envelope_refusal", None)
    return check if callable(check) else None


ProviderFactory = Callable[["Config", "IReactorTime"], Provider]

ENTRY_POINT_GROUP = "smtpproxy.providers"
#: Chosen when no provider says it is configured and C{PROVIDER} is unset.
DEFAULT = "stdout"
_BUILTIN = {
    "stdout": "smtpproxy.providers.stdout:create",
    "graph": "smtpproxy.providers.graph:create",
    "smtp": "smtpproxy.providers.smtp:create",
    "mailbox": "smtpproxy.providers.mailbox:create",
}

_registry: dict[str, ProviderFactory] = {}
_loaded = False


def register(name: str, factory: ProviderFactory) -> None:
    """Make a provider available under C{name} (the C{PROVIDER} setting)."""
    _registry[name] = factory


def names() -> list[str]:
    """Names of every registered provider, sorted."""
    _load()
    return sorted(_registry)


def create(name: str, config: Config, reactor: IReactorTime) -> Provider:
    """Build the provider called C{name}; KeyError when there is none."""
    _load()
    return _registry[name](config, reactor)


def choose(explicit: str, configured: list[str]) -> str:
    """The provider to use: C{PROVIDER} when set, else the first configured one, else stdout."""
    if explicit:
        return explicit
    return configured[0] if configured else DEFAULT


def _load() -> None:
    # Done on first use rather than at import, so importing this package
    # stays free of side effects.
    global _loaded
    if _loaded:
        return
    _loaded = True
    found = {name: target for name, target in _BUILTIN.items()}
    found.update((ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP))
    for name, target in found.items():
        _add(name, target)


def _add(name: str, target: str) -> None:
    """Register the factory C{module:attribute} and the settings its module declares."""
    from smtpproxy import config

    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"provider {name!r} ({target}) cannot be loaded: {e}") from e
    register(name, factory)
    settings = getattr(sys.modules[module_name], "SETTINGS", None)
    if isinstance(settings, config.SettingGroup):
        config.register_settings(settings)
