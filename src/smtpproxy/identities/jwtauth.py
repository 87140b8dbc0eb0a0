"""The C{jwt} backend: tokens signed by a key from the identity provider's JWKS.

The key set is fetched with treq and kept.  A token naming a key id we
do not hold triggers a fresh fetch (a provider rotated its keys), but at
most once a minute, so a stream of tokens with made-up key ids cannot
make us hammer the provider; concurrent logins share one fetch.  The set
is refreshed anyway after C{jwks_cache_seconds}.  No key set at all (the
provider never answered) is L{BackendUnavailable}; a token we cannot
verify against a key set we hold is a plain refusal.

A key id we do not hold is a refusal only when this very login fetched
the set afresh and the id is still missing.  When the minute between
fetches has not passed yet, or the fetch failed, the token may well be
signed by a key the provider has just added: we cannot tell, so that is
L{BackendUnavailable} (C{454}, not counted), never a C{535} that would
count a valid token as a wrong password and get its client banned.  An
invented key id gains an attacker nothing: no signature is checked.
"""

from __future__ import annotations

import json

import treq
from twisted.cred import error
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from smtpproxy.identities import jose
from smtpproxy.identities.errors import BackendUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.httpauth import make_client
from smtpproxy.identities.model import Verified
from smtpproxy.identities.params import Params

#: The least time between two fetches caused by unknown key ids.
REFETCH_INTERVAL = 60.0
#: The least time between two fetches while no key set was ever fetched.
RETRY_INTERVAL = 5.0
MAX_JWKS_BYTES = 1_048_576


class _TooLargeError(Exception):
    """The key set's answer passed L{MAX_JWKS_BYTES} while being read."""


