"""Internationalised addresses (RFC 6530-6533): domains in the form a backend needs.

An SMTPUTF8 client may name a domain in Unicode (U-labels, C{exämple.test});
DNS, Graph's recipient fields and every ASCII-only header need the same
domain as A-labels (C{xn--exmple-cua.test}).  The conversion follows IDNA
2008 with the UTS 46 mapping (upper case is folded, C{ß} is kept), through
the C{idna} package; the standard library's C{idna} codec implements the
older IDNA 2003 and maps some names to a different domain.

Pure functions over strings.  Input is bounded (a domain is at most 255
octets) before it reaches the converter, so each call is cheap whatever a
client sends.
"""

from __future__ import annotations

import re

import idna

MAX_DOMAIN = 255
# What an A-label domain must look like once converted: LDH labels of at
# most 63 characters, no empty label, no trailing dot.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ASCII_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def ascii_domain(domain: str) -> str | None:
    """C{domain} as A-labels (an ASCII domain as it is); None if it is not a valid IDN."""
    if domain.isascii():
        return domain
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return None
    try:
        converted = idna.encode(domain, uts46=True).decode("ascii")
    except (UnicodeError, ValueError):
        # idna.IDNAError is a UnicodeError; a code point it has no rule for
        # (or a label it cannot map) must not become a traceback.
        return None
    if len(converted) > 253 or _ASCII_DOMAIN.fullmatch(converted) is None:
        return None
    return converted


def is_idn_domain(domain: str) -> bool:
    """Whether C{domain} (non-ASCII) is a valid internationalised domain name."""
    return ascii_domain(domain) is not None


def ascii_address(address: str) -> str:
    """C{address} with its domain as A-labels; unchanged when there is nothing to convert.

    The local part is never touched: RFC 6531 gives it no ASCII form, so a
    UTF-8 local part stays UTF-8 (see L{has_ascii_local_part}).  An address
    whose domain cannot be converted is returned as it is, for the caller's
    own validation to refuse.
    """
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    converted = ascii_domain(domain)
    return f"{local}@{converted}" if converted is not None else address


def has_ascii_local_part(address: str) -> bool:
    """Whether the part of C{address} before its last C{@} is ASCII (nothing RFC 6531 needs)."""
    return address.rpartition("@")[0].isascii()
