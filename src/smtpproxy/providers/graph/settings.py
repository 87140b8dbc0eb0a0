"""The Graph provider's settings: declared here, registered with L{smtpproxy.config}.

They are read from the environment and the YAML file, listed by C{--help} and
checked against the operator guide like the relay's own, and read back as
attributes of the L{smtpproxy.config.Config} (C{config.graph_sender}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from smtpproxy.config import (
    Config,
    ConfigError,
    Setting,
    SettingGroup,
    parse_addresses,
    parse_choice,
    parse_positive_int,
    parse_seconds,
    parse_text,
    parse_url,
)

SEND_MODES = ("auto", "mime", "json")
REQUIRED = ("GRAPH_TENANT_ID", "GRAPH_CLIENT_ID", "GRAPH_CLIENT_SECRET", "GRAPH_SENDER")

SETTINGS: tuple[Setting, ...] = (
    Setting("GRAPH_TENANT_ID", "graph_tenant_id", parse_text, "Entra tenant id", ""),
    Setting("GRAPH_CLIENT_ID", "graph_client_id", parse_text, "Entra application (client) id", ""),
    Setting(
        "GRAPH_CLIENT_SECRET",
        "graph_client_secret",
        parse_text,
        "Entra client secret",
        "",
        secret=True,
    ),
    Setting(
        "GRAPH_SENDER",
        "graph_sender",
        parse_addresses,
        "mailbox(es) to send as, comma separated",
        (),
    ),
    Setting(
        "GRAPH_AUTHORITY_HOST",
        "graph_authority_host",
        parse_url,
        "Entra login base URL",
        "https://login.microsoftonline.com",
    ),
    Setting(
        "GRAPH_ENDPOINT",
        "graph_endpoint",
        parse_url,
        "Graph base URL",
        "https://graph.microsoft.com",
    ),
    Setting(
        "GRAPH_SEND_MODE", "graph_send_mode", parse_choice(SEND_MODES), "auto, mime or json", "auto"
    ),
    Setting(
        "GRAPH_SEND_TIMEOUT", "graph_send_timeout", parse_seconds, "seconds per message", 120.0
    ),
    Setting(
        "GRAPH_MAX_CONCURRENCY",
        "graph_max_concurrency",
        parse_positive_int,
        "Graph requests at once per mailbox",
        4,
    ),
)


def configured(values: Mapping[str, object]) -> bool:
    """Are all four required settings given?  Half of them is an error, not stdout mode."""
    present = [name for name in REQUIRED if values.get(name.lower())]
    if present and len(present) < len(REQUIRED):
        missing = [name for name in REQUIRED if name not in present]
        raise ConfigError(
            f"{missing[0]}: Graph is partly configured; also set {', '.join(missing)} "
            "(or unset the GRAPH_* settings to print mail to stdout)"
        )
    if values.get("provider") == "graph" and not present:
        raise ConfigError(f"PROVIDER: graph needs {', '.join(REQUIRED)}")
    return bool(present)


SETTINGS_GROUP = SettingGroup("graph", SETTINGS, configured)
_DEFAULTS: Mapping[str, object] = {setting.attr: setting.default for setting in SETTINGS}


@dataclass(frozen=True, slots=True)
class GraphSettings:
    """The Graph settings, typed: what the provider reads instead of untyped attributes.

    L{Config} holds a provider's values in a mapping it knows nothing about;
    this is where they get their types back, checked once when the
    provider is built.  No field has a default of its own: an unset value
    takes its L{Setting}'s, declared once in L{SETTINGS}.
    """

    tenant_id: str
    client_id: str
    client_secret: str
    sender: tuple[str, ...]
    authority_host: str
    endpoint: str
    send_mode: str
    send_timeout: float
    max_concurrency: int

    def __repr__(self) -> str:
        secret = "***" if self.client_secret else "''"
        return f"GraphSettings(tenant_id={self.tenant_id!r}, client_secret={secret}, ...)"

    @classmethod
    def from_config(cls, config: Config) -> GraphSettings:
        """The values C{config} holds for this provider (defaults for the rest).

        @raise TypeError: a value of the wrong type (only a Config built by
            hand can hold one: the parsers produce these types).
        """
        found = config.provider_settings

        def value(name: str) -> object:
            attr = f"graph_{name}"
            return found[attr] if attr in found else _DEFAULTS[attr]

        senders = value("sender")
        if not isinstance(senders, tuple) or not all(isinstance(s, str) for s in senders):
            raise TypeError("graph setting sender: not a tuple of addresses")
        timeout = value("send_timeout")
        if not isinstance(timeout, int | float):
            raise TypeError("graph setting send_timeout: not a number")
        concurrency = value("max_concurrency")
        if not isinstance(concurrency, int):
            raise TypeError("graph setting max_concurrency: not a whole number")
        return cls(
            tenant_id=_text(value("tenant_id"), "tenant_id"),
            client_id=_text(value("client_id"), "client_id"),
            client_secret=_text(value("client_secret"), "client_secret"),
            sender=tuple(str(s) for s in senders),
            authority_host=_text(value("authority_host"), "authority_host"),
            endpoint=_text(value("endpoint"), "endpoint"),
            send_mode=_text(value("send_mode"), "send_mode"),
            send_timeout=float(timeout),
            max_concurrency=concurrency,
        )


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"graph setting {name}: not text")
    return value
