"""C{HTTPS_PROXY} and C{NO_PROXY}: what they say, as plain values (no I/O).

Conventions differ between tools; the relay follows the common core of
curl, Go and Python's urllib, and is stricter where they disagree:

  - C{HTTPS_PROXY} is an C{http://} URL (a scheme-less C{host:port} is read
    as C{http://}); user and password in it, percent-encoded, become a
    C{Proxy-Authorization: Basic} header.  Other schemes (C{https://},
    C{socks5://}) are refused at start-up rather than silently ignored.
  - C{NO_PROXY} is a comma- (or space-) separated list.  C{*} bypasses the
    proxy for every host; C{example.com} and C{.example.com} both match
    that domain and every name under it; an IP address matches itself; a
    CIDR block (C{10.0.0.0/8}) matches the addresses in it; an entry may
    end in C{:port} to match only that port.  Names are compared without
    regard to case, and never resolved: a name does not match an address
    entry.  Loopback bypasses nothing unless it is listed.  An IPv6 address
    or block may stand in brackets, as in a URL (C{[fd00::1]},
    C{[fd00::1]:443}, C{[fd00::]/8}, C{[fd00::]/8:443}); anything else
    after the bracket, or a bracket that is never closed, is refused.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# A NO_PROXY list longer than this is a mistake (or an attack on start-up).
MAX_NO_PROXY_ENTRIES = 1000


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Where the proxy is, and the credential to show it (if any)."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """For logs: host and port, never the credential."""
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> ProxyConfig:
    """Read an C{HTTPS_PROXY} value.

    @raise ValueError: not an C{http://[user[:password]@]host[:port]} URL.
        The message never quotes the value (it may hold a password).
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"the proxy must be an http:// URL (an HTTP proxy that supports CONNECT), "
            f"not {parts.scheme}://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("expected http://[user:password@]host[:port] with nothing after it")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the proxy's port is not a number from 1 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError("the proxy URL names no host")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(pair.encode("utf-8"))
    return ProxyConfig(host, port or 80, authorization)


@dataclass(frozen=True, slots=True)
class NoProxy:
    """The parsed C{NO_PROXY} list."""

    everything: bool = False
    domains: tuple[tuple[str, int | None], ...] = ()
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()

    def bypasses(self, host: str, port: int) -> bool:
        """Does a request to C{host}:C{port} go direct?"""
        if self.everything:
            return True
        name = host.strip("[]").rstrip(".").lower()
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            address = None
        if address is not None:
            return any(
                address in network and wanted in (None, port) for network, wanted in self.networks
            )
        return any(
            (name == domain or name.endswith("." + domain)) and wanted in (None, port)
            for domain, wanted in self.domains
        )


def parse_no_proxy(text: str) -> NoProxy:
    """Read a C{NO_PROXY} value.

    @raise ValueError: an entry that is none of the forms above.
    """
    entries = [e for e in text.replace(",", " ").split() if e]
    if len(entries) > MAX_NO_PROXY_ENTRIES:
        raise ValueError(f"more than {MAX_NO_PROXY_ENTRIES} entries")
    domains: list[tuple[str, int | None]] = []
    networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
    for entry in entries:
        if entry == "*":
            return NoProxy(everything=True)
        host, port = _split_port(entry)
        try:
            networks.append((ipaddress.ip_network(host, strict=False), port))
            continue
        except ValueError:
            pass
        name = host.lstrip("*").lstrip(".").rstrip(".").lower()
        if not name or not all(c.isalnum() or c in "-._" for c in name):
            raise ValueError(f"{entry[:60]!r} is not a host name, address or CIDR block")
        domains.append((name, port))
    return NoProxy(False, tuple(domains), tuple(networks))


def _split_port(entry: str) -> tuple[str, int | None]:
    """C{host:port}, C{[v6]...} (L{_bracketed}), C{v6} or C{host}: the host and the port, if any."""
    if entry.startswith("["):
        return _bracketed(entry)
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


def _bracketed(entry: str) -> tuple[str, int | None]:
    """C{[v6]}, then nothing, C{:port}, C{/bits} or C{/bits:port}: the address or block, the port.

    The bracket only quotes the colons of the address; a prefix length
    after it belongs to the address (C{[fd00::]/8} is the block fd00::/8).
    Anything else there is a mistake that would otherwise narrow the entry
    without a word, so it is refused.
    """
    inside, closed, rest = entry[1:].partition("]")
    if not closed:
        raise ValueError(f"{entry[:60]!r} has no closing ']'")
    prefix, colon, port_text = rest.partition(":")
    if prefix and not (prefix.startswith("/") and prefix[1:].isascii() and prefix[1:].isdigit()):
        raise ValueError(f"{entry[:60]!r}: only ':port' or '/prefix-length' may follow the ']'")
    host = inside + prefix
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        network = None
    if network is None or network.version != 6:
        raise ValueError(f"{entry[:60]!r}: the brackets must hold an IPv6 address or block")
    return host, _port(port_text, entry) if colon else None


def _port(text: str, entry: str) -> int:
    # ASCII digits only: int() would also read other scripts' digits.
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"{entry[:60]!r} has a port that is not a number from 1 to 65535")
    return int(text)
