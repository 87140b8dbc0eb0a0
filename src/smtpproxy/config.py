"""Settings: environment variables first, an optional YAML file underneath.

Everything here is pure: L{load} takes the environment as a mapping and the
YAML text as a string, so every rule is tested without touching the process
environment or the file system.  A bad value raises L{ConfigError} whose
message names the setting, because an operator reading one line on a
failed start must know what to fix.

Each setting has an environment name (C{SMTP_LISTEN}) and a YAML path derived
from it: the part before the first underscore is the section, the rest the
key in lower case (C{smtp: {listen: ...}}).  Settings without an underscore
(C{PROVIDER}) are top-level YAML keys.

This module declares the relay's own settings.  A provider declares its own
(C{smtpproxy.providers.graph.settings}) and hands them over with
L{register_settings} when the providers package loads it, so this module
names no provider setting; the parser, C{--help} and the operator guide's
table all read L{settings}, the one list of both.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from smtpproxy.policy import rules as policy
from smtpproxy.queue.url import parse_queue_url
from smtpproxy.web.api.keys import ApiKey, parse_env_keys
from smtpproxy.web.hosts import parse_allowed_hosts


class ConfigError(Exception):
    """A setting is missing, malformed or contradicts another one."""


_ANY_ADDRESS = policy.AddressPatterns()


@dataclass(frozen=True, slots=True)
class Config:
    """The validated settings the service is built from."""

    smtp_listen: str = "tcp:2525"
    smtps_listen: str = ""
    smtp_hostname: str = ""
    smtp_default_domain: str = ""
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_allow_insecure_auth: bool = False
    smtp_max_message_size: int = 26_214_400
    smtp_spool_threshold: int = 1_048_576
    smtp_spool_dir: str = ""
    smtp_max_inflight_bytes: int = 268_435_456
    smtp_max_recipients: int = 500
    smtp_command_timeout: float = 300.0
    smtp_greeting_timeout: float = 30.0
    smtp_data_timeout: float = 600.0
    smtp_shutdown_timeout: float = 30.0
    smtp_shutdown_handover_grace: float = 1.5
    smtp_parse_timeout: float = 10.0
    smtp_allowed_networks: policy.Networks | None = None
    smtp_trusted_networks: policy.Networks = ()
    smtp_allowed_senders: policy.AddressPatterns = _ANY_ADDRESS
    smtp_allowed_recipients: policy.AddressPatterns = _ANY_ADDRESS
    smtp_max_connections: int = 1000
    smtp_max_connections_per_ip: int = 50
    smtp_rate_limit_per_ip: int = 0
    smtp_rate_limit_per_user: int = 0
    smtp_max_errors: int = 10
    smtp_max_refusals: int = 100
    smtp_auth_max_failures: int = 3
    smtp_auth_ban_failures: int = 10
    smtp_auth_ban_time: float = 600.0
    auth_config: str = ""
    queue_url: str = ""
    queue_max_bytes: int = 1_073_741_824
    queue_retry_min_interval: float = 60.0
    queue_retry_max_interval: float = 3600.0
    queue_max_age: float = 432_000.0
    queue_dead_retention: float = 604_800.0
    queue_concurrency: int = 20
    queue_lease_time: float = 300.0
    http_listen: str = "tcp:8080"
    http_max_connections: int = 64
    http_request_timeout: float = 10.0
    http_allowed_networks: policy.Networks = policy.DEFAULT_PRIVATE_NETWORKS
    http_trusted_proxies: policy.Networks = ()
    http_allowed_hosts: tuple[str, ...] = ()
    http_tls_cert_file: str = ""
    http_tls_key_file: str = ""
    http_api_keys: tuple[ApiKey, ...] = ()
    http_api_keys_file: str = ""
    http_api_rate_limit_per_min: int = 600
    http_api_rate_limit_per_ip: int = 120
    http_api_rate_limit_per_key: int = 120
    tls_cert_file: str = ""
    tls_key_file: str = ""
    log_level: str = "info"
    provider: str = "stdout"
    stdout_format: str = "text"
    # Values of the settings providers declare (L{register_settings}), by
    # attribute name.  A provider reads them typed (the Graph provider through
    # its GraphSettings); attribute access (config.graph_sender) is for tests.
    provider_settings: Mapping[str, object] = field(default_factory=dict)
    # Not a setting: (setting, what happened) for each value load() had to
    # fall back on, logged as warnings once logging has started.
    startup_warnings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, **values: Any) -> Config:
        """A Config from keyword values, where provider settings are named like the rest.

        @raise TypeError: for a name that is neither a field nor a registered setting.
        """
        own = {f.name for f in fields(cls)}
        declared = {s.attr for s in settings()}
        extra = {name: values.pop(name) for name in list(values) if name not in own}
        unknown = sorted(set(extra) - declared)
        if unknown:
            raise TypeError(f"Config has no setting {', '.join(unknown)}")
        return cls(**values, provider_settings=extra)

    def __getattr__(self, name: str) -> object:
        # Only reached when no field matched: a provider's setting, set or default.
        if not name.startswith("_"):
            if name in self.provider_settings:
                return self.provider_settings[name]
            for setting in _registered_settings():
                if setting.attr == name:
                    return setting.default
        raise AttributeError(name)

    @property
    def auth_enabled(self) -> bool:
        # AUTH_CONFIG: identity providers (smtpproxy.identities) enable it too.
        return bool(self.smtp_username) or bool(self.auth_config)

    @property
    def allowed_networks(self) -> policy.Networks:
        """Networks that may connect: as configured, else by AUTH state.

        Unset, a relay without AUTH serves loopback and private networks
        only (zero-config Docker and LAN use work; the internet cannot
        relay), and a relay with AUTH lets anyone try to authenticate.
        """
        if self.smtp_allowed_networks is not None:
            return self.smtp_allowed_networks
        if self.auth_enabled:
            return policy.parse_networks("0.0.0.0/0 ::/0")
        return policy.DEFAULT_PRIVATE_NETWORKS

    def __repr__(self) -> str:
        # Never let a secret reach a log line or a traceback by way of repr().
        shown = []
        secrets = _SECRETS | {s.attr for s in _registered_settings() if s.secret}
        named = [f.name for f in fields(self) if f.name != "provider_settings"]
        for name in [*named, *self.provider_settings]:
            value = getattr(self, name)
            if name in secrets and value:
                value = "***"
            shown.append(f"{name}={value!r}")
        return f"Config({', '.join(shown)})"


_SECRETS = frozenset({"smtp_password", "http_api_keys"})
_LOG_LEVELS = ("debug", "info", "warn", "error")
STDOUT_FORMATS = ("text", "json")
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "haproxy", "systemd")
_ADDR_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


# --- value parsers: each takes the raw text and returns the typed value or
# raises ValueError with a short reason (the setting name is added later).


def _text(raw: str) -> str:
    return raw.strip()


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"must be greater than zero, got {value}")
    return value


def _count(raw: str) -> int:
    """A whole number where 0 means "no limit"."""
    try:
        value = int(raw.strip().replace("_", "") or "0")
    except ValueError:
        raise ValueError(f"expected a whole number (0 = no limit), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"must be 0 (no limit) or more, got {value}")
    return value


def _queue_url(raw: str) -> str:
    """Empty (direct mode), C{sqlite:///path} or C{postgresql://...}."""
    text = raw.strip()
    parse_queue_url(text)  # ValueError, saying which forms are read
    return text


def _number(raw: str, expected: str) -> float:
    """A number of seconds, an "s" allowed after it; C{expected} says what is wanted."""
    try:
        return float(raw.strip().lower().removesuffix("s"))
    except ValueError:
        raise ValueError(f"expected {expected}, got {raw!r}") from None


def _seconds(raw: str) -> float:
    value = _number(raw, "a number of seconds")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value


#: The longest SMTP_SHUTDOWN_HANDOVER_GRACE: a stop must stay bounded.
MAX_HANDOVER_GRACE = 60.0


def _handover_grace(raw: str) -> float:
    """Seconds from 0 (do not wait) to L{MAX_HANDOVER_GRACE}, an "s" allowed after them."""
    value = _number(raw, "0 to 60 seconds")
    if not 0 <= value <= MAX_HANDOVER_GRACE:
        raise ValueError(f"must be 0 to 60 seconds, got {raw!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value == "warning":
            value = "warn"
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError(f"expected an http(s) URL, got {raw!r}")
    return value


def _addresses(raw: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in re.split(r"[,\s]+", raw) if part.strip())
    for value in values:
        if not _ADDR_RE.match(value):
            raise ValueError(f"{value!r} is not an email address")
    return values


def _hostname(raw: str) -> str:
    value = raw.strip()
    if value and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", value):
        raise ValueError(f"{raw!r} is not a host name")
    return value


def listen_endpoint(raw: str, *, allow_empty: bool = False) -> str:
    """Turn a listen value into a Twisted server endpoint description.

    Accepts C{:2525}, C{2525}, C{host:2525}, C{[::1]:2525} and endpoint strings
    such as C{tcp:2525:interface=127.0.0.1} or C{haproxy:tcp:2525}.
    """
    value = raw.strip()
    if not value:
        if allow_empty:
            return ""
        raise ValueError("must not be empty")
    kind = value.split(":", 1)[0]
    if kind in _ENDPOINT_TYPES:
        return value
    if value.isdigit():
        return f"tcp:{_port(value)}"
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", value)
    if match:
        host, port = match.groups()
        _ip(host, version=6)
        return f"tcp6:{_port(port)}:interface={host.replace(':', chr(92) + ':')}"
    host, sep, port = value.rpartition(":")
    if not sep or ":" in host:
        raise ValueError(f"expected :PORT, HOST:PORT, [IPv6]:PORT or an endpoint, got {raw!r}")
    if not host:
        return f"tcp:{_port(port)}"
    if re.fullmatch(r"[0-9.]+", host):
        _ip(host, version=4)
    elif not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(f"{host!r} is not a host name or address")
    return f"tcp:{_port(port)}:interface={host}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number")
    return int(text)


def _ip(text: str, version: int) -> None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if address.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value: where it is read from and how it is checked."""

    env: str
    attr: str
    parse: Callable[[str], object]
    help: str
    # Used for provider settings only; the relay's own take theirs from Config.
    default: object = None
    secret: bool = False
    # Other environment names for the same value, read when C{env} is unset
    # (the lower-case C{https_proxy} that many hosts set instead).
    aliases: tuple[str, ...] = ()

    @property
    def yaml_path(self) -> tuple[str, ...]:
        section, sep, key = self.env.lower().partition("_")
        return (section, key) if sep else (section,)


SETTINGS: tuple[Setting, ...] = (
    Setting("SMTP_LISTEN", "smtp_listen", listen_endpoint, "SMTP listen address"),
    Setting(
        "SMTPS_LISTEN",
        "smtps_listen",
        lambda raw: listen_endpoint(raw, allow_empty=True),
        "implicit-TLS SMTP listen address (port 465); empty disables",
    ),
    Setting("SMTP_HOSTNAME", "smtp_hostname", _hostname, "name in the greeting (default: FQDN)"),
    Setting(
        "SMTP_DEFAULT_DOMAIN",
        "smtp_default_domain",
        _hostname,
        "domain for bare local parts such as root (default: GRAPH_SENDER's domain)",
    ),
    Setting("SMTP_USERNAME", "smtp_username", _text, "SMTP AUTH user; enables AUTH"),
    Setting("SMTP_PASSWORD", "smtp_password", lambda raw: raw, "SMTP AUTH password"),
    Setting(
        "SMTP_ALLOW_INSECURE_AUTH",
        "smtp_allow_insecure_auth",
        _boolean,
        "offer AUTH before STARTTLS",
    ),
    Setting("SMTP_MAX_MESSAGE_SIZE", "smtp_max_message_size", _positive_int, "bytes per message"),
    Setting(
        "SMTP_SPOOL_THRESHOLD",
        "smtp_spool_threshold",
        _positive_int,
        "body bytes kept in memory before a message is spooled to disk",
    ),
    Setting(
        "SMTP_SPOOL_DIR",
        "smtp_spool_dir",
        _text,
        "directory for spooled bodies (default: the system temp dir)",
    ),
    Setting(
        "SMTP_MAX_INFLIGHT_BYTES",
        "smtp_max_inflight_bytes",
        _positive_int,
        "body bytes in memory across all sessions before new DATA spools at once",
    ),
    Setting("SMTP_MAX_RECIPIENTS", "smtp_max_recipients", _positive_int, "RCPT per message"),
    Setting("SMTP_COMMAND_TIMEOUT", "smtp_command_timeout", _seconds, "idle seconds per command"),
    Setting(
        "SMTP_GREETING_TIMEOUT",
        "smtp_greeting_timeout",
        _seconds,
        "idle seconds before the first command (5 s while nearly full)",
    ),
    Setting("SMTP_DATA_TIMEOUT", "smtp_data_timeout", _seconds, "idle seconds inside DATA"),
    Setting(
        "SMTP_SHUTDOWN_TIMEOUT",
        "smtp_shutdown_timeout",
        _seconds,
        "seconds in-flight mail may take at shutdown",
    ),
    Setting(
        "SMTP_SHUTDOWN_HANDOVER_GRACE",
        "smtp_shutdown_handover_grace",
        _handover_grace,
        "direct mode, past the shutdown timeout: seconds (0 to 60) a send the provider "
        "already handed over gets to bring its answer",
    ),
    Setting(
        "SMTP_PARSE_TIMEOUT",
        "smtp_parse_timeout",
        _seconds,
        "seconds parsing one message may take before it is given up",
    ),
    Setting(
        "SMTP_ALLOWED_NETWORKS",
        "smtp_allowed_networks",
        policy.parse_networks,
        "CIDRs that may connect (default: private nets without AUTH, all with AUTH)",
    ),
    Setting(
        "SMTP_TRUSTED_NETWORKS",
        "smtp_trusted_networks",
        policy.parse_networks,
        "CIDRs that may relay without AUTH when AUTH is on",
    ),
    Setting(
        "SMTP_ALLOWED_SENDERS",
        "smtp_allowed_senders",
        policy.parse_address_patterns,
        "MAIL FROM addresses or @domains allowed (default: any)",
    ),
    Setting(
        "SMTP_ALLOWED_RECIPIENTS",
        "smtp_allowed_recipients",
        policy.parse_address_patterns,
        "RCPT TO addresses or @domains allowed (default: any)",
    ),
    Setting("SMTP_MAX_CONNECTIONS", "smtp_max_connections", _count, "open sessions in total"),
    Setting(
        "SMTP_MAX_CONNECTIONS_PER_IP",
        "smtp_max_connections_per_ip",
        _count,
        "open sessions per client address",
    ),
    Setting(
        "SMTP_RATE_LIMIT_PER_IP",
        "smtp_rate_limit_per_ip",
        _count,
        "messages per minute per client address (0 = off)",
    ),
    Setting(
        "SMTP_RATE_LIMIT_PER_USER",
        "smtp_rate_limit_per_user",
        _count,
        "messages per minute per AUTH user (0 = off)",
    ),
    Setting("SMTP_MAX_ERRORS", "smtp_max_errors", _positive_int, "bad commands before 421"),
    Setting(
        "SMTP_MAX_REFUSALS",
        "smtp_max_refusals",
        _positive_int,
        "policy refusals (550/450/530) without a delivered message before 421",
    ),
    Setting(
        "SMTP_AUTH_MAX_FAILURES",
        "smtp_auth_max_failures",
        _positive_int,
        "failed AUTH per connection before 421",
    ),
    Setting(
        "SMTP_AUTH_BAN_FAILURES",
        "smtp_auth_ban_failures",
        _positive_int,
        "failed AUTH per address within the ban time that block it",
    ),
    Setting(
        "SMTP_AUTH_BAN_TIME",
        "smtp_auth_ban_time",
        _seconds,
        "seconds an address stays blocked (and the counting window)",
    ),
    Setting(
        "QUEUE_URL",
        "queue_url",
        _queue_url,
        "durable queue: empty (deliver directly), sqlite:///path or postgresql://...",
        secret=True,
    ),
    Setting(
        "QUEUE_MAX_BYTES",
        "queue_max_bytes",
        _positive_int,
        "bytes of queued mail past which new mail is answered 452",
    ),
    Setting(
        "QUEUE_RETRY_MIN_INTERVAL",
        "queue_retry_min_interval",
        _seconds,
        "seconds before the first retry of a temporary failure",
    ),
    Setting(
        "QUEUE_RETRY_MAX_INTERVAL",
        "queue_retry_max_interval",
        _seconds,
        "longest wait between retries (the back-off doubles up to it)",
    ),
    Setting(
        "QUEUE_MAX_AGE",
        "queue_max_age",
        _seconds,
        "seconds a message may stay queued before it is given up (dead)",
    ),
    Setting(
        "QUEUE_DEAD_RETENTION",
        "queue_dead_retention",
        _seconds,
        "seconds a dead message is kept with its history",
    ),
    Setting(
        "QUEUE_CONCURRENCY",
        "queue_concurrency",
        _positive_int,
        "deliveries this process runs at once from the queue",
    ),
    Setting(
        "QUEUE_LEASE_TIME",
        "queue_lease_time",
        _seconds,
        "seconds a worker holds a message; a crashed holder's lease expires",
    ),
    Setting(
        "HTTP_LISTEN",
        "http_listen",
        lambda raw: listen_endpoint(raw, allow_empty=True),
        "HTTP listener address (health, readiness, metrics); empty disables",
    ),
    Setting(
        "HTTP_MAX_CONNECTIONS",
        "http_max_connections",
        _positive_int,
        "open HTTP connections in total; more are closed at once",
    ),
    Setting(
        "HTTP_REQUEST_TIMEOUT",
        "http_request_timeout",
        _seconds,
        "seconds from a request's first byte to its last; arriving bytes do not extend it",
    ),
    Setting(
        "HTTP_ALLOWED_NETWORKS",
        "http_allowed_networks",
        policy.parse_networks,
        "CIDRs whose clients may use any HTTP path (default: loopback and private nets)",
    ),
    Setting(
        "HTTP_TRUSTED_PROXIES",
        "http_trusted_proxies",
        policy.parse_networks,
        "CIDRs of proxies whose X-Forwarded-For names the client (default: none)",
    ),
    Setting(
        "HTTP_ALLOWED_HOSTS",
        "http_allowed_hosts",
        parse_allowed_hosts,
        "host names the mailbox answers besides IP addresses and localhost (DNS rebinding)",
    ),
    Setting(
        "HTTP_TLS_CERT_FILE",
        "http_tls_cert_file",
        _text,
        "PEM certificate (chain) to serve HTTPS on HTTP_LISTEN; empty: plain HTTP",
    ),
    Setting("HTTP_TLS_KEY_FILE", "http_tls_key_file", _text, "PEM private key for HTTPS"),
    Setting(
        "HTTP_API_KEYS",
        "http_api_keys",
        parse_env_keys,
        "submission API keys, id:secret pairs (secrets of 32+ characters); none: API off",
        secret=True,
    ),
    Setting(
        "HTTP_API_KEYS_FILE",
        "http_api_keys_file",
        _text,
        "YAML file of API keys by SHA-256 digest, with per-key policy; read again on SIGHUP",
    ),
    Setting(
        "HTTP_API_RATE_LIMIT_PER_MIN",
        "http_api_rate_limit_per_min",
        _count,
        "API requests per minute in total (0 = off)",
    ),
    Setting(
        "HTTP_API_RATE_LIMIT_PER_IP",
        "http_api_rate_limit_per_ip",
        _count,
        "API requests per minute per client address, keyed or not (0 = off)",
    ),
    Setting(
        "HTTP_API_RATE_LIMIT_PER_KEY",
        "http_api_rate_limit_per_key",
        _count,
        "API requests per minute per key without its own rate_limit_per_min (0 = off)",
    ),
    Setting("TLS_CERT_FILE", "tls_cert_file", _text, "PEM certificate (chain) for STARTTLS"),
    Setting("TLS_KEY_FILE", "tls_key_file", _text, "PEM private key for STARTTLS"),
    Setting("LOG_LEVEL", "log_level", _choice(_LOG_LEVELS), "debug, info, warn or error"),
    Setting(
        "AUTH_CONFIG",
        "auth_config",
        _text,
        "identity providers file (YAML or JSON, docs/identities.md); enables AUTH",
    ),
    Setting("PROVIDER", "provider", _text, "provider name (default: chosen from settings)"),
    Setting(
        "STDOUT_FORMAT",
        "stdout_format",
        _choice(STDOUT_FORMATS),
        "stdout provider output: text (framed blocks) or json (one object per line)",
    ),
)


@dataclass(frozen=True, slots=True)
class SettingGroup:
    """The settings one provider declares, and its rule for when it is configured.

    @ivar configured: given the parsed values (by attribute), whether the
        provider has what it needs; raises L{ConfigError} when the values
        are half there or contradict C{PROVIDER}.
    """

    provider: str
    settings: tuple[Setting, ...]
    configured: Callable[[Mapping[str, object]], bool]


_groups: dict[str, SettingGroup] = {}


def register_settings(group: SettingGroup) -> None:
    """Add a provider's settings to the environment, the YAML file and C{--help}."""
    _groups[group.provider] = group


def _registered_settings() -> tuple[Setting, ...]:
    return tuple(s for group in _groups.values() for s in group.settings)


def settings() -> tuple[Setting, ...]:
    """Every setting: the relay's own (L{SETTINGS}) and those of every provider found."""
    # Imported here: the providers package imports this module.
    from smtpproxy import providers

    providers.names()
    return SETTINGS + _registered_settings()


CONFIG_FILE_ENV = "SMTP_PROXY_CONFIG"

# Environment variables starting with one of these belong to the relay: one
# that names no setting is a typo (SMTP_LISTN) or a setting of another
# version, and is refused rather than silently ignored.  Prefixes without
# settings yet are reserved for settings to come.
ENV_PREFIXES = (
    "SMTP_",
    "SMTPS_",
    "GRAPH_",
    "HTTP_",
    "TLS_",
    "QUEUE_",
    "RELAY_",
    "AUTH_",
    "MAILBOX_",
    "STDOUT_",
)
# Names with those prefixes that are set for good reasons and are no typo:
# the config file variable, and the proxy variable many hosts set for every
# process (Graph and Entra are HTTPS only: HTTPS_PROXY applies, HTTP_PROXY never).
_NOT_SETTINGS = frozenset({CONFIG_FILE_ENV, "HTTP_PROXY"})
# What Kubernetes (service links: RELAY_SERVICE_HOST, RELAY_PORT_25_TCP_ADDR
# ...) and Docker's legacy links (RELAY_NAME, RELAY_ENV_X) set for another
# container or service called "relay", "smtp" or "graph".  A bare X_PORT is
# theirs only when it holds their proto://address:port form: SMTP_PORT=25
# is the kind of guess this check is for.
_PLATFORM_NAME = re.compile(
    r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_[0-9]+_(TCP|UDP|SCTP)"
    r"(_ADDR|_PORT|_PROTO)?|ENV_[A-Za-z0-9_]+)"
)
# However many there are, the error stays one readable line.
_LISTED_UNKNOWN = 5
_PLATFORM_VALUE = {"_PORT": re.compile(r"(tcp|udp|sctp)://\S+"), "_NAME": re.compile(r"/\S+")}


# Tags PyYAML's safe resolver gives plain scalars.  A number or boolean
# setting takes any of them, as the text written; a text setting only text.
_YAML = "tag:yaml.org,2002:"
_YAML_KINDS = {
    f"{_YAML}str": "text",
    f"{_YAML}int": "a number",
    f"{_YAML}float": "a number",
    f"{_YAML}bool": "a boolean",
    f"{_YAML}null": "null",
    f"{_YAML}timestamp": "a date",
}


def _typed_settings() -> frozenset[str]:
    """Settings whose value is a number or a boolean (by their default), so unquoted is fine."""
    defaults = {f.name: f.default for f in fields(Config)}
    defaults.update((s.attr, s.default) for s in _registered_settings())
    return frozenset(s.env for s in settings() if type(defaults.get(s.attr)) in (int, float, bool))


def _flatten_yaml(text: str, source: str) -> dict[str, str]:
    """Read YAML into C{{ENV_NAME: text}}; unknown keys are errors, not typos to ignore.

    The document is composed, not constructed: each value is the text the
    operator wrote (C{node.value}), read afterwards by the same parser as the
    environment variable.  YAML 1.1 would silently turn an unquoted
    C{012345} into 5349, C{12:30:00} into 45000 and C{yes} into True; for a
    text setting such a value is refused with a hint to quote it, and for a
    number or boolean setting the written text is what gets parsed.
    """
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    if document is None or document.tag == f"{_YAML}null":
        return {}
    if not isinstance(document, yaml.MappingNode):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    by_path = {s.yaml_path: s for s in settings()}
    by_env = {s.env: s for s in settings()}
    typed = _typed_settings()
    sections = {path[0] for path in by_path if len(path) == 2}
    found: dict[str, str] = {}

    def key_of(node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise ConfigError(f"{source} line {node.start_mark.line + 1}: expected a setting name")
        return str(node.value)

    def take(path: tuple[str, ...], node: yaml.Node) -> None:
        setting = by_path.get(path)
        if setting is None:
            close = _closest("_".join(path).upper(), by_env)
            hint = f" (did you mean {'.'.join(by_env[close].yaml_path)}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {'.'.join(path)!r}{hint}")
        if isinstance(node, yaml.SequenceNode):
            items = [scalar(setting, path, item) for item in node.value]
            found[setting.env] = ",".join(items)
        else:
            found[setting.env] = scalar(setting, path, node)

    def scalar(setting: Setting, path: tuple[str, ...], node: yaml.Node) -> str:
        name = ".".join(path)
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            raise ConfigError(f"{source}: {name} must be a single value (line {line})")
        kind = _YAML_KINDS.get(node.tag)
        value = str(node.value)
        if kind is None:
            raise ConfigError(f"{setting.env}: {source} line {line}: tag {node.tag} is not allowed")
        if kind == "text" or setting.env in typed or (kind == "null" and not value):
            return value
        # Never echo the value: it may be a password.
        raise ConfigError(
            f"{setting.env}: {source} line {line} ({name}): YAML reads this unquoted value as "
            f"{kind}, not as the text written; put it in quotes to keep it as written"
        )

    for key_node, value_node in document.value:
        key = key_of(key_node)
        if key in sections:
            if not isinstance(value_node, yaml.MappingNode):
                raise ConfigError(f"{source}: {key} must be a mapping")
            for subkey_node, subvalue_node in value_node.value:
                take((key, key_of(subkey_node)), subvalue_node)
        else:
            take((key,), value_node)
    return found


def load(
    env: Mapping[str, str],
    yaml_text: str | None = None,
    yaml_source: str = "config file",
    fqdn: Callable[[], str] = socket.getfqdn,
) -> Config:
    """Build a L{Config} from the environment over an optional YAML document.

    @param fqdn: looked up only when no host name is configured, so that
        tests and import never touch DNS.
    @raise ConfigError: naming the first setting that is wrong.
    """
    _check_environment(env)
    raw: dict[str, str] = {}
    if yaml_text is not None:
        raw.update(_flatten_yaml(yaml_text, yaml_source))
    for setting in settings():
        if setting.env in env:
            raw[setting.env] = env[setting.env]
        for alias in setting.aliases:
            if alias not in env:
                continue
            if setting.env in env and env[setting.env] != env[alias]:
                # Never echo the values: a proxy URL may carry a password.
                raise ConfigError(f"{setting.env}: {alias} is set too, to another value; unset one")
            raw[setting.env] = env[alias]

    values: dict[str, object] = {}
    for setting in settings():
        if setting.env not in raw:
            continue
        try:
            values[setting.attr] = setting.parse(raw[setting.env])
        except ValueError as e:
            raise ConfigError(f"{setting.env}: {e}") from None

    _check_auth(values)
    _check_tls(values)
    _choose_provider(values)
    if not values.get("smtp_hostname"):
        values["smtp_hostname"], warning = system_hostname(fqdn)
        if warning:
            values["startup_warnings"] = (("SMTP_HOSTNAME", warning),)
    return Config.build(**values)


def system_hostname(fqdn: Callable[[], str]) -> tuple[str, str | None]:
    """The host name to greet with when C{SMTP_HOSTNAME} is unset, and a warning or None.

    The system's name is only a default: one that is not a valid DNS name
    (C{mail_relay01}; an underscore is common in container and VM names)
    must not stop the relay, so C{localhost} stands in and the operator is
    told how to choose a real one.
    """
    found = fqdn()
    try:
        name = _hostname(found)
    except ValueError:
        name = ""
    if name:
        return name, None
    shown = found if len(found) <= 80 else found[:77] + "..."
    return "localhost", (
        f"the system host name {shown!r} is not a valid DNS name: greeting as localhost; "
        "set SMTP_HOSTNAME to the name clients know this relay by"
    )


def _check_environment(env: Mapping[str, str]) -> None:
    """Refuse variables with a relay prefix that name no setting, suggesting the closest."""
    known = {s.env for s in settings()}
    unknown = sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIXES)
        and name not in known
        and name not in _NOT_SETTINGS
        and not _platform_variable(name, env[name])
    )
    if not unknown:
        return
    described = []
    for name in unknown[:_LISTED_UNKNOWN]:
        close = _closest(name, known)
        shown = _shown_name(name)
        described.append(f"{shown} (did you mean {close}?)" if close else shown)
    if len(unknown) > _LISTED_UNKNOWN:
        described.append(f"{len(unknown) - _LISTED_UNKNOWN} more")
    also = f"; also {', '.join(described[1:])}" if len(described) > 1 else ""
    these = "these environment variables" if also else "this environment variable"
    raise ConfigError(
        f"{described[0]}: no such setting in this version of smtpproxy{also}; fix or unset "
        f"{these} (twistd smtpproxy --help-settings lists every setting)"
    )


