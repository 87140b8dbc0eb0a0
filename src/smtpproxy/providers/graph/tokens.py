"""The Entra ID access token: how to ask for it, how to read the answer, how to cache it.

The client-credentials grant gives a bearer token valid for about an hour.
Asking for one per message would double our latency and invite throttling
from Entra, so L{TokenCache} keeps the token, renews it a few minutes before
it expires, and makes sure that however many messages need a token at the
same moment, only one request is in flight.  The renewal runs beside the
mail: until the current token expires, messages go on using it, so a slow
or failing Entra ID delays no message that a valid token could send.

Nothing here does I/O: the cache is handed a C{fetch} function (the provider
supplies one that talks HTTP) and a clock, so tests drive it with a
L{twisted.internet.task.Clock} and Deferreds they fire by hand.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.graph.retry import Problem

log = Logger(namespace="smtpproxy.graph")

# Renew this long before expiry (or a tenth of the lifetime for short-lived
# tokens), so that a request started just before expiry does not carry a
# token that dies on the way.
REFRESH_MARGIN = 300.0

# After a background renewal fails (the current token still valid), wait
# this long before the next one, doubling per failure up to the cap:
# without it every message past the renewal time would send Entra ID a
# token request of its own.  The cap keeps several attempts within the
# renewal margin; a caller with no valid token fetches regardless.
RENEWAL_RETRY_FIRST = 5.0
RENEWAL_RETRY_MAX = 60.0


def renewal_retry_delay(failures: int) -> float:
    """Seconds to wait before the next background renewal after C{failures} (>= 1) in a row."""
    return min(RENEWAL_RETRY_FIRST * 2.0 ** min(failures - 1, 16), RENEWAL_RETRY_MAX)


def token_url(authority: str, tenant: str) -> str:
    """The v2.0 token endpoint of C{tenant} at C{authority} (sovereign clouds differ)."""
    return f"{authority.rstrip('/')}/{quote(tenant, safe='')}/oauth2/v2.0/token"


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and the clock readings at which to renew and to stop using it."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float


def parse_token(body: bytes, now: float) -> Token:
    """Read a successful token response.

    @raise ValueError: the body is not the documented shape.
    """
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("token response is not a JSON object")
    value = document.get("access_token")
    token_type = document.get("token_type", "Bearer")
    lifetime = document.get("expires_in")
    if not isinstance(value, str) or not value:
        raise ValueError("token response has no access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ValueError("token response is not a bearer token")
    # Entra's v1 endpoint and the instance metadata service send expires_in
    # as a string; App Service's identity endpoint sends only expires_on
    # (POSIX seconds).  Accept all three.
    try:
        if isinstance(lifetime, (int, float, str)):
            seconds = float(lifetime)
        else:
            expires_on = document.get("expires_on")
            seconds = float(expires_on) - now if isinstance(expires_on, (int, str)) else 0.0
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError("token response has no usable expires_in")
    margin = min(REFRESH_MARGIN, seconds / 10)
    return Token(value, now + seconds, now + seconds - margin)


# AADSTS codes an operator is likely to meet, with what to change.
_HINTS = {
    "AADSTS7000215": "GRAPH_CLIENT_SECRET is wrong (use the secret's value, not its id)",
    "AADSTS7000222": "the client secret has expired; create a new one",
    "AADSTS700016": "GRAPH_CLIENT_ID is not an application in this tenant",
    "AADSTS90002": "GRAPH_TENANT_ID does not name a tenant",
    "AADSTS900023": "GRAPH_TENANT_ID is not a valid tenant id or domain",
    "AADSTS70011": "the scope is invalid; check GRAPH_ENDPOINT",
    "AADSTS500011": "the resource is not known in this tenant; check GRAPH_ENDPOINT",
    "AADSTS7000112": "the application is disabled",
    "AADSTS700027": (
        "the client assertion is invalid: is the certificate in GRAPH_CLIENT_CERTIFICATE_FILE"
        " uploaded to the app registration?"
    ),
    "AADSTS700024": "the client assertion is outside its validity: check this host's clock",
    "AADSTS70021": (
        "no federated credential of the app matches the token: check its issuer, subject"
        " (system:serviceaccount:<namespace>:<name>) and audience"
    ),
    "AADSTS700211": "no federated credential of the app has the token's issuer (the OIDC URL)",
    "AADSTS700213": (
        "no federated credential of the app has the token's subject"
        " (system:serviceaccount:<namespace>:<name>)"
    ),
}


# The instance metadata service answers 404 while it is being updated and
# 410 while its host agent restarts (Microsoft's retry guidance for managed
# identities lists 404, 410, 429 and 5xx as worth retrying).
_MANAGED_RETRY = frozenset({404, 410})


def token_problem(
    status: int, body: bytes, retry_after: float | None, *, managed: bool = False
) -> Problem:
    """Classify a failed token request.

    Throttling and server errors are retried (for a managed identity also
    404 and 410).  Everything else is our own misconfiguration (wrong
    secret, unknown tenant, disabled app, no identity on this host): the
    message is not at fault, so the SMTP client gets a 451 and the operator
    gets the AADSTS code, trace id and correlation id in the log.
    """
    document: object = None
    with contextlib.suppress(ValueError):
        document = json.loads(body)
    info = document if isinstance(document, dict) else {}
    error = info.get("error") if isinstance(info.get("error"), str) else f"HTTP{status}"
    description = info.get("error_description")
    aadsts = ""
    if isinstance(description, str):
        match = re.search(r"AADSTS\d+", description)
        aadsts = match.group(0) if match else ""
    codes = info.get("error_codes")
    if not aadsts and isinstance(codes, list) and codes and isinstance(codes[0], int):
        aadsts = f"AADSTS{codes[0]}"
    fields = {"graph_code": str(error)}
    for key in ("trace_id", "correlation_id"):
        value = info.get(key)
        if isinstance(value, str):
            fields[key] = value
    if aadsts:
        fields["aadsts"] = aadsts
        if aadsts in _HINTS:
            fields["hint"] = _HINTS[aadsts]
    which = "managed identity token request" if managed else "token request"
    summary = f"{which} HTTP {status} {error} {aadsts}".rstrip()
    if status == 429 or status >= 500 or (managed and status in _MANAGED_RETRY):
        return Problem(
            summary,
            True,
            TransientDeliveryError("Entra ID is temporarily unavailable, try again later", "4.4.5"),
            retry_after,
            status,
            str(error),
            fields=fields,
        )
    who = "the managed identity endpoint refused" if managed else "Entra ID refused its credentials"
    reason = f"relay misconfigured: {who} ({error} {aadsts})".rstrip()
    return Problem(
        summary,
        False,
        TransientDeliveryError(reason.rstrip() + "; try again later", "4.3.5"),
        None,
        status,
        str(error),
        fields=fields,
    )


class TokenCache:
    """One token shared by every message, renewed before it expires, fetched once at a time.

    @ivar fetches: how many fetches were started (for tests and metrics).
    """

    def __init__(self, clock: IReactorTime, fetch: Callable[[], Deferred[Token]]) -> None:
        self._clock = clock
        self._fetch = fetch
        self._token: Token | None = None
        self._waiters: list[Deferred[str]] = []
        self._fetching = False
        # Background renewals that failed in a row, and when the next may start.
        self._renewal_failures = 0
        self._renew_after = 0.0
        self.fetches = 0

    def get(self) -> Deferred[str]:
        """The current token's value, fetching a new one when needed.

        Past its renewal time but before it expires, the current token is
        answered at once and the renewal started in the background (one at a
        time; after a failed one, not before L{renewal_retry_delay} has
        passed): only a caller with no valid token waits for a fetch, which
        it starts at once whatever the back-off.

        Cancelling the returned Deferred only stops this caller waiting; the
        fetch carries on for the others.
        """
        token = self._token
        now = self._clock.seconds()
        if token is not None and now < token.expires_at:
            if now >= token.refresh_at and now >= self._renew_after and not self._fetching:
                self._start()
            return succeed(token.value)
        waiter: Deferred[str] = Deferred(self._forget)
        self._waiters.append(waiter)
        if not self._fetching:
            self._start()
        return waiter

    def invalidate(self, value: str) -> None:
        """Graph refused the token C{value}: forget it, unless a newer one replaced it already.

        Comparing values means that ten messages refused with the same
        expired token cause one refresh, not ten.
        """
        if self._token is not None and self._token.value == value:
            self._token = None

    def _forget(self, waiter: Deferred[str]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _start(self) -> None:
        self._fetching = True
        self.fetches += 1
        self._fetch().addBoth(self._finished)

    def _finished(self, result: Token | Failure) -> None:
        self._fetching = False
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Token):
            self._token = result
            self._renewal_failures = 0
            self._renew_after = 0.0
            for waiter in waiters:
                waiter.callback(result.value)
            return
        previous = self._token
        now = self._clock.seconds()
        if previous is not None and now < previous.expires_at:
            # Renewal failed but the old token is still good for a while:
            # keep sending rather than fail mail over an early refresh, and
            # try again after a back-off (one warning per failed fetch).
            self._renewal_failures += 1
            delay = renewal_retry_delay(self._renewal_failures)
            self._renew_after = now + delay
            log.warn(
                "token renewal failed; using the current token until it expires",
                expires_in=round(previous.expires_at - now),
                retry_in=round(delay),
                failures=self._renewal_failures,
                error=str(result.value) if isinstance(result.value, TransientDeliveryError) else "",
            )
            for waiter in waiters:
                waiter.callback(previous.value)
            return
        if isinstance(result.value, CancelledError):
            for waiter in waiters:
                waiter.errback(TransientDeliveryError("token request cancelled"))
        else:
            for waiter in waiters:
                waiter.errback(result)
