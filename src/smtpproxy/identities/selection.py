"""Which provider checks a login, and with what: esmtpfa's rules, pure.

In order:

1. The name the client asked for (the TLS SNI name, else its EHLO name)
   is the C{domain} of a provider with C{unique_domain_auth}: that
   provider alone, with the user name and password as given.
2. The user name is a provider's name (and that provider's C{domain}, if
   it has one, is the name asked for): that provider alone.  For
   providers that need a user (C{userpass}, C{http_basic}, C{ldap}) the
   password field holds C{user:secret}, split at the first colon; the
   others take the password field as their token.
3. Otherwise every C{fallback} provider whose C{domain} (if any) matches,
   in file order, each with the user name and password as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtpproxy.identities.fileformat import ProviderEntry


@dataclass(frozen=True, slots=True)
class Attempt:
    """Ask C{provider} whether C{secret} is right for C{user}."""

    provider: ProviderEntry
    user: str
    secret: str


def requested_names(sni: str | None, ehlo: str | None) -> tuple[str, ...]:
    """The names a client asked for, SNI first, lower case, without a trailing dot."""
    names: list[str] = []
    for name in (sni, ehlo):
        if name:
            cleaned = name.strip().lower().rstrip(".")
            if cleaned and cleaned not in names:
                names.append(cleaned)
    return tuple(names)


def _domain_ok(entry: ProviderEntry, names: Sequence[str]) -> bool:
    return not entry.domain or entry.domain in names


def select(
    providers: Sequence[ProviderEntry], username: str, password: str, names: Sequence[str]
) -> list[Attempt]:
    """The attempts to make, in order; empty when no provider applies (a refusal)."""
    for name in names:
        for entry in providers:
            if entry.unique_domain_auth and entry.domain == name:
                return [Attempt(entry, username, password)]
    for entry in providers:
        if entry.name == username and _domain_ok(entry, names):
            if not entry.needs_user:
                return [Attempt(entry, "", password)]
            user, colon, secret = password.partition(":")
            # "provider" with a password lacking "user:" names nobody.
            return [Attempt(entry, user, secret)] if colon and user else []
    return [
        Attempt(entry, username, password)
        for entry in providers
        if entry.fallback and _domain_ok(entry, names)
    ]
