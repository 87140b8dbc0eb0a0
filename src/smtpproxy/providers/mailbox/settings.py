"""The mailbox provider's settings: declared here, registered with L{smtpproxy.config}.

The mailbox is a development tool, so none of its settings chooses it: it
runs only with C{PROVIDER=mailbox}, and stdout stays the zero-config default.
Values come back typed through L{MailboxSettings}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from smtpproxy.config import (
    Config,
    ConfigError,
    Setting,
    SettingGroup,
    parse_positive_int,
    parse_text,
)
from smtpproxy.policy.rules import DEFAULT_PRIVATE_NETWORKS, Networks, parse_networks
from smtpproxy.providers.mailbox.chaos import Triggers, parse_triggers


def _networks(raw: str) -> Networks:
    """Who may open the mailbox; empty means the default (loopback and private ranges)."""
    return parse_networks(raw) or DEFAULT_PRIVATE_NETWORKS


def _release_provider(raw: str) -> str:
    value = raw.strip().lower()
    if value == "mailbox":
        raise ValueError("the mailbox cannot release into itself; name graph or smtp")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "MAILBOX_MAX_MESSAGES",
        "mailbox_max_messages",
        parse_positive_int,
        "messages the mailbox keeps (PROVIDER=mailbox); the oldest go first",
        1000,
    ),
    Setting(
        "MAILBOX_MAX_BYTES",
        "mailbox_max_bytes",
        parse_positive_int,
        "bytes of mail the mailbox keeps; the oldest go first",
        104_857_600,
    ),
    Setting(
        "MAILBOX_PATH",
        "mailbox_path",
        parse_text,
        "SQLite file that keeps the mailbox across restarts (default: memory only)",
        "",
    ),
    Setting(
        "MAILBOX_ALLOWED_NETWORKS",
        "mailbox_allowed_networks",
        _networks,
        "networks that may open the mailbox page and API (default: loopback and private)",
        DEFAULT_PRIVATE_NETWORKS,
    ),
    Setting("MAILBOX_USERNAME", "mailbox_username", parse_text, "basic auth user", ""),
    Setting(
        "MAILBOX_PASSWORD",
        "mailbox_password",
        lambda raw: raw,
        "basic auth password",
        "",
        secret=True,
    ),
    Setting(
        "MAILBOX_RELEASE_PROVIDER",
        "mailbox_release_provider",
        _release_provider,
        "provider (graph, smtp) that releases captured mail to real recipients",
        "",
    ),
    Setting(
        "MAILBOX_CHAOS",
        "mailbox_chaos",
        parse_triggers,
        "refuse a share of transactions: stage=code:percent, e.g. recipient=451:20",
        Triggers(),
    ),
    Setting(
        "MAILBOX_MAX_EVENT_CLIENTS",
        "mailbox_max_event_clients",
        parse_positive_int,
        "browsers following the mailbox live at once",
        20,
    ),
)

_ATTRS = {setting.attr for setting in SETTINGS}


def configured(values: Mapping[str, object]) -> bool:
    """Never chosen by its settings alone; half of basic auth is an error."""
    user, password = values.get("mailbox_username"), values.get("mailbox_password")
    if bool(user) != bool(password):
        missing = "MAILBOX_PASSWORD" if user else "MAILBOX_USERNAME"
        raise ConfigError(f"{missing}: must be set together with the other for basic auth")
    if values.get("provider") == "mailbox" and values.get("http_listen", "tcp:8080") == "":
        raise ConfigError("HTTP_LISTEN: PROVIDER=mailbox shows its mail there; it cannot be off")
    release = values.get("mailbox_release_provider")
    if release and values.get("provider") == "mailbox":
        # Checked here, where the registry is complete, not in the parser.
        from smtpproxy import providers

        if release not in providers.names():
            raise ConfigError(
                f"MAILBOX_RELEASE_PROVIDER: unknown provider {release!r}; "
                f"choose one of {', '.join(n for n in providers.names() if n != 'mailbox')}"
            )
    return False


SETTINGS_GROUP = SettingGroup("mailbox", SETTINGS, configured)
_DEFAULTS: Mapping[str, object] = {setting.attr: setting.default for setting in SETTINGS}


@dataclass(frozen=True, slots=True)
class MailboxSettings:
    """The mailbox settings, typed; no defaults of their own (see L{SETTINGS})."""

    max_messages: int
    max_bytes: int
    path: str
    allowed_networks: Networks
    username: str
    password: str
    release_provider: str
    chaos: Triggers
    max_event_clients: int

    def __repr__(self) -> str:
        secret = "***" if self.password else "''"
        return (
            f"MailboxSettings(max_messages={self.max_messages}, max_bytes={self.max_bytes}, "
            f"path={self.path!r}, username={self.username!r}, password={secret}, ...)"
        )

    @classmethod
    def from_config(cls, config: Config) -> MailboxSettings:
        """The values C{config} holds for this provider (defaults for the rest).

        @raise TypeError: a value of the wrong type (only a Config built by
            hand can hold one: the parsers produce these types).
        """
        found = config.provider_settings

        def value(name: str, kind: type | tuple[type, ...]) -> object:
            attr = f"mailbox_{name}"
            got = found[attr] if attr in found else _DEFAULTS[attr]
            if not isinstance(got, kind) or (kind is int and isinstance(got, bool)):
                raise TypeError(f"mailbox setting {name}: wrong type {type(got).__name__}")
            return got

        def number(name: str) -> int:
            got = value(name, int)
            assert isinstance(got, int)
            return got

        found_networks = value("allowed_networks", tuple)
        assert isinstance(found_networks, tuple)
        networks = tuple(n for n in found_networks if isinstance(n, IPv4Network | IPv6Network))
        if len(networks) != len(found_networks):
            raise TypeError("mailbox setting allowed_networks: not a tuple of networks")
        chaos = value("chaos", Triggers)
        assert isinstance(chaos, Triggers)
        return cls(
            max_messages=number("max_messages"),
            max_bytes=number("max_bytes"),
            path=str(value("path", str)),
            allowed_networks=networks,
            username=str(value("username", str)),
            password=str(value("password", str)),
            release_provider=str(value("release_provider", str)),
            chaos=chaos,
            max_event_clients=number("max_event_clients"),
        )
