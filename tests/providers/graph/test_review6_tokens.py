"""Review 6: background token renewal when Entra ID keeps failing."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.graph.tokens import Token, TokenCache


class RenewalFailureTests(SynchronousTestCase):
    def test_failed_renewal_is_not_retried_by_every_message(self) -> None:
        """Past the renewal time, a renewal that fails at once (Entra ID refusing the
        credential after a secret rotation, or down) is started again by the very next
        get(): with mail flowing, every message sends Entra ID a token request during the
        five minutes before expiry (100 messages, 100 token requests), which invites the
        throttling the cache exists to avoid, and logs a "token renewal failed" warning per
        message.  Right: after a failed renewal the cache
        waits a while (a back-off of seconds) before the next background attempt, while
        messages go on using the still-valid token, and tries again within a minute.
        (tests/providers/graph/test_tokens.py test_failed_renewal_keeps_valid_token
        asserts the immediate re-fetch and must change with the fix.)"""
        clock = Clock()
        clock.advance(1000)
        first = [True]

        def fetch() -> Deferred[Token]:
            if first[0]:
                first[0] = False
                now = clock.seconds()
                return succeed(Token("t1", now + 3600, now + 3300))
            return fail(TransientDeliveryError("Entra ID is temporarily unavailable"))

        cache = TokenCache(clock, fetch)
        self.assertEqual(self.successResultOf(cache.get()), "t1")
        clock.advance(3300)  # the renewal time: 300 s of validity left
        for _ in range(100):
            self.assertEqual(self.successResultOf(cache.get()), "t1")
            clock.advance(0.01)  # 100 messages within one second
        self.assertLessEqual(cache.fetches, 3)
        # ... but it does try again within a minute, while the token is still valid.
        before = cache.fetches
        clock.advance(60)
        self.assertEqual(self.successResultOf(cache.get()), "t1")
        self.assertGreater(cache.fetches, before)
