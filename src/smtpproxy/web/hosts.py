"""Which C{Host} headers the browser-facing parts answer: the defence against DNS rebinding.

The mailbox shows every captured message to whoever can load its page, and
a browser is the client.  A hostile web page can point a name it controls
(C{attacker.example}) at 127.0.0.1 or a LAN address after the page has
loaded (DNS rebinding); the browser then counts the mailbox as the page's
own origin and lets its scripts read the captured mail.  Network policy
cannot tell: the request does come from the developer's own machine.  What
differs is the C{Host} header, which the browser fills from the URL and a
page cannot change: it names the attacker's domain.

So a browser-facing part answers only a C{Host} that is

  - an IP literal (C{127.0.0.1:8025}, C{[::1]:8025}, a LAN address):
    rebinding needs a name, and no attacker's page has an address for its
    origin;
  - C{localhost} or a name under C{.localhost}: browsers resolve those to
    loopback themselves (RFC 6761, the WHATWG URL standard), never through
    DNS, so nobody can rebind them;
  - a name the operator lists in C{HTTP_ALLOWED_HOSTS} (compared without
    case and without a trailing dot).

A request without C{Host} (HTTP/1.0 from a script or an old tool) is
answered: every browser sends one, and a page's script cannot remove it,
so such a request never came from a rebound page.  Two C{Host} headers, or
one that is not a host name or address, are refused.

Pure functions over bytes and names; the site (L{smtpproxy.web.site})
applies them to the mounts that ask for it, and L{RefusalLog} bounds the
log lines refusals cause.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from smtpproxy.logsafe import clip

__all__ = [
    "REFUSAL",
    "RefusalLog",
    "host_allowed",
    "parse_allowed_hosts",
    "shown",
    "split_host",
]

#: The reply's status text: what is wrong and which setting changes it.
REFUSAL = (
    "misdirected request: the Host header must be an IP address, localhost, "
    "or a name listed in HTTP_ALLOWED_HOSTS"
)

#: A DNS name as an operator writes one: letters, digits, hyphens, dots.
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
#: The longest Host value looked at; longer is refused without parsing.
MAX_HOST = 300


def parse_allowed_hosts(raw: str) -> tuple[str, ...]:
    """C{HTTP_ALLOWED_HOSTS}: host names separated by commas or spaces, lower-cased.

    @raise ValueError: an entry with a port, a scheme, a path or a wildcard
        (the list names hosts; a browser's C{Host} is compared without its port).
    """
    names = []
    for entry in raw.replace(",", " ").split():
        name = entry.lower().rstrip(".")
        if len(name) > 253 or not _NAME.fullmatch(name):
            raise ValueError(
                f"{entry[:80]!r} is not a host name (no port, scheme, path or wildcard)"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def split_host(value: str) -> str | None:
    """The host part of a C{Host} value without its port, lower-cased; None if malformed."""
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return f"[{inside.lower()}]"
    host, colon, port = value.rpartition(":") if ":" in value else (value, "", "")
    if colon and not port.isdigit():
        return None
    return host.lower().rstrip(".") if host else None


def _is_ip_literal(host: str) -> bool:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host.startswith("[") != host.endswith("]"):
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    # An IPv6 address is a literal in a Host header only in brackets.
    return address.version == 4 or host.startswith("[")


def host_allowed(values: Sequence[bytes] | None, allowed: tuple[str, ...]) -> bool:
    """Does a request with these C{Host} header values get an answer?

    @param values: every C{Host} header of the request, or None for none.
    @param allowed: the names of C{HTTP_ALLOWED_HOSTS}, as L{parse_allowed_hosts} gives them.
    """
    if not values:
        return True
    if len(values) != 1 or len(values[0]) > MAX_HOST:
        return False
    try:
        text = values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        return False
    host = split_host(text)
    if host is None:
        return False
    if _is_ip_literal(host):
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return host in allowed


class RefusalLog:
    """When a refused C{Host} is worth a log line: the first, then one a minute at most.

    A page that keeps trying (or anyone who can reach the listener) must not
    be able to fill the log; every refusal is counted in the metrics
    regardless, and the next line says how many were not logged.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: float | None = None
        self._quiet = 0

    def record(self, now: float) -> int | None:
        """None: do not log this one.  Else log it, with this many left unlogged before it."""
        if self._last is not None and now - self._last < self.interval:
            self._quiet += 1
            return None
        self._last = now
        quiet, self._quiet = self._quiet, 0
        return quiet


def shown(values: Sequence[bytes] | None) -> str:
    """The refused Host value(s) as a log line may carry them: short, escaped."""
    if not values:
        return ""
    return clip(" ".join(v.decode("latin-1") for v in values[:2]), 120)
