"""Who may relay: client networks, sender/recipient patterns, the connect rule.

Everything here is pure: addresses arrive as strings (as Twisted reports
them, or as the PROXY protocol header carried them) and settings as plain
text, so every rule is tested without a socket.  Parsers raise C{ValueError}
with a reason an operator can act on; matchers never raise, because they
run on whatever a hostile client managed to put on the wire.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from twisted.internet.address import UNIXAddress

from smtpproxy.addresses import domain_of, is_hostname, mailbox_problem, pattern_key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[Network, ...]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Settings are lists an operator types by hand: accept commas, spaces or both.
_SEPARATORS = re.compile(r"[\s,]+")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _split(text: str) -> list[str]:
    return [token for token in _SEPARATORS.split(text) if token]


def _shown(token: str) -> str:
    """Quote a piece of bad input for an error message, kept short."""
    return repr(token if len(token) <= 60 else token[:57] + "...")


def parse_networks(text: str) -> Networks:
    """Parse a comma and/or space separated list of CIDR networks.

    A bare address is a single host (/32 or /128).  Host bits after the
    network part (C{10.0.0.1/8}) are dropped rather than refused, since the
    intent is plain.  An empty text is an empty tuple: the caller decides
    whether that means "nobody" or "use the default".

    @raise ValueError: naming the first entry that is not a network.
    """
    networks: list[Network] = []
    for token in _split(text):
        if "%" in token:
            # A scope (fe80::1%eth0) names an interface of *this* host; it
            # has no meaning in a list of client networks.
            raise ValueError(f"{_shown(token)}: interface scopes (%...) are not allowed here")
        try:
            networks.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            raise ValueError(_network_problem(token)) from None
    return tuple(networks)


def _network_problem(token: str) -> str:
    address, _, prefix = token.partition("/")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"{_shown(token)} is not an IPv4 or IPv6 address or CIDR network"
    return f"{_shown(token)}: bad prefix length {_shown(prefix)} (IPv4 takes 0-32, IPv6 0-128)"


DEFAULT_PRIVATE_NETWORKS: Networks = parse_networks(
    "127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7 fe80::/10"
)
"""Who may relay when AUTH is off and nothing is configured: this host, the
RFC 1918 and unique-local ranges and link-local, i.e. Docker networks and
LANs, but never the public internet."""


UNIX_CLIENT = "unix"
"""The client name of a connection to a C{unix:} listener, in policies and logs."""
# Such a client can only be a process on this host allowed to open the
# socket file: it is judged as loopback is (admitted where 127.0.0.1 would
# be, trusted where 127.0.0.1 is), and counted apart from TCP loopback.
_UNIX_AS = ipaddress.IPv4Address("127.0.0.1")


def client_name(peer: object) -> str:
    """The client address a session's policies, limits and logs use for C{peer}.

    C{peer} is what a transport's C{getPeer()} returned: an IPv4 or IPv6
    address gives its host; a UNIX socket peer (whose name is usually empty,
    as the client's socket is unbound) gives L{UNIX_CLIENT}.  Nothing else
    can produce that name: the PROXY header yields IP addresses only.
    """
    host = getattr(peer, "host", None)
    if isinstance(host, str):
        return host
    if isinstance(peer, UNIXAddress):
        return UNIX_CLIENT
    return str(peer)


@functools.lru_cache(maxsize=4096)
def _parse_address(ip: str) -> Address | None:
    """The address in C{ip}, its IPv6 scope and brackets removed, or None.

    Cached: every connect asks about the same few client addresses several
    times (allowed, trusted, per-address key), and parsing dominates.
    """
    if ip == UNIX_CLIENT:
        return _UNIX_AS
    host = ip.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.partition("%")[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _forms(address: Address) -> tuple[Address, ...]:
    """The address and, for IPv4-mapped IPv6 (::ffff:a.b.c.d), its IPv4 form.

    A dual-stack listener reports IPv4 clients in mapped form; matching both
    forms lets C{10.0.0.0/8} and C{::ffff:10.0.0.0/104} each cover them.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    return (address,)


def address_in(ip: str, networks: Iterable[Network]) -> bool:
    """Is the client address C{ip} inside any of C{networks}?

    Accepts what Twisted and the PROXY protocol report: IPv4, IPv6, IPv6
    with a zone (C{fe80::1%eth0}, the zone is ignored) or in brackets, and
    IPv4-mapped IPv6, and L{UNIX_CLIENT}, which is inside the networks that
    hold 127.0.0.1.  Anything else (garbage) is outside every network: this
    returns False and never raises.
    """
    address = _parse_address(ip)
    if address is None:
        return False
    forms = _forms(address)
    return any(
        form.version == network.version and form in network
        for network in networks
        for form in forms
    )


def client_key(ip: str) -> str:
    """The key to count a client under for per-address limits.

    IPv4 (mapped or not) counts per address.  IPv6 counts per /64, because
    one subscriber routinely holds a whole /64 and could otherwise rotate
    through addresses to escape every per-address limit.  A string that is
    not an address is returned unchanged, so it still gets a bucket; so is
    L{UNIX_CLIENT}, so local socket clients share one bucket of their own.
    """
    if ip == UNIX_CLIENT:
        return ip
    address = _parse_address(ip)
    if address is None:
        return ip
    address = _forms(address)[-1]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# Ranges no client on the public internet can come from: loopback, private
# and shared (CGNAT) space, link-local, documentation, benchmarking,
# multicast and reserved.  Collapsed so that a network covered by two
# adjacent ranges still counts as covered.
_NON_PUBLIC: Networks = tuple(
    ipaddress.collapse_addresses(
        n
        for n in parse_networks(
            "0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12"
            " 192.0.0.0/24 192.0.2.0/24 192.168.0.0/16 198.18.0.0/15 198.51.100.0/24"
            " 203.0.113.0/24 224.0.0.0/3"
        )
        if isinstance(n, ipaddress.IPv4Network)
    )
) + tuple(
    ipaddress.collapse_addresses(
        n
        for n in parse_networks(
            "::/128 ::1/128 64:ff9b:1::/48 100::/64 2001:db8::/32 fc00::/7 fe80::/10 ff00::/8"
        )
        if isinstance(n, ipaddress.IPv6Network)
    )
)


def is_public_exposure(networks: Iterable[Network]) -> bool:
    """Does any of C{networks} hold an address a public client could have?

    True for C{0.0.0.0/0}, C{::/0} or any range reaching beyond loopback,
    private, link-local and reserved space: the service warns at startup
    when such a list lets clients relay without AUTH.  IPv4-mapped IPv6
    networks are judged by the IPv4 range they map.
    """
    for network in networks:
        judged: Network = network
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            judged = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
            )
        if not any(_within(judged, private) for private in _NON_PUBLIC):
            return True
    return False


