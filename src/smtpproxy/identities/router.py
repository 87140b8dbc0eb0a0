"""The one checker in the relay's portal: selects providers, asks them, caches yes.

L{IdentityChecker} is what C{AUTH} reaches.  It reads the names the client
asked for from L{smtpproxy.identities.credentials.ClientCredentials}
(plain C{UsernamePassword} means none), picks the attempts with
L{smtpproxy.identities.selection.select} and asks each backend in turn
until one says yes.  A refusal from every one is C{UnauthorizedLogin}
(C{535}, counted by the guard).  If any backend could not answer and none
said yes, the client hears C{454} (the missing answer might have been
yes), and whether it counts depends on what the others did:

  - a backend that holds the user refused the secret: a password was
    tested, so it counts (L{RefusedWhileUnavailable}); otherwise an outage
    of one fallback would allow unlimited guessing at another;
  - only refusals that tested nothing (L{NoSuchUser}: the name may belong
    to the backend that is down): L{BackendUnavailable}, not counted, so a
    backend's own users are never banned because it was down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from smtpproxy.identities.cache import SuccessCache
from smtpproxy.identities.errors import BackendUnavailable, NoSuchUser, RefusedWhileUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.model import Backend, Identity, text
from smtpproxy.identities.selection import Attempt, requested_names, select
from smtpproxy.logsummary import LogSummary

log = Logger(namespace="smtpproxy.identities")


@implementer(ICredentialsChecker)
class IdentityChecker:
    """Checks a login against the configured providers; the avatar ID is an L{Identity}."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(
        self,
        providers: Sequence[ProviderEntry],
        backends: Mapping[str, Backend],
        clock: IReactorTime,
        cache_seconds: float = 0.0,
        cache_max_entries: int = 10_000,
    ) -> None:
        self.providers = tuple(providers)
        self.backends = dict(backends)
        self.cache: SuccessCache[Identity] = SuccessCache(cache_seconds, cache_max_entries, clock)
        # A backend that cannot answer fails every login at once, as often
        # as a client asks (invented JWT key ids, a full bcrypt pool), and
        # such a 454 is not counted by the guard: its lines are summarised
        # per client address like the session's refusals.
        self.log_summary = LogSummary(log, clock)

    def close(self) -> defer.Deferred[None]:
        """Close every backend's kept-alive connections (at shutdown)."""
        self.log_summary.stop()
        closing = []
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                closing.append(defer.maybeDeferred(close))
        return defer.DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def mailboxes(self) -> tuple[tuple[str, str], ...]:
        """Every C{mailbox} the file binds a login to, with where it is written.

        A provider's policy, and a backend's own per-user policies (userpass
        users), for the start-up check against the provider's mailboxes
        (L{smtpproxy.sendas}).
        """
        found = [(f"provider {e.name!r}", e.policy.mailbox) for e in self.providers]
        for backend in self.backends.values():
            own = getattr(backend, "mailboxes", None)
            if own is not None:
                found.extend(own())
        return tuple((where, mailbox) for where, mailbox in found if mailbox)

    def login_names(self) -> tuple[str, ...]:
        """Names a failed login may log as they are: provider names and listed users.

        Any other name could be a password typed into the wrong prompt; the
        relay logs it as a keyed hash (L{smtpproxy.logsafe.LoginNames}).
        """
        names = [e.name for e in self.providers if e.name]
        for backend in self.backends.values():
            names.extend(getattr(backend, "usernames", ()))
        return tuple(dict.fromkeys(names))

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> defer.Deferred[Any]:
        # Any: the avatar ID is an Identity; the interface stub says bytes.
        names = requested_names(getattr(creds, "sni", None), getattr(creds, "ehlo", None))
        attempts = select(self.providers, text(creds.username), text(creds.password), names)
        client = getattr(creds, "client", None) or "unknown"
        return defer.Deferred.fromCoroutine(self._try(attempts, client))

    async def _try(self, attempts: list[Attempt], client: str) -> Identity:
        unavailable: BackendUnavailable | None = None
        tested: str | None = None  # a provider that refused a secret it did test
        for attempt in attempts:
            entry = attempt.provider
            cached = self.cache.get(entry.name, attempt.user, attempt.secret)
            if cached is not None:
                return cached
            backend = self.backends[entry.name]
            try:
                verified = await backend.check(attempt.user, attempt.secret)
            except NoSuchUser:
                continue
            except error.UnauthorizedLogin:
                tested = tested or entry.name
                continue
            except BackendUnavailable as e:
                self._unavailable(entry, client, e)
                unavailable = e
                continue
            except defer.CancelledError:
                raise
            except Exception as e:
                # A backend's own bug must not reach the session as a
                # traceback per login: one summarised line, and this
                # provider counts as unable to answer (454, not counted;
                # the other providers are still asked).
                failed = BackendUnavailable(entry.name, f"unexpected error: {type(e).__name__}")
                self._unavailable(entry, client, failed)
                unavailable = failed
                continue
            identity = Identity(
                entry.name,
                verified.user,
                verified.policy if verified.policy is not None else entry.policy,
            )
            self.cache.put(entry.name, attempt.user, attempt.secret, identity, verified.valid_until)
            return identity
        if unavailable is not None:
            if tested is not None:
                raise RefusedWhileUnavailable(
                    tested, f"refused while {unavailable.provider} could not answer"
                )
            raise unavailable
        raise error.UnauthorizedLogin("no provider accepted these credentials")

    def _unavailable(self, entry: ProviderEntry, client: str, e: BackendUnavailable) -> None:
        self.log_summary.emit(
            LogLevel.warn,
            "identity backend unavailable",
            client,
            provider=entry.name,
            type=entry.type,
            reason=e.reason,
        )
