"""L{smtpproxy.policy.guard}: the per-address memo changes nothing but the cost."""

from __future__ import annotations

import dataclasses

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.policy import guard as guard_module
from smtpproxy.policy import rules as policy
from smtpproxy.policy.guard import Guard, GuardSettings
from tests.support import OPEN


def _settings(**changes: object) -> GuardSettings:
    return dataclasses.replace(OPEN, **changes)  # type: ignore[arg-type]


class ClientMemoTests(SynchronousTestCase):
    def test_answers_match_the_policy_functions(self) -> None:
        """For every kind of address, the memo gives what policy decides from scratch."""
        settings = _settings(
            auth_enabled=True,
            restrict_with_auth=False,
            allowed_networks=policy.DEFAULT_PRIVATE_NETWORKS,
            trusted_networks=policy.parse_networks("10.1.0.0/16"),
        )
        guard = Guard(settings, Clock())
        for ip in ("10.1.2.3", "10.9.9.9", "203.0.113.7", "::1", "2001:db8::1", "junk"):
            for _ in range(2):  # the second answer comes from the memo
                refusal, needs_auth = guard.connect(ip)
                decision = policy.connection_decision(
                    ip, settings.allowed_networks, True, settings.trusted_networks
                )
                self.assertIsNone(refusal, ip)
                self.assertEqual(needs_auth, decision is policy.Decision.NEEDS_AUTH, ip)
                guard.disconnect(ip)
            self.assertEqual(guard.connections.count(policy.client_key(ip)), 0, ip)

    def test_refusal_is_remembered_and_never_counted(self) -> None:
        """A refused address is refused again, and never holds a connection slot."""
        guard = Guard(_settings(allowed_networks=policy.DEFAULT_PRIVATE_NETWORKS), Clock())
        for _ in range(3):
            refusal, _ = guard.connect("203.0.113.7")
            assert refusal is not None
            self.assertEqual((refusal.code, refusal.status), (554, "5.7.1"))
        self.assertEqual(guard.connections.count("203.0.113.7"), 0)

    def test_ipv6_clients_share_their_slash_64(self) -> None:
        """Counting by /64 still holds when the key comes from the memo."""
        guard = Guard(_settings(max_connections_per_ip=2), Clock())
        self.assertIsNone(guard.connect("2001:db8::1")[0])
        self.assertIsNone(guard.connect("2001:db8::2")[0])
        refusal, _ = guard.connect("2001:db8::3")
        assert refusal is not None
        self.assertEqual(refusal.code, 421)

    def test_memo_is_bounded(self) -> None:
        """Many distinct addresses cannot grow the memo past its limit."""
        self.patch(guard_module, "MAX_CACHED_CLIENTS", 50)
        guard = Guard(OPEN, Clock())
        for n in range(500):
            ip = f"10.0.{n // 250}.{n % 250}"
            guard.connect(ip)
            guard.disconnect(ip)
            self.assertLessEqual(len(guard._clients), 50)
        self.assertEqual(guard.connect("10.0.0.1"), (None, False))