def _within(inner: Network, outer: Network) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


@dataclass(frozen=True, slots=True)
class AddressPatterns:
    """A parsed SMTP_ALLOWED_SENDERS or SMTP_ALLOWED_RECIPIENTS list.

    Build it with L{parse_address_patterns}.  All fields are lower case.

    @ivar addresses: whole addresses (C{user@example.com}).
    @ivar domains: domains whose every address matches (C{@example.com}).
    @ivar parent_domains: domains whose I{subdomains} match
        (C{@.example.com}); the domain itself does not.
    @ivar null_sender: whether the null reverse-path C{<>} is listed.
    """

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    parent_domains: frozenset[str] = frozenset()
    null_sender: bool = False

    @property
    def empty(self) -> bool:
        """No patterns at all: the setting is unset and everything passes."""
        return not (self.addresses or self.domains or self.parent_domains or self.null_sender)

    def allows(self, address: str) -> bool:
        """May C{address} (as parsed from MAIL or RCPT, "" for C{<>}) be used?

        An empty pattern set allows everything, including C{<>}.  Otherwise
        the null sender needs C{<>} listed, and any other address must match
        an entry.  Comparison ignores ASCII case only: an address with
        non-ASCII characters never matches, so Unicode case folding (the
        Kelvin sign lowers to "k") cannot forge a listed address.  Never
        raises.
        """
        if self.empty:
            return True
        if address == "":
            return self.null_sender
        key = pattern_key(address)
        if key is None:
            return False
        domain = domain_of(key)
        if key in self.addresses or domain in self.domains:
            return True
        labels = domain.split(".")
        return any(".".join(labels[i:]) in self.parent_domains for i in range(1, len(labels)))


