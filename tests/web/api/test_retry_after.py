"""The API's Retry-After after a temporary failure, whatever wait the provider carried."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.web.api.submit import DEFAULT_RETRY_AFTER, LONGEST_RETRY_AFTER, error_for_failure


def _failure(wait: float) -> TransientDeliveryError:
    error = TransientDeliveryError("Graph ServiceUnavailable: temporarily unavailable", "4.4.5")
    error.retry_after = wait
    return error


class RetryAfterTests(SynchronousTestCase):
    def test_any_float_gives_a_usable_503(self) -> None:
        """inf, huge, NaN, negative and zero waits never raise: a 503 with a whole
        number of seconds from 1 to LONGEST_RETRY_AFTER (DEFAULT_RETRY_AFTER when the wait
        is no wait)."""
        cases = {
            float("inf"): LONGEST_RETRY_AFTER,
            1e300: LONGEST_RETRY_AFTER,
            2.3e9: LONGEST_RETRY_AFTER,
            float("nan"): DEFAULT_RETRY_AFTER,
            float("-inf"): DEFAULT_RETRY_AFTER,
            -5.0: DEFAULT_RETRY_AFTER,
            0.0: DEFAULT_RETRY_AFTER,
            0.2: 1,
            17.6: 18,
        }
        for wait, expected in cases.items():
            answer = error_for_failure(_failure(wait))
            self.assertEqual((answer.status, answer.retry_after), (503, expected), repr(wait))
