"""Identities: who may log in with SMTP AUTH, checked by pluggable backends.

The C{AUTH_CONFIG} file (L{fileformat}) lists identity providers in
esmtpfa's shape; L{build} turns it into the one C{twisted.cred} checker the
relay's portal holds (L{router}), which selects providers
(L{selection}) and asks their backends: L{userpass}, L{httpauth}
(C{http_basic}, C{http_header}), L{jwtauth} and L{ldapauth}.  The realm
wrapper (L{realm}) holds each identity to its policy
(L{smtpproxy.policy.identity}).  See docs/identities.md.
"""

from __future__ import annotations

from smtpproxy.identities.build import build_checker, read
from smtpproxy.identities.credentials import ClientCredentials, sni_of
from smtpproxy.identities.errors import BackendUnavailable, IdentityConfigError
from smtpproxy.identities.fileformat import IdentityFile, ProviderEntry, parse
from smtpproxy.identities.model import Identity, Verified
from smtpproxy.identities.realm import IdentityRealm, PolicedDelivery
from smtpproxy.identities.router import IdentityChecker

__all__ = [
    "BackendUnavailable",
    "ClientCredentials",
    "Identity",
    "IdentityChecker",
    "IdentityConfigError",
    "IdentityFile",
    "IdentityRealm",
    "PolicedDelivery",
    "ProviderEntry",
    "Verified",
    "build_checker",
    "parse",
    "read",
    "sni_of",
]
