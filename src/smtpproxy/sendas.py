"""Mailboxes a login is bound to: checked against the provider's at start-up.

An identity's policy (C{AUTH_CONFIG}) or an API key (C{HTTP_API_KEYS_FILE})
may name the C{mailbox} its messages are sent as.  That only means
something to a provider with mailboxes of its own (Graph's
C{GRAPH_SENDER}), and only if the mailbox is one of them: a name outside
the list would have every message of that login refused.  Both files are
read before anything listens, so the mistake stops start-up (or, for the
keys file, a SIGHUP reload) with one line naming where the mailbox is
written.  Other providers send as the envelope says and ignore it.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from smtpproxy.addresses import mailbox_key
from smtpproxy.config import Config


def provider_senders(config: Config) -> tuple[str, ...] | None:
    """The mailboxes the configured provider sends as; None when it has no such list."""
    if config.provider != "graph":
        return None
    senders = config.provider_settings.get("graph_sender", ())
    return tuple(str(s) for s in senders) if isinstance(senders, tuple) else ()


def unknown_mailbox(named: Iterable[tuple[str, str]], config: Config) -> str | None:
    """The first C{(where, mailbox)} whose mailbox the provider cannot send as, as one line.

    None when all are known, or when the provider has no list of mailboxes
    (the C{mailbox} then has no effect).
    """
    senders = provider_senders(config)
    if senders is None:
        return None
    known = {mailbox_key(sender) for sender in senders}
    for where, mailbox in named:
        if mailbox and mailbox_key(mailbox) not in known:
            return (
                f"{where}: mailbox {mailbox!r} is not one of GRAPH_SENDER "
                f"({', '.join(senders) or 'none set'})"
            )
    return None
