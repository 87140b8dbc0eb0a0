"""The Graph provider's settings: declared here, registered with L{smtpproxy.config}.

They are read from the environment and the YAML file, listed by C{--help} and
checked against the operator guide like the relay's own, and read back as
attributes of the L{smtpproxy.config.Config} (C{config.graph_sender}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from smtpproxy.config import (
    Config,
    ConfigError,
    Setting,
    SettingGroup,
    parse_addresses,
    parse_boolean,
    parse_choice,
    parse_count,
    parse_positive_int,
    parse_seconds,
    parse_text,
    parse_url,
)
from smtpproxy.providers.graph.budget import Limits

SEND_MODES = ("auto", "mime", "json")

# The credential kinds, each named by the setting that chooses it.
SECRET = "GRAPH_CLIENT_SECRET"  # noqa: S105 (a setting name)
CERTIFICATE = "GRAPH_CLIENT_CERTIFICATE_FILE"
FEDERATED = "AZURE_FEDERATED_TOKEN_FILE"
MANAGED = "GRAPH_MANAGED_IDENTITY"
CREDENTIALS = (SECRET, CERTIFICATE, FEDERATED, MANAGED)
_CREDENTIAL_ATTRS = {
    SECRET: "graph_client_secret",
    CERTIFICATE: "graph_client_certificate_file",
    FEDERATED: "azure_federated_token_file",
    MANAGED: "graph_managed_identity",
}
CREDENTIAL_NAMES = {
    SECRET: "client secret",
    CERTIFICATE: "client certificate",
    FEDERATED: "workload identity federation",
    MANAGED: "managed identity",
}
IMDS_ENDPOINT = "http://169.254.169.254/metadata/identity/oauth2/token"


def _proxy_url(raw: str) -> str:
    """An HTTP proxy URL (C{http://[user:password@]host[:port]}), or empty for none."""
    # Imported here: proxy.py needs Twisted, and this module is imported
    # when the settings are listed.
    from smtpproxy.providers.graph.proxyconfig import parse_proxy

    text = raw.strip()
    if text:
        parse_proxy(text)
    return text


def _no_proxy(raw: str) -> str:
    from smtpproxy.providers.graph.proxyconfig import parse_no_proxy

    parse_no_proxy(raw)
    return raw.strip()


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
    Setting(
        "GRAPH_SAVE_TO_SENT_ITEMS",
        "graph_save_to_sent_items",
        parse_boolean,
        "keep a copy in the mailbox's Sent Items (JSON sends)",
        True,
    ),
    Setting(
        "GRAPH_MAILBOX_RECIPIENTS_PER_DAY",
        "graph_mailbox_recipients_per_day",
        parse_count,
        "recipients one mailbox may send to in a rolling day (0 = not counted)",
        10_000,
    ),
    Setting(
        "GRAPH_MAILBOX_MESSAGES_PER_MINUTE",
        "graph_mailbox_messages_per_minute",
        parse_count,
        "messages one mailbox may send a minute (0 = not counted)",
        30,
    ),
    Setting(
        "GRAPH_MAILBOX_RECIPIENT_WINDOW",
        "graph_mailbox_recipient_window",
        parse_seconds,
        "seconds the recipient budget is counted over (Exchange: a day)",
        86_400.0,
    ),
    Setting(
        "GRAPH_MAILBOX_MESSAGE_WINDOW",
        "graph_mailbox_message_window",
        parse_seconds,
        "seconds the message budget is counted over (Exchange: a minute)",
        60.0,
    ),
    Setting(
        "GRAPH_CLIENT_CERTIFICATE_FILE",
        "graph_client_certificate_file",
        parse_text,
        "PEM file with the app's certificate and private key",
        "",
    ),
    Setting(
        "GRAPH_CLIENT_CERTIFICATE_PASSWORD",
        "graph_client_certificate_password",
        parse_text,
        "password of the certificate file's private key",
        "",
        secret=True,
    ),
    Setting(
        "GRAPH_MANAGED_IDENTITY",
        "graph_managed_identity",
        parse_boolean,
        "use the Azure managed identity",
        False,
    ),
    Setting(
        "GRAPH_MANAGED_IDENTITY_CLIENT_ID",
        "graph_managed_identity_client_id",
        parse_text,
        "client id of a user-assigned managed identity",
        "",
    ),
    Setting(
        "GRAPH_MANAGED_IDENTITY_ENDPOINT",
        "graph_managed_identity_endpoint",
        parse_url,
        "instance metadata token URL",
        IMDS_ENDPOINT,
    ),
    Setting(
        "AZURE_FEDERATED_TOKEN_FILE",
        "azure_federated_token_file",
        parse_text,
        "workload identity token file (AKS sets it)",
        "",
    ),
    Setting(
        "AZURE_CLIENT_ID",
        "azure_client_id",
        parse_text,
        "client id for the federated token (AKS sets it)",
        "",
    ),
    Setting(
        "AZURE_TENANT_ID",
        "azure_tenant_id",
        parse_text,
        "tenant id for the federated token (AKS sets it)",
        "",
    ),
    Setting(
        "AZURE_AUTHORITY_HOST",
        "azure_authority_host",
        lambda raw: parse_url(raw) if raw.strip() else "",
        "login URL for the federated token (AKS sets it)",
        "",
    ),
    Setting(
        "IDENTITY_ENDPOINT",
        "identity_endpoint",
        lambda raw: parse_url(raw) if raw.strip() else "",
        "App Service managed identity URL (App Service sets it)",
        "",
    ),
    Setting(
        "IDENTITY_HEADER",
        "identity_header",
        parse_text,
        "App Service managed identity header (App Service sets it)",
        "",
        secret=True,
    ),
    Setting(
        "HTTPS_PROXY",
        "https_proxy",
        _proxy_url,
        "HTTP proxy for Entra and Graph (also https_proxy)",
        "",
        secret=True,
        aliases=("https_proxy",),
    ),
    Setting(
        "NO_PROXY",
        "no_proxy",
        _no_proxy,
        "hosts reached without the proxy (also no_proxy)",
        "",
        aliases=("no_proxy",),
    ),
)


# The settings whose presence means "send through Graph" (the others have
# defaults, or are set by the platform for every process).
_CHOOSING = (
    "graph_tenant_id",
    "graph_client_id",
    "graph_sender",
    "graph_client_secret",
    "graph_client_certificate_file",
    "graph_client_certificate_password",
    "graph_managed_identity",
    "graph_managed_identity_client_id",
)


def credential_kind(values: Mapping[str, object]) -> str:
    """Which credential the values configure: exactly one of L{CREDENTIALS}.

    @raise ConfigError: none or several, or one without what it needs.
    """
    chosen = [name for name in CREDENTIALS if values.get(_CREDENTIAL_ATTRS[name])]
    if not chosen:
        raise ConfigError(
            f"{SECRET}: Graph has no credential; set one of {SECRET}, {CERTIFICATE}, "
            f"{FEDERATED} (with AKS workload identity) or {MANAGED}=true"
        )
    if len(chosen) > 1:
        raise ConfigError(
            f"{chosen[0]}: several Graph credentials are set ({', '.join(chosen)}); "
            "keep exactly one"
        )
    kind = chosen[0]
    if values.get("graph_client_certificate_password") and kind != CERTIFICATE:
        raise ConfigError(f"GRAPH_CLIENT_CERTIFICATE_PASSWORD: set without {CERTIFICATE}; unset it")
    if values.get("graph_managed_identity_client_id") and kind != MANAGED:
        raise ConfigError(f"GRAPH_MANAGED_IDENTITY_CLIENT_ID: set without {MANAGED}=true")
    if kind == MANAGED:
        if values.get("graph_client_id"):
            raise ConfigError(
                "GRAPH_CLIENT_ID: not used with a managed identity; to choose a "
                "user-assigned identity set GRAPH_MANAGED_IDENTITY_CLIENT_ID instead"
            )
        return kind
    federated = kind == FEDERATED
    for name in ("tenant_id", "client_id"):
        if not (values.get(f"graph_{name}") or (federated and values.get(f"azure_{name}"))):
            also = f" (or AZURE_{name.upper()})" if federated else ""
            raise ConfigError(
                f"GRAPH_{name.upper()}: Graph's {CREDENTIAL_NAMES[kind]} needs it{also}"
            )
    if kind == CERTIFICATE:
        from smtpproxy.providers.graph.credentials import CredentialError, load_certificate

        password = values.get("graph_client_certificate_password")
        try:
            load_certificate(
                str(values[_CREDENTIAL_ATTRS[CERTIFICATE]]),
                str(password) if password else None,
            )
        except CredentialError as e:
            raise ConfigError(f"{CERTIFICATE}: {e}") from None
    return kind


def configured(values: Mapping[str, object]) -> bool:
    """Is Graph configured?  Half of it is an error, not stdout mode.

    The C{AZURE_*} and proxy variables alone do not count: a platform sets
    them for every process, and they choose nothing by themselves.
    """
    own = [attr for attr in _CHOOSING if values.get(attr)]
    if values.get("provider") == "graph" and not own:
        raise ConfigError(
            "PROVIDER: graph needs GRAPH_SENDER and a credential "
            f"({SECRET} with GRAPH_TENANT_ID and GRAPH_CLIENT_ID, or another kind: "
            "see docs/graph.md)"
        )
    if not own:
        return False
    try:
        credential_kind(values)
    except ConfigError as e:
        if values.get("graph_sender"):
            raise
        raise ConfigError(f"{e}; also set GRAPH_SENDER") from None
    if not values.get("graph_sender"):
        raise ConfigError(
            "GRAPH_SENDER: Graph is partly configured; also set GRAPH_SENDER "
            "(or unset the GRAPH_* settings to print mail to stdout)"
        )
    return True


_BUDGET = (
    "graph_mailbox_recipients_per_day",
    "graph_mailbox_messages_per_minute",
    "graph_mailbox_recipient_window",
    "graph_mailbox_message_window",
)

SETTINGS_GROUP = SettingGroup("graph", SETTINGS, configured)
_DEFAULTS: Mapping[str, object] = {setting.attr: setting.default for setting in SETTINGS}


@dataclass(frozen=True, slots=True)
class GraphSettings:
    """The Graph settings, typed: what the provider reads instead of untyped attributes.

    L{Config} holds a provider's values in a mapping it knows nothing about;
    this is where they get their types back, checked once when the
    provider is built.  No field has a default of its own: an unset value
    takes its L{Setting}'s, declared once in L{SETTINGS}.  The C{AZURE_*}
    values the AKS webhook sets fill the tenant, client id and authority
    when the federated token is the credential and the C{GRAPH_*} ones are
    unset.
    """

    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)
    sender: tuple[str, ...]
    authority_host: str
    endpoint: str
    send_mode: str
    send_timeout: float
    max_concurrency: int
    save_to_sent_items: bool
    client_certificate_file: str
    client_certificate_password: str = field(repr=False)
    azure_federated_token_file: str
    azure_client_id: str
    azure_tenant_id: str
    azure_authority_host: str
    managed_identity: bool
    managed_identity_client_id: str
    managed_identity_endpoint: str
    identity_endpoint: str
    identity_header: str = field(repr=False)
    https_proxy: str = field(repr=False)
    no_proxy: str
    mailbox_recipients_per_day: int
    mailbox_messages_per_minute: int
    mailbox_recipient_window: float
    mailbox_message_window: float

    @property
    def budget(self) -> Limits:
        """The sending budgets' limits and windows."""
        return Limits(
            self.mailbox_recipients_per_day,
            self.mailbox_messages_per_minute,
            self.mailbox_recipient_window,
            self.mailbox_message_window,
        )

    def __repr__(self) -> str:
        secret = "***" if self.client_secret else "''"
        return f"GraphSettings(tenant_id={self.tenant_id!r}, client_secret={secret}, ...)"

    @property
    def credential(self) -> str:
        """The credential kind (one of L{CREDENTIALS}; the secret when none is set)."""
        if self.client_certificate_file:
            return CERTIFICATE
        if self.azure_federated_token_file:
            return FEDERATED
        if self.managed_identity:
            return MANAGED
        return SECRET

    @classmethod
    def from_config(cls, config: Config) -> GraphSettings:
        """The values C{config} holds for this provider (defaults for the rest).

        @raise TypeError: a value of the wrong type (only a Config built by
            hand can hold one: the parsers produce these types).
        """
        found = config.provider_settings

        def value(attr: str) -> object:
            return found[attr] if attr in found else _DEFAULTS[attr]

        def text(name: str) -> str:
            return _text(value(name), name)

        def flag(name: str) -> bool:
            got = value(name)
            if not isinstance(got, bool):
                raise TypeError(f"graph setting {name}: not true or false")
            return got

        senders = value("graph_sender")
        if not isinstance(senders, tuple) or not all(isinstance(s, str) for s in senders):
            raise TypeError("graph setting sender: not a tuple of addresses")
        timeout = value("graph_send_timeout")
        if not isinstance(timeout, int | float):
            raise TypeError("graph setting send_timeout: not a number")
        concurrency = value("graph_max_concurrency")
        if not isinstance(concurrency, int):
            raise TypeError("graph setting max_concurrency: not a whole number")
        counts = [value(name) for name in _BUDGET]
        if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in counts):
            raise TypeError("graph setting mailbox budget: not a number")
        federated = text("azure_federated_token_file")
        tenant, client, authority = (
            text("graph_tenant_id"),
            text("graph_client_id"),
            text("graph_authority_host"),
        )
        if federated:
            tenant = tenant or text("azure_tenant_id")
            client = client or text("azure_client_id")
            if "graph_authority_host" not in found and text("azure_authority_host"):
                authority = text("azure_authority_host").rstrip("/")
        return cls(
            tenant_id=tenant,
            client_id=client,
            client_secret=text("graph_client_secret"),
            sender=tuple(str(s) for s in senders),
            authority_host=authority,
            endpoint=text("graph_endpoint"),
            send_mode=text("graph_send_mode"),
            send_timeout=float(timeout),
            max_concurrency=concurrency,
            save_to_sent_items=flag("graph_save_to_sent_items"),
            client_certificate_file=text("graph_client_certificate_file"),
            client_certificate_password=text("graph_client_certificate_password"),
            azure_federated_token_file=federated,
            azure_client_id=text("azure_client_id"),
            azure_tenant_id=text("azure_tenant_id"),
            azure_authority_host=text("azure_authority_host"),
            managed_identity=flag("graph_managed_identity"),
            managed_identity_client_id=text("graph_managed_identity_client_id"),
            managed_identity_endpoint=text("graph_managed_identity_endpoint"),
            identity_endpoint=text("identity_endpoint"),
            identity_header=text("identity_header"),
            https_proxy=text("https_proxy"),
            no_proxy=text("no_proxy"),
            mailbox_recipients_per_day=int(cast(float, counts[0])),
            mailbox_messages_per_minute=int(cast(float, counts[1])),
            mailbox_recipient_window=float(cast(float, counts[2])),
            mailbox_message_window=float(cast(float, counts[3])),
        )


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"graph setting {name.removeprefix('graph_')}: not text")
    return value
