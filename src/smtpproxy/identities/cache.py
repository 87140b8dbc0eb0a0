"""Remembering a successful check for a short time, without remembering the secret.

Backends cost: bcrypt is CPU by design, LDAP and HTTP are round trips.  A
client that logs in for every message (most do) would pay that each
time.  A yes is kept for C{seconds}, keyed on an HMAC of provider, user
and secret under a key made at start and never stored, so the table holds
no secret and a dump of it helps no one.  Only successes are kept: a
wrong password is always checked (and counted) afresh.  Bounded: past
C{max_entries} the oldest goes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class SuccessCache(Generic[T]):
    """A bounded, time-limited map from (provider, user, secret) to a result."""

    def __init__(self, seconds: float, max_entries: int, clock: IReactorTime) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._clock = clock
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, provider: str, user: str, secret: str) -> bytes:
        # NUL cannot occur in SASL fields (decode_plain refuses it), so the
        # three parts cannot be shifted into one another.
        data = "\x00".join((provider, user, secret)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def get(self, provider: str, user: str, secret: str) -> T | None:
        if self.seconds <= 0:
            return None
        key = self._digest(provider, user, secret)
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if self._clock.seconds() >= expires:
            del self._entries[key]
            return None
        return value

    def put(
        self, provider: str, user: str, secret: str, value: T, until: float | None = None
    ) -> None:
        """Keep C{value} for C{seconds}, but never past C{until} (a token's own end)."""
        if self.seconds <= 0:
            return
        expires = self._clock.seconds() + self.seconds
        if until is not None:
            expires = min(expires, until)
        key = self._digest(provider, user, secret)
        self._entries.pop(key, None)
        if expires <= self._clock.seconds():
            return
        self._entries[key] = (expires, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