def _closest(name: str, known: Collection[str]) -> str | None:
    """The setting C{name} was probably meant to be, or None when none is close."""
    prefix, _, rest = name.partition("_")
    # Other tools take a port (SMTP_PORT=25); here the listen setting does,
    # and spelling alone would point at SMTP_PASSWORD.
    listen = f"{prefix}_LISTEN"
    if rest == "PORT" and listen in known:
        return listen
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
    return close[0] if close else None


def _platform_variable(name: str, value: str) -> bool:
    """Is C{name} one that Kubernetes or Docker links set for some other service?"""
    if _PLATFORM_NAME.fullmatch(name):
        return True
    for suffix, form in _PLATFORM_VALUE.items():
        if name.endswith(suffix) and form.fullmatch(value):
            return True
    return False


def _shown_name(name: str) -> str:
    """A variable name for an error line: printable and short (it may be anything)."""
    if name.isprintable() and len(name) <= 60:
        return name
    return repr(name[:57] + "..." if len(name) > 60 else name)


def _check_auth(values: Mapping[str, object]) -> None:
    user, password = values.get("smtp_username", ""), values.get("smtp_password", "")
    if bool(user) != bool(password):
        missing = "SMTP_PASSWORD" if user else "SMTP_USERNAME"
        raise ConfigError(f"{missing}: must be set together with the other to enable AUTH")


def _check_tls(values: Mapping[str, object]) -> None:
    for prefix in ("", "http_"):
        cert = values.get(f"{prefix}tls_cert_file", "")
        key = values.get(f"{prefix}tls_key_file", "")
        if bool(cert) != bool(key):
            missing = f"{prefix.upper()}TLS_KEY_FILE" if cert else f"{prefix.upper()}TLS_CERT_FILE"
            raise ConfigError(
                f"{missing}: must be set together with the other to use your certificate"
            )


def _choose_provider(values: dict[str, object]) -> None:
    # Every provider checks its own settings; the registry picks the default.
    from smtpproxy import providers

    configured = [name for name, group in _groups.items() if group.configured(values)]
    explicit = values.get("provider", "")  # PROVIDER's parser gives text
    values["provider"] = providers.choose(explicit if isinstance(explicit, str) else "", configured)


# The value parsers a provider's own settings may use (see register_settings).
parse_text = _text
parse_boolean = _boolean
parse_positive_int = _positive_int
parse_count = _count
parse_seconds = _seconds
parse_choice = _choice
parse_url = _url
parse_addresses = _addresses
