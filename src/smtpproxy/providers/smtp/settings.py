"""The upstream SMTP provider's settings: declared here, registered with L{smtpproxy.config}.

The names follow issue 15 (esmtpfa's relay settings).  They read like the
relay's own (C{RELAY_HOST} is C{relay: {host: ...}} in the YAML file) and
come back typed through L{RelaySettings}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from smtpproxy.addresses import mailbox_problem
from smtpproxy.config import (
    Config,
    ConfigError,
    Setting,
    SettingGroup,
    parse_choice,
    parse_positive_int,
    parse_seconds,
    parse_text,
)

TLS_MODES = ("starttls", "implicit", "none")

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[?[0-9A-Fa-f:.]+\]?")


def _host(raw: str) -> str:
    """A host name or an IP address (IPv6 with or without brackets); empty means unset."""
    value = raw.strip()
    if value and not _HOST.fullmatch(value):
        raise ValueError(f"{raw[:80]!r} is not a host name or address")
    return value.removeprefix("[").removesuffix("]")


def _port(raw: str) -> int:
    value = raw.strip()
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{raw[:20]!r} is not a port number")
    return int(value)


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw[:20]!r}")


def _sender(raw: str) -> str:
    """An address (C{RELAY_FROM}); empty means the client's own sender goes upstream."""
    value = raw.strip().removeprefix("<").removesuffix(">")
    if value and mailbox_problem(value) is not None:
        raise ValueError(f"{raw[:80]!r} is not an address")
    return value


def _helo(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        raise ValueError(f"{raw[:80]!r} is not a host name")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("RELAY_HOST", "relay_host", _host, "upstream SMTP server (PROVIDER=smtp)", ""),
    Setting("RELAY_PORT", "relay_port", _port, "upstream SMTP port", 587),
    Setting(
        "RELAY_TLS",
        "relay_tls",
        parse_choice(TLS_MODES),
        "starttls (required, never plaintext), implicit (port 465) or none",
        "starttls",
    ),
    Setting("RELAY_USERNAME", "relay_username", parse_text, "upstream AUTH user", ""),
    Setting(
        "RELAY_PASSWORD",
        "relay_password",
        lambda raw: raw,
        "upstream AUTH password",
        "",
        secret=True,
    ),
    Setting(
        "RELAY_CA_FILE",
        "relay_ca_file",
        parse_text,
        "PEM file of CAs the upstream's certificate must chain to (default: the system's)",
        "",
    ),
    Setting(
        "RELAY_TLS_VERIFY",
        "relay_tls_verify",
        _flag,
        "check the upstream's certificate and host name",
        True,
    ),
    Setting(
        "RELAY_CLIENT_CERT_FILE",
        "relay_client_cert_file",
        parse_text,
        "PEM client certificate shown to the upstream",
        "",
    ),
    Setting(
        "RELAY_CLIENT_KEY_FILE",
        "relay_client_key_file",
        parse_text,
        "PEM private key of RELAY_CLIENT_CERT_FILE",
        "",
    ),
    Setting(
        "RELAY_MAX_CONNECTIONS",
        "relay_max_connections",
        parse_positive_int,
        "connections to the upstream at once (kept open and reused)",
        10,
    ),
    Setting(
        "RELAY_TIMEOUT",
        "relay_timeout",
        parse_seconds,
        "seconds to wait for each upstream reply (and to connect)",
        60.0,
    ),
    Setting(
        "RELAY_FROM",
        "relay_from",
        _sender,
        "forced envelope sender and From; the client's From kept as Reply-To",
        "",
    ),
    Setting(
        "RELAY_HELO",
        "relay_helo",
        _helo,
        "name sent in EHLO (default: SMTP_HOSTNAME)",
        "",
    ),
)


def configured(values: Mapping[str, object]) -> bool:
    """Is an upstream given?  Half a configuration is an error, not stdout mode."""
    host = values.get("relay_host")
    user, password = values.get("relay_username"), values.get("relay_password")
    if bool(user) != bool(password):
        missing = "RELAY_PASSWORD" if user else "RELAY_USERNAME"
        raise ConfigError(f"{missing}: must be set together with the other to log in upstream")
    cert, key = values.get("relay_client_cert_file"), values.get("relay_client_key_file")
    if bool(cert) != bool(key):
        missing = "RELAY_CLIENT_KEY_FILE" if cert else "RELAY_CLIENT_CERT_FILE"
        raise ConfigError(f"{missing}: must be set together with the other")
    if values.get("provider") == "smtp" and not host:
        raise ConfigError("PROVIDER: smtp needs RELAY_HOST")
    if not host and any(values.get(s.attr) for s in SETTINGS if s.env != "RELAY_HOST"):
        raise ConfigError("RELAY_HOST: the RELAY_* settings need an upstream host")
    return bool(host)


SETTINGS_GROUP = SettingGroup("smtp", SETTINGS, configured)
_DEFAULTS: Mapping[str, object] = {setting.attr: setting.default for setting in SETTINGS}


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """The upstream settings, typed; no defaults of their own (see L{SETTINGS})."""

    host: str
    port: int
    tls: str
    username: str
    password: str
    ca_file: str
    tls_verify: bool
    client_cert_file: str
    client_key_file: str
    max_connections: int
    timeout: float
    helo: str
    sender: str = ""
    """C{RELAY_FROM}: empty to relay the client's sender and From as they are."""

    def __repr__(self) -> str:
        secret = "***" if self.password else "''"
        return (
            f"RelaySettings(host={self.host!r}, port={self.port}, tls={self.tls!r}, "
            f"username={self.username!r}, password={secret}, ...)"
        )

    @classmethod
    def from_config(cls, config: Config) -> RelaySettings:
        """The values C{config} holds for this provider (defaults for the rest).

        @raise TypeError: a value of the wrong type (only a Config built by
            hand can hold one: the parsers produce these types).
        """
        found = config.provider_settings

        def value(name: str, kind: type | tuple[type, ...]) -> object:
            attr = f"relay_{name}"
            got = found[attr] if attr in found else _DEFAULTS[attr]
            if not isinstance(got, kind) or (kind is int and isinstance(got, bool)):
                raise TypeError(f"smtp setting {name}: wrong type {type(got).__name__}")
            return got

        def text(name: str) -> str:
            return str(value(name, str))

        timeout = value("timeout", (int, float))
        assert isinstance(timeout, int | float)
        port = value("port", int)
        connections = value("max_connections", int)
        assert isinstance(port, int) and isinstance(connections, int)
        return cls(
            host=text("host"),
            port=port,
            tls=text("tls"),
            username=text("username"),
            password=text("password"),
            ca_file=text("ca_file"),
            tls_verify=bool(value("tls_verify", bool)),
            client_cert_file=text("client_cert_file"),
            client_key_file=text("client_key_file"),
            max_connections=connections,
            timeout=float(timeout),
            helo=text("helo") or config.smtp_hostname or "localhost",
            sender=text("from"),
        )
