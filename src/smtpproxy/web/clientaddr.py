"""Who the HTTP client is: the peer, or what a trusted proxy says in X-Forwarded-For.

Pure: strings and networks in, an address (or None) out, so every rule is
tested without sockets.  Every HTTP path (health, metrics, the submission
API, the mailbox UI) asks L{client_host} once per request through the site
(C{smtpproxy.web.site}), and so sees the same client for its network
policy, its rate limits and its log lines.

The rule: X-Forwarded-For is believed only from a peer inside
C{HTTP_TRUSTED_PROXIES}.  Its list is read from the right (the hop nearest
us) and every address that is itself a trusted proxy is stepped over; the
first one that is not is the client.  Whatever a client writes into the
header arrives to the left of what its proxy appended, so it is never
reached while there is an untrusted hop closer to us.  A list that holds
something other than an address before the client is found is a broken or
hostile chain: the answer is None (unknown client), which every policy
refuses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from smtpproxy.policy import rules as policy

__all__ = ["MAX_HOPS", "client_host", "forwarded_hops"]

#: Entries of X-Forwarded-For read at most; a longer chain is not a real
#: deployment, and the bound keeps the work per request small.
MAX_HOPS = 32


def forwarded_hops(values: Sequence[bytes] | None) -> list[str] | None:
    """The entries of every X-Forwarded-For header, in order; None if unreadable.

    Several headers are one list, as RFC 9110 joins repeated fields.  An
    entry may carry a port (C{192.0.2.1:4711}, C{[2001:db8::1]:4711});
    it is dropped.  Not ASCII, an empty entry, or more than L{MAX_HOPS}
    entries make the whole header unreadable.
    """
    if not values:
        return []
    try:
        text = b",".join(values).decode("ascii")
    except UnicodeDecodeError:
        return None
    entries = text.split(",", MAX_HOPS)
    if len(entries) > MAX_HOPS:
        return None
    hops = []
    for entry in entries:
        host = _host_of(entry.strip())
        if host is None:
            return None
        hops.append(host)
    return hops


def _host_of(entry: str) -> str | None:
    """The address in one entry, without brackets or port; None if there is none."""
    if entry.startswith("["):
        inside, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        entry = inside
    elif entry.count(":") == 1:
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def client_host(
    peer: str, forwarded_for: Sequence[bytes] | None, trusted: Iterable[policy.Network]
) -> str | None:
    """The client address the request is judged and logged as.

    @param peer: the connection's peer address (C{getPeer().host}).
    @param forwarded_for: the raw X-Forwarded-For header values, or None.
    @param trusted: C{HTTP_TRUSTED_PROXIES}.
    @return: C{peer} unless it is a trusted proxy with a readable header;
        then the nearest untrusted hop (or the farthest hop, when every hop
        is trusted); None when a trusted proxy sent an unreadable header.
    """
    networks = tuple(trusted)
    if not forwarded_for or not networks or not policy.address_in(peer, networks):
        return peer
    hops = forwarded_hops(forwarded_for)
    if hops is None:
        return None
    for hop in reversed(hops):
        if not policy.address_in(hop, networks):
            return hop
    return hops[0] if hops else peer
