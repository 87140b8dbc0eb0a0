"""The API's rate limits: global, per client address and per key, as token buckets.

Each tier is a L{smtpproxy.policy.ratelimit.RateLimiter} (bounded tables,
time from an injected clock); this module only says which buckets a
request draws from, in which order, and how long a refused client should
wait.  The per-address tier is asked before the key is checked, so that
guessing keys is throttled like any other request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from smtpproxy.policy.ratelimit import RateLimiter
from smtpproxy.policy.rules import client_key

__all__ = ["Limits", "Refusal"]

#: The one bucket of the global tier.
_GLOBAL = "*"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A rate limit said no: which tier, and the seconds until a token is back."""

    tier: str
    retry_after: int


def _wait(rate_per_minute: int) -> int:
    """Whole seconds until one token has flowed back at C{rate_per_minute}."""
    return max(1, math.ceil(60.0 / rate_per_minute))


class Limits:
    """The three tiers; a rate of 0 turns a tier off.

    @param per_key: the default for keys without a C{rate_limit_per_min}.
    """

    def __init__(self, total: int, per_address: int, per_key: int, clock: IReactorTime) -> None:
        self._clock = clock
        self._total = RateLimiter(total, clock, max_keys=1)
        self._address = RateLimiter(per_address, clock)
        self._per_key_default = per_key
        # One limiter per distinct rate, so that a key's own rate (from the
        # keys file) is honoured; keys are few, so these tables stay small.
        self._by_rate: dict[int, RateLimiter] = {}

    def address(self, client: str) -> Refusal | None:
        """Count a request from C{client} (before its key is known)."""
        if self._address.allow(client_key(client)):
            return None
        return Refusal("address", _wait(self._address.rate_per_minute))

    def key(self, key_id: str, own_rate: int | None) -> Refusal | None:
        """Count a request made with key C{key_id}, then against the global tier."""
        rate = self._per_key_default if own_rate is None else own_rate
        if rate:
            limiter = self._by_rate.get(rate)
            if limiter is None:
                limiter = self._by_rate[rate] = RateLimiter(rate, self._clock)
            if not limiter.allow(key_id):
                return Refusal("key", _wait(rate))
        if not self._total.allow(_GLOBAL):
            return Refusal("global", _wait(self._total.rate_per_minute))
        return None
