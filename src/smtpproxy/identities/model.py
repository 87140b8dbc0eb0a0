"""The values every identity module shares: a verified user, an identity, a backend.

A backend answers one question, "is this secret right for this user?",
with a L{Verified} (or C{UnauthorizedLogin}, or L{BackendUnavailable}).
The router (L{smtpproxy.identities.router}) turns that into an
L{Identity}, the portal's avatar ID, which the realm
(L{smtpproxy.identities.realm}) turns into a policed delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from smtpproxy.policy.identity import UNRESTRICTED, IdentityPolicy


@dataclass(frozen=True, slots=True)
class Verified:
    """A backend's yes: who the user is, and a policy of their own if the file gives one.

    C{valid_until} is when the credential itself stops being valid (a
    token's C{exp} plus leeway), on the backend's clock: a cached yes must
    not outlive it.  None: the credential carries no end of its own.
    """

    user: str
    policy: IdentityPolicy | None = None
    valid_until: float | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client: the provider that said yes, the user, their policy.

    Hashable, so it serves as a C{twisted.cred} avatar ID.
    """

    provider: str
    user: str
    policy: IdentityPolicy = UNRESTRICTED

    @property
    def name(self) -> str:
        """How logs, rate limits and the queue name this identity: C{provider/user}.

        The built-in C{SMTP_USERNAME} user has no provider and keeps its
        bare name, as before identities existed.
        """
        return f"{self.provider}/{self.user}" if self.provider else self.user


class Backend(Protocol):
    """One configured identity provider."""

    @property
    def name(self) -> str: ...

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        """Fire with a L{Verified}; fail with C{UnauthorizedLogin} or L{BackendUnavailable}."""
        ...


def text(value: bytes | str) -> str:
    """A credential field as text (Twisted gives bytes, tests may give str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@implementer(ICredentialsChecker)
class BackendChecker:
    """Any L{Backend} as a C{twisted.cred} checker of its own (user name and password).

    The relay puts one L{smtpproxy.identities.router.IdentityChecker} in
    its portal, which chooses among backends; this adapter lets a single
    backend stand in a portal by itself (the HTTP API, tests).
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> defer.Deferred[Any]:
        # Any: the avatar ID is an Identity; the interface stub says bytes.
        checking = self.backend.check(text(creds.username), text(creds.password))
        name = self.backend.name
        return checking.addCallback(
            lambda v: Identity(name, v.user, v.policy if v.policy is not None else UNRESTRICTED)
        )
