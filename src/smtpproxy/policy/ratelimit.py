"""Counters that keep abusive clients in check: rates, AUTH failures, connections.

Pure bookkeeping over plain values: time comes from an injected
C{IReactorTime} (a L{twisted.internet.task.Clock} in tests), nothing here
schedules calls or touches a socket.  Every table is bounded: keys that
carry no information any more are dropped as a side effect of normal use,
and each table has a hard cap past which the least recently used key is
forgotten, so a flood of distinct client addresses costs bounded memory.
Callers choose the key (see L{smtpproxy.policy.rules.client_key} for addresses).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from twisted.internet.interfaces import IReactorTime

DEFAULT_MAX_KEYS = 100_000

# Float arithmetic may leave a bucket a hair below a whole token after an
# exact refill period; this tolerance keeps "1 message per second" exact.
_EPSILON = 1e-9


@dataclass(slots=True)
class TokenBucket:
    """A bucket holding up to C{capacity} tokens, refilled continuously.

    @ivar tokens: tokens in the bucket at time C{updated}.
    @ivar updated: the clock reading C{tokens} was computed at.
    """

    tokens: float
    updated: float

    def take(self, now: float, capacity: float, per_second: float) -> bool:
        """Refill up to C{now}, then take one token if there is one."""
        elapsed = max(0.0, now - self.updated)  # a clock stepping back refills nothing
        self.tokens = min(capacity, self.tokens + elapsed * per_second)
        self.updated = max(now, self.updated)
        if self.tokens + _EPSILON >= 1.0:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False


class RateLimiter:
    """At most C{rate_per_minute} events per minute per key, token bucket style.

    A key starts with a full burst of C{rate_per_minute} tokens; each event
    takes one and tokens flow back at C{rate_per_minute / 60} per second.
    A rate of 0 or None means unlimited (the default for
    SMTP_RATE_LIMIT_PER_IP and SMTP_RATE_LIMIT_PER_USER).

    Memory: a bucket untouched for a minute is full again, exactly like a
    new one, so it is dropped; beyond C{max_keys} live buckets the least
    recently used is dropped too (that key then starts with a full burst,
    which is lenient, never stricter).
    """

    def __init__(
        self,
        rate_per_minute: int | None,
        clock: IReactorTime,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if rate_per_minute is not None and rate_per_minute < 0:
            raise ValueError("rate_per_minute must be 0 (unlimited) or more")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate_per_minute = rate_per_minute or 0
        self.max_keys = max_keys
        self._clock = clock
        # Least recently used first: every use moves its key to the end.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def unlimited(self) -> bool:
        return self.rate_per_minute == 0

    def __len__(self) -> int:
        """How many buckets are held (for tests and metrics)."""
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Count one event for C{key}; False means over the limit (say 450)."""
        if self.unlimited:
            return True
        now = self._clock.seconds()
        capacity = float(self.rate_per_minute)
        self._forget_full(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(capacity, now)
        allowed = bucket.take(now, capacity, capacity / 60.0)
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def _forget_full(self, now: float) -> None:
        # A bucket refills completely in 60 s, and the oldest updated comes
        # first, so stop at the first one touched within the last minute.
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if now - bucket.updated < 60.0:
                break
            del self._buckets[key]


class AuthFailureTracker:
    """Failed AUTH attempts per client address, and the lock-out they earn.

    C{max_failures} failures within C{window} seconds block the address for
    C{block} seconds (defaults: 10 in 10 minutes, blocked 10 minutes).  A
    later successful AUTH does not clear the count: otherwise one valid
    account would let its holder guess other users' passwords forever.

    Memory: an address whose newest failure is older than C{window} is
    forgotten, an expired block is removed, and each table holds at most
    C{max_keys} addresses (the least recently failing, or the soonest to
    expire, goes first).
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int = 10,
        window: float = 600.0,
        block: float = 600.0,
        max_delay: float = 5.0,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if max_failures < 1 or max_keys < 1:
            raise ValueError("max_failures and max_keys must be at least 1")
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_delay = max_delay
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()  # ip -> blocked until

    def __len__(self) -> int:
        """Addresses with failures on record or blocked (for tests and metrics)."""
        return len(self._failures) + len(self._blocked)

    def record_failure(self, ip: str) -> bool:
        """Count a failed AUTH from C{ip}; True if C{ip} is now blocked."""
        now = self._clock.seconds()
        self._expire(now)
        times = self._failures.pop(ip, None)
        if times is None:
            times = deque(maxlen=self.max_failures)
        while times and now - times[0] >= self.window:
            times.popleft()
        times.append(now)
        if len(times) >= self.max_failures:
            self._blocked.pop(ip, None)
            self._blocked[ip] = now + self.block
            while len(self._blocked) > self.max_keys:
                self._blocked.popitem(last=False)
            return True
        self._failures[ip] = times
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        return False

    def is_blocked(self, ip: str) -> bool:
        """Must C{ip} be refused (421 4.7.0) right now?"""
        now = self._clock.seconds()
        self._expire(now)
        until = self._blocked.get(ip)
        return until is not None and now < until

    def delay_for(self, failures_on_this_connection: int) -> float:
        """Seconds to wait before answering 535, given failures so far.

        The first failure is answered at once (people mistype), then the
        wait doubles: 0, 1, 2, 4, ... capped at C{max_delay}, so a guessing
        client on one connection slows down while a typo costs nothing.
        """
        if failures_on_this_connection <= 1:
            return 0.0
        exponent = min(failures_on_this_connection - 2, 32)  # no huge powers
        return float(min(self.max_delay, 2.0**exponent))

    def _expire(self, now: float) -> None:
        # Both tables are ordered oldest first (failure times only grow,
        # blocks all last the same time), so only the front needs looking at.
        while self._failures:
            ip, times = next(iter(self._failures.items()))
            if now - times[-1] < self.window:
                break
            del self._failures[ip]
        while self._blocked:
            ip, until = next(iter(self._blocked.items()))
            if now < until:
                break
            del self._blocked[ip]


Refusal = Literal["total", "per-ip"]


class ConnectionCounter:
    """Open connections, in total and per client address.

    C{max_total} and C{max_per_ip} of 0 or None mean unlimited.  Every
    successful L{try_open} must be paired with exactly one L{close};
    addresses with no open connection are not kept, so the table never
    holds more keys than there are open connections.
    """

    def __init__(self, max_total: int | None, max_per_ip: int | None) -> None:
        self.max_total = max_total or 0
        self.max_per_ip = max_per_ip or 0
        self.total = 0
        self._open: dict[str, int] = {}

    def count(self, ip: str) -> int:
        """Connections open from C{ip}."""
        return self._open.get(ip, 0)

    def __len__(self) -> int:
        """Addresses with at least one open connection."""
        return len(self._open)

    def try_open(self, ip: str) -> Refusal | None:
        """Count a new connection from C{ip}, or say which cap it would pass.

        @return: None if the connection was counted (call L{close} when it
            ends), else C{"total"} or C{"per-ip"} and nothing was counted.
        """
        if self.max_total and self.total >= self.max_total:
            return "total"
        current = self._open.get(ip, 0)
        if self.max_per_ip and current >= self.max_per_ip:
            return "per-ip"
        self._open[ip] = current + 1
        self.total += 1
        return None

    def close(self, ip: str) -> None:
        """Forget one connection from C{ip}; extra calls do nothing."""
        current = self._open.get(ip, 0)
        if current <= 0:
            return
        if current == 1:
            del self._open[ip]
        else:
            self._open[ip] = current - 1
        self.total -= 1