def parse_address_patterns(text: str) -> AddressPatterns:
    """Parse a comma and/or space separated list of address patterns.

    - C{user@example.com}: that address.  Angle brackets around it are
      accepted.  The domain is case-insensitive by definition; the local
      part is compared case-insensitively too, because Microsoft 365 and
      nearly every real mail system treat it so, and a case-sensitive list
      would only reject legitimate mail whose sender capitalised a name.
    - C{@example.com}: every address at exactly that domain, I{not} its
      subdomains (a mistaken match on C{mail.example.com} would widen the
      list silently).
    - C{@.example.com}: every address at any subdomain of example.com
      (C{a.example.com}, C{b.a.example.com}) but not at example.com itself;
      list both to allow both.
    - C{<>}: the null reverse-path (bounces), which is otherwise refused
      once any pattern is set.

    An empty text gives the empty set, which allows everything.

    @raise ValueError: naming the first entry that is none of these.
    """
    addresses: set[str] = set()
    domains: set[str] = set()
    parents: set[str] = set()
    null_sender = False
    for item in _split(text):
        if item == "<>":
            null_sender = True
            continue
        entry = item[1:-1] if len(item) > 2 and item[0] == "<" and item[-1] == ">" else item
        if not entry.isascii():
            raise ValueError(f"{_shown(item)}: only ASCII addresses are supported")
        if entry.startswith("@."):
            parents.add(_domain(item, entry[2:]))
        elif entry.startswith("@"):
            domains.add(_domain(item, entry[1:]))
        else:
            key = pattern_key(entry)
            if key is None or mailbox_problem(entry) is not None:
                raise ValueError(
                    f"{_shown(item)} is not an address (user@example.com), a domain"
                    " (@example.com), subdomains (@.example.com) or <>"
                )
            addresses.add(key)
    return AddressPatterns(
        frozenset(addresses), frozenset(domains), frozenset(parents), null_sender
    )


def _domain(item: str, domain: str) -> str:
    if not is_hostname(domain):
        raise ValueError(f"{_shown(item)}: {_shown(domain)} is not a domain name")
    return domain.lower()


class Decision(enum.Enum):
    """What to do with a new connection, before anything else is said."""

    REJECT = "reject"
    """Send 554 5.7.1 at connect and close."""
    RELAY_WITHOUT_AUTH = "relay-without-auth"
    """Greet; MAIL may follow without AUTH."""
    NEEDS_AUTH = "needs-auth"
    """Greet; MAIL is refused (530 5.7.0) until AUTH succeeds."""


# (auth_enabled, in allowed networks, in trusted networks) -> decision.
# With AUTH off only the allowed networks count: outside them there is no
# way to prove who you are, so the connection is refused.  With AUTH on
# anyone may connect and must authenticate, except trusted networks.
RULES: Mapping[tuple[bool, bool, bool], Decision] = MappingProxyType(
    {
        (False, True, True): Decision.RELAY_WITHOUT_AUTH,
        (False, True, False): Decision.RELAY_WITHOUT_AUTH,
        (False, False, True): Decision.REJECT,
        (False, False, False): Decision.REJECT,
        (True, True, True): Decision.RELAY_WITHOUT_AUTH,
        (True, False, True): Decision.RELAY_WITHOUT_AUTH,
        (True, True, False): Decision.NEEDS_AUTH,
        (True, False, False): Decision.NEEDS_AUTH,
    }
)


def connection_decision(
    client_ip: str,
    allowed_networks: Iterable[Network],
    auth_enabled: bool,
    trusted_networks: Iterable[Network],
) -> Decision:
    """Decide what a client connecting from C{client_ip} may do; see L{RULES}.

    C{client_ip} must be the real client (from the PROXY header when there
    is one).  An address that cannot be parsed is in no network, so it is
    refused with AUTH off and must authenticate with AUTH on.
    """
    key = (
        auth_enabled,
        address_in(client_ip, allowed_networks),
        address_in(client_ip, trusted_networks),
    )
    return RULES[key]
