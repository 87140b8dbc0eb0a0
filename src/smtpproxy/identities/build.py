"""From the C{AUTH_CONFIG} file to the portal's checker: every backend built up front.

Building checks each provider's C{params} (and reads any CA or
certificate file), so a mistake stops start-up with one line rather than
failing the first login.  Nothing connects anywhere here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpproxy.identities.errors import IdentityConfigError
from smtpproxy.identities.fileformat import IdentityFile, ProviderEntry, parse
from smtpproxy.identities.httpauth import HTTPBackend
from smtpproxy.identities.jwtauth import JWTBackend
from smtpproxy.identities.ldapauth import LDAPBackend
from smtpproxy.identities.model import Backend
from smtpproxy.identities.router import IdentityChecker
from smtpproxy.identities.userpass import UserpassBackend

#: The provider name the built-in C{SMTP_USERNAME} user is checked under.
BUILTIN = ""


def read(path: str, env: Mapping[str, str]) -> IdentityFile:
    """Read and parse the file at C{path}.

    @raise IdentityConfigError: one line naming the file and what is wrong.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise IdentityConfigError(f"AUTH_CONFIG: cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise IdentityConfigError(f"AUTH_CONFIG: {path} is not UTF-8 text") from None
    return parse(text, env, f"AUTH_CONFIG {path}")


def backend_for(entry: ProviderEntry, reactor: Any) -> Backend:
    """The backend of one provider entry (its params checked now)."""
    if entry.type == "userpass":
        return UserpassBackend(entry, reactor)
    if entry.type in ("http_basic", "http_header"):
        return HTTPBackend(entry, reactor)
    if entry.type == "jwt":
        return JWTBackend(entry, reactor)
    if entry.type == "ldap":
        return LDAPBackend(entry, reactor)
    raise IdentityConfigError(f"provider {entry.name!r}: unknown type {entry.type!r}")


def build_checker(
    identities: IdentityFile | None,
    reactor: Any,
    builtin: tuple[str, str] | None = None,
) -> IdentityChecker:
    """The portal's checker: the file's providers, and C{SMTP_USERNAME}'s user first.

    @param builtin: C{(SMTP_USERNAME, SMTP_PASSWORD)} when set: checked as a
        fallback before the file's fallbacks, with the global policy.
    """
    entries = list(identities.providers) if identities is not None else []
    backends: dict[str, Backend] = {e.name: backend_for(e, reactor) for e in entries}
    if builtin is not None:
        from smtpproxy.identities.builtin import BuiltinBackend

        entry = ProviderEntry(name=BUILTIN, type="userpass", params={}, fallback=True)
        entries.insert(0, entry)
        backends[BUILTIN] = BuiltinBackend(*builtin)
    seconds = identities.cache_seconds if identities is not None else 0.0
    limit = identities.cache_max_entries if identities is not None else 1
    return IdentityChecker(entries, backends, reactor, seconds, limit)


def from_settings(
    auth_config: str, env: Mapping[str, str], builtin: tuple[str, str] | None, reactor: Any
) -> IdentityChecker | None:
    """The checker for C{AUTH_CONFIG} (and C{SMTP_USERNAME}'s user), or None without a file.

    @raise IdentityConfigError: the file, or a provider in it, is wrong.
    """
    if not auth_config:
        return None
    return build_checker(read(auth_config, env), reactor, builtin)
