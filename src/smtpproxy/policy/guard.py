"""The gatekeeper all sessions share: relay policy plus the abuse counters.

L{smtpproxy.policy.rules} decides from settings alone and L{smtpproxy.policy.ratelimit}
counts; this module ties one of each to the settings so the protocol asks a
single object "may this happen?" at connect, AUTH, MAIL and RCPT time.
Nothing here touches a socket: time comes from the injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from smtpproxy.config import Config
from smtpproxy.errors import Reply
from smtpproxy.policy import rules as policy
from smtpproxy.policy.ratelimit import AuthFailureTracker, ConnectionCounter, RateLimiter


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """Everything the guard needs from the configuration.

    No field has a default: every default is declared once, in
    L{smtpproxy.config}, and L{settings_from} is how these are built.
    """

    auth_enabled: bool
    allowed_networks: policy.Networks
    # With AUTH on, allowed networks still refuse others only when the
    # operator listed them; by default anyone may try to authenticate.
    restrict_with_auth: bool
    trusted_networks: policy.Networks
    allowed_senders: policy.AddressPatterns
    allowed_recipients: policy.AddressPatterns
    max_connections: int
    max_connections_per_ip: int
    rate_limit_per_ip: int
    rate_limit_per_user: int
    auth_ban_failures: int
    auth_ban_time: float


# (counting key, refusal at connect or None, whether MAIL needs AUTH)
_Client = tuple[str, Reply | None, bool]
# Distinct client addresses remembered before the memo starts afresh.
MAX_CACHED_CLIENTS = 4096


class Guard:
    """Stateful policy shared by every session of one listener."""

    def __init__(self, settings: GuardSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.connections = ConnectionCounter(
            settings.max_connections, settings.max_connections_per_ip
        )
        self.per_ip = RateLimiter(settings.rate_limit_per_ip, clock)
        self.per_user = RateLimiter(settings.rate_limit_per_user, clock)
        self.auth_failures = AuthFailureTracker(
            clock,
            max_failures=settings.auth_ban_failures,
            window=settings.auth_ban_time,
            block=settings.auth_ban_time,
        )
        self._clients: dict[str, _Client] = {}

    def _client(self, ip: str) -> _Client:
        """What the settings alone say about C{ip}, worked out once per address.

        Parsing the address and testing it against every network costs more
        than the rest of admitting a connection; the answer never changes
        while the settings don't, and clients reconnect from few addresses.
        """
        known = self._clients.get(ip)
        if known is None:
            known = self._classify(ip)
            if len(self._clients) >= MAX_CACHED_CLIENTS:
                self._clients.clear()
            self._clients[ip] = known
        return known

    def _classify(self, ip: str) -> _Client:
        s = self.settings
        key = policy.client_key(ip)
        if (
            s.auth_enabled
            and s.restrict_with_auth
            and not policy.address_in(ip, s.allowed_networks)
        ):
            return key, Reply(554, "5.7.1", f"Connections from {ip} are not allowed"), False
        decision = policy.connection_decision(
            ip, s.allowed_networks, s.auth_enabled, s.trusted_networks
        )
        if decision is policy.Decision.REJECT:
            return key, Reply(554, "5.7.1", f"Relaying from {ip} is not allowed"), False
        return key, None, decision is policy.Decision.NEEDS_AUTH

    def connect(self, ip: str) -> tuple[Reply | None, bool]:
        """Admit a new connection from C{ip}.

        @return: C{(refusal, needs_auth)}: a reply to send before closing, or
            None to greet; and whether MAIL needs AUTH first.  A refusal
            means the connection was not counted (no L{disconnect} needed).
        """
        key, refusal, needs_auth = self._client(ip)
        if refusal is not None:
            return refusal, False
        if self.auth_failures.is_blocked(key):
            return Reply(421, "4.7.0", "Too many failed logins from your address, try later"), False
        refused = self.connections.try_open(key)
        if refused == "total":
            return Reply(421, "4.7.0", "Too many connections, try again later"), False
        if refused == "per-ip":
            return Reply(421, "4.7.0", "Too many connections from your address"), False
        return None, needs_auth

    def disconnect(self, ip: str) -> None:
        self.connections.close(self._client(ip)[0])

    def auth_blocked(self, ip: str) -> bool:
        return self.auth_failures.is_blocked(self._client(ip)[0])

    def auth_failed(self, ip: str, failures_here: int) -> tuple[float, bool]:
        """Record a failed AUTH: the delay before answering, and is C{ip} now blocked?"""
        blocked = self.auth_failures.record_failure(self._client(ip)[0])
        return self.auth_failures.delay_for(failures_here), blocked

    def sender(self, address: str) -> Reply | None:
        if self.settings.allowed_senders.allows(address):
            return None
        return Reply(550, "5.7.1", "Sender address not allowed to relay here")

    def recipient(self, address: str) -> Reply | None:
        if self.settings.allowed_recipients.allows(address):
            return None
        return Reply(550, "5.7.1", "Recipient address not allowed")

    def message(self, ip: str, user: str | None) -> Reply | None:
        """Count one message against the rate limits (at MAIL time)."""
        if not self.per_ip.allow(self._client(ip)[0]):
            return Reply(450, "4.7.1", "Too many messages from your address, slow down")
        if user is not None and not self.per_user.allow(user):
            return Reply(450, "4.7.1", "Too many messages from this user, slow down")
        return None


def settings_from(config: Config) -> GuardSettings:
    """Build L{GuardSettings} from the configuration."""
    return GuardSettings(
        auth_enabled=config.auth_enabled,
        allowed_networks=config.allowed_networks,
        restrict_with_auth=config.smtp_allowed_networks is not None,
        trusted_networks=config.smtp_trusted_networks,
        allowed_senders=config.smtp_allowed_senders,
        allowed_recipients=config.smtp_allowed_recipients,
        max_connections=config.smtp_max_connections,
        max_connections_per_ip=config.smtp_max_connections_per_ip,
        rate_limit_per_ip=config.smtp_rate_limit_per_ip,
        rate_limit_per_user=config.smtp_rate_limit_per_user,
        auth_ban_failures=config.smtp_auth_ban_failures,
        auth_ban_time=config.smtp_auth_ban_time,
    )
