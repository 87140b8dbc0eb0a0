"""The Graph provider's settings: declared here, registered with L{smtpproxy.config}.

They are read from the environment and the YAML file, listed by C{--help} and
checked against the operator guide like the relay's own, and read back as
attributes of the L{smtpproxy.config.Config} (C{config.graph_sender}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpproxy.config import (
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


def configured(values: Mapping[str, Any]) -> bool:
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
