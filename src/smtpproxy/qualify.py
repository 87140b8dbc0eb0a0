"""Addresses the relay writes itself: qualified, and only when they are valid.

Cron, old applications and C{sendmail}-style tools send bare local parts
(C{From: root}, C{MAIL FROM:<root>}).  A mail server qualifies them with its
own domain (Postfix's C{append_at_myorigin}); Graph does not, and refuses a
message whose Reply-To it cannot read with C{ErrorInvalidRecipients}.  So
every address the relay adds to a message goes through here: a bare local
part gets the default domain, and what is still not a plain
C{local@domain.tld} address is left out rather than bounce the message.

Pure functions over strings; each runs in time linear in its input.
"""

from __future__ import annotations

from collections.abc import Sequence

# Characters that never appear unquoted in an address we would write: space,
# controls and the RFC 5322 specials that delimit addresses in a header.
_FORBIDDEN = frozenset(' \t\r\n\x00<>()[]\\,;:"@')
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254


def _plain(text: str) -> bool:
    """Non-empty, no forbidden character, no control, dots only between characters."""
    if not text or text.startswith(".") or text.endswith(".") or ".." in text:
        return False
    return not any(char in _FORBIDDEN or char < " " or char == "\x7f" for char in text)


def is_deliverable(address: str) -> bool:
    """Whether C{address} is a plain C{local@domain.tld} that Graph accepts as a recipient.

    Stricter than RFC 5321 on purpose: quoted local parts and address
    literals are valid SMTP but not what Exchange takes in a Reply-To, and
    a single-label domain (C{root@myhost}) is not deliverable on the
    Internet.  UTF-8 is allowed (RFC 6531 addresses).
    """
    if len(address) > MAX_ADDRESS:
        return False
    local, at, domain = address.rpartition("@")
    if not at or len(local) > MAX_LOCAL_PART or not _plain(local) or not _plain(domain):
        return False
    return "." in domain


def is_local_part(text: str) -> bool:
    """Whether C{text} is a bare local part (C{root}): something to qualify."""
    return len(text) <= MAX_LOCAL_PART and _plain(text)


def qualify(address: str, domain: str) -> str:
    """C{address} with C{@domain} appended when it is a bare local part, else unchanged."""
    if domain and "@" not in address and is_local_part(address):
        return f"{address}@{domain}"
    return address


def mailbox_domain(mailbox: str) -> str:
    """The domain of C{mailbox} (empty when it has none)."""
    return mailbox.rpartition("@")[2]


def default_domain(configured: str, senders: Sequence[str]) -> str:
    """The domain a bare C{MAIL FROM} local part is qualified with.

    C{SMTP_DEFAULT_DOMAIN} when set; else the domain of the first mailbox
    the relay sends as (C{GRAPH_SENDER}); else empty, and the session uses
    its host name, as Postfix's C{myorigin} defaults to C{myhostname}.
    """
    if configured:
        return configured
    for sender in senders:
        domain = mailbox_domain(sender)
        if domain:
            return domain
    return ""
