"""What one authenticated identity may do: its senders, recipients, mailbox and rate.

An identity (a user of a provider in C{AUTH_CONFIG}) may carry a policy of
its own.  It narrows the relay's global settings rather than replacing them:
C{SMTP_ALLOWED_SENDERS} and C{SMTP_ALLOWED_RECIPIENTS} still bound every
client, so an operator's global rule cannot be widened by a line in the
identity file.  Anonymous (network-trusted) clients keep only the global
settings.  Everything here is pure; the counting uses the injected clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from smtpproxy.addresses import mailbox_problem
from smtpproxy.policy.ratelimit import RateLimiter
from smtpproxy.policy.rules import AddressPatterns, parse_address_patterns

_ANY = AddressPatterns()
POLICY_KEYS = ("allowed_senders", "allowed_recipients", "mailbox", "rate_limit_per_min")


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    """One identity's limits; the defaults leave everything to the global settings.

    @ivar mailbox: the Graph mailbox (one of C{GRAPH_SENDER}) this identity
        sends as, or empty for the provider's own choice.
    @ivar rate_limit_per_min: messages per minute for this identity, 0 for
        no limit of its own.
    """

    allowed_senders: AddressPatterns = _ANY
    allowed_recipients: AddressPatterns = _ANY
    mailbox: str = ""
    rate_limit_per_min: int = 0


UNRESTRICTED = IdentityPolicy()


def _patterns(value: object, key: str) -> AddressPatterns:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        text = " ".join(value)
    else:
        raise ValueError(f"{key}: a list of address patterns or one string of them")
    try:
        return parse_address_patterns(text)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def parse_policy(raw: Mapping[str, object], base: IdentityPolicy = UNRESTRICTED) -> IdentityPolicy:
    """A policy from a C{policy:} mapping; keys not given keep C{base}'s values.

    @raise ValueError: naming the key that is wrong.
    """
    unknown = sorted(set(raw) - set(POLICY_KEYS))
    if unknown:
        raise ValueError(f"unknown policy key {unknown[0]!r}; known: {', '.join(POLICY_KEYS)}")
    senders, recipients = base.allowed_senders, base.allowed_recipients
    mailbox, rate = base.mailbox, base.rate_limit_per_min
    if "allowed_senders" in raw:
        senders = _patterns(raw["allowed_senders"], "allowed_senders")
    if "allowed_recipients" in raw:
        recipients = _patterns(raw["allowed_recipients"], "allowed_recipients")
    if "mailbox" in raw:
        value = raw["mailbox"]
        if not isinstance(value, str) or mailbox_problem(value) is not None:
            raise ValueError(f"mailbox: {value!r} is not an address")
        mailbox = value
    if "rate_limit_per_min" in raw:
        number = raw["rate_limit_per_min"]
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError("rate_limit_per_min: a whole number, 0 or more")
        rate = number
    return IdentityPolicy(senders, recipients, mailbox, rate)


class IdentityRates:
    """Per-identity message rates, each identity with the limit its policy names.

    One limiter per distinct limit: identities with the same rate share a
    limiter (keyed by identity name), so memory is bounded by the
    limiter's own bound, not by the number of identities ever seen.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._limiters: dict[int, RateLimiter] = {}

    def allow(self, identity: str, policy: IdentityPolicy) -> bool:
        """Count one message for C{identity}; False when its own limit is used up."""
        limit = policy.rate_limit_per_min
        if limit <= 0:
            return True
        limiter = self._limiters.get(limit)
        if limiter is None:
            limiter = self._limiters[limit] = RateLimiter(limit, self._clock)
        return limiter.allow(identity)