class JWTBackend:
    """Verifies tokens against one JWKS URL and the configured claims."""

    def __init__(
        self, entry: ProviderEntry, reactor: IReactorTime, clock: IReactorTime | None = None
    ) -> None:
        """@param clock: what token times and fetch intervals are read from (the reactor)."""
        p = Params(
            entry.name,
            entry.params,
            [
                "jwks_url",
                "iss",
                "aud",
                "sub",
                "claims",
                "leeway",
                "timeout",
                "tls_ca",
                "jwks_cache_seconds",
            ],
        )
        self.name = entry.name
        self.jwks_url = p.url("jwks_url")
        claims = entry.params.get("claims") or {}
        if not isinstance(claims, dict):
            raise p.error("claims", "a mapping of claim names to the values they must have")
        self.expected = jose.Expected(
            issuer=p.text("iss", ""),
            audience=p.text("aud", ""),
            subject=p.text("sub", ""),
            claims=claims,
            leeway=p.number("leeway", 30.0, 0.0, 300.0),
        )
        if not (self.expected.issuer and self.expected.audience):
            # A token for another application of the same provider must not pass.
            raise p.error("aud" if self.expected.issuer else "iss", "required (iss and aud)")
        self.timeout = p.number("timeout", 10.0, 0.1, 120.0)
        self.max_age = p.number("jwks_cache_seconds", 3600.0, 60.0, 86400.0)
        self._reactor = reactor
        self._clock = clock or reactor
        self._client, self._pool = make_client(reactor, p.file("tls_ca"), p.where + ".tls_ca")
        self._keys: dict[str | None, jose.JWK] = {}
        self._fetched_at: float | None = None
        self._tried_at: float | None = None
        self._fetching: defer.Deferred[None] | None = None
        self._waiting: list[defer.Deferred[None]] = []

    def close(self) -> defer.Deferred[None]:
        """Close the kept-alive connection to the key set URL (at shutdown)."""
        closing: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closing

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        try:
            token = jose.parse(secret)
        except jose.TokenError as e:
            return defer.fail(error.UnauthorizedLogin(f"token refused: {e}"))
        return defer.Deferred.fromCoroutine(self._check(token))

    async def _check(self, token: jose.Token) -> Verified:
        now = self._clock.seconds()
        stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
        wanted = stale or token.kid not in self._keys
        fresh = False  # this login saw a fetch succeed
        if wanted and self._may_refetch(now):
            try:
                await self._refresh()
                fresh = True
            except BackendUnavailable:
                if not self._keys:
                    raise
        if not self._keys:
            raise BackendUnavailable(self.name, "no key set yet (the last fetch failed)")
        key = self._key_for(token)
        if key is None:
            if token.kid is not None and not fresh:
                raise BackendUnavailable(self.name, "token of an unknown key id; set not refetched")
            raise error.UnauthorizedLogin("token refused: no key with its id")
        try:
            jose.verify_signature(token, key)
            subject = jose.check_claims(token.claims, self.expected, self._clock.seconds())
            until = jose.valid_until(token.claims, self.expected)
        except jose.TokenError as e:
            raise error.UnauthorizedLogin(f"token refused: {e}") from None
        # The router's success cache keeps this yes no longer than the token.
        return Verified(subject, valid_until=until)

    def _key_for(self, token: jose.Token) -> jose.JWK | None:
        if token.kid is not None:
            return self._keys.get(token.kid)
        # No key id: only unambiguous when the set holds a single key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _may_refetch(self, now: float) -> bool:
        if self._tried_at is None:
            return True
        # Without any key set, retry sooner: every login fails until then.
        interval = REFETCH_INTERVAL if self._keys else RETRY_INTERVAL
        return now - self._tried_at >= interval

    def _refresh(self) -> defer.Deferred[None]:
        """Fetch the key set; logins arriving meanwhile wait for the same fetch."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        if self._fetching is None:
            fetching = defer.Deferred.fromCoroutine(self._fetch())
            fetching.addTimeout(self.timeout, self._reactor)
            self._fetching = fetching
            fetching.addBoth(self._fetched)
        return waiter

    def _fetched(self, result: object) -> None:
        self._fetching = None
        # Even a failed fetch counts: the next one waits its interval.
        self._tried_at = self._clock.seconds()
        waiting, self._waiting = self._waiting, []
        failure: BackendUnavailable | None = None
        if not isinstance(result, Failure):
            self._fetched_at = self._tried_at
        else:
            value = result.value
            failure = (
                value
                if isinstance(value, BackendUnavailable)
                else BackendUnavailable(self.name, f"key set not fetched: {type(value).__name__}")
            )
        for waiter in waiting:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    async def _fetch(self) -> None:
        chunks: list[bytes] = []
        received = 0

        def collect(chunk: bytes) -> None:
            # Counted as it arrives: an answer that never ends is cut off
            # at the bound, not held in memory until the timeout.
            nonlocal received
            received += len(chunk)
            if received > MAX_JWKS_BYTES:
                raise _TooLargeError()
            chunks.append(chunk)

        too_large = False
        try:
            response = await self._client.get(self.jwks_url, allow_redirects=False)
            try:
                # treq.collect drops the connection when the collector raises.
                await treq.collect(response, collect)
            except _TooLargeError:
                too_large = True
        except defer.CancelledError:
            raise
        except Exception as e:
            raise BackendUnavailable(
                self.name, f"key set not fetched: {type(e).__name__}"
            ) from None
        if response.code != 200:
            raise BackendUnavailable(self.name, f"key set URL answered {response.code}")
        if too_large:
            raise BackendUnavailable(self.name, "key set larger than 1 MB")
        body = b"".join(chunks)
        try:
            document = json.loads(body)
            entries = document["keys"]
            if not isinstance(entries, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise BackendUnavailable(self.name, "key set is not a JWKS document") from None
        keys: dict[str | None, jose.JWK] = {}
        for jwk in entries:
            if isinstance(jwk, dict):
                key = jose.load_jwk(jwk)
                kid = jwk.get("kid")
                if key is not None:
                    keys[kid if isinstance(kid, str) else None] = key
        if not keys:
            raise BackendUnavailable(self.name, "key set holds no usable public key")
        self._keys = keys
