"""Rate limits, AUTH lock-out and connection caps, driven by a Clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.policy.ratelimit import (
    AuthFailureTracker,
    ConnectionCounter,
    RateLimiter,
    TokenBucket,
)


def allowed_count(limiter: RateLimiter, key: str, attempts: int) -> int:
    return sum(limiter.allow(key) for _ in range(attempts))


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_refusal(self) -> None:
        """A fresh key gets a burst of rate_per_minute events, then is refused."""
        limiter = RateLimiter(5, Clock())
        self.assertEqual(allowed_count(limiter, "a", 20), 5)
        self.assertFalse(limiter.allow("a"))

    def test_keys_are_independent(self) -> None:
        """Exhausting one key leaves another untouched."""
        limiter = RateLimiter(2, Clock())
        self.assertEqual(allowed_count(limiter, "a", 5), 2)
        self.assertEqual(allowed_count(limiter, "b", 5), 2)

    def test_continuous_refill(self) -> None:
        """Tokens return at rate/60 per second, never more than the burst."""
        clock = Clock()
        limiter = RateLimiter(60, clock)  # one token per second
        self.assertEqual(allowed_count(limiter, "a", 100), 60)
        clock.advance(0.5)
        self.assertFalse(limiter.allow("a"))
        clock.advance(0.5)
        self.assertTrue(limiter.allow("a"))
        self.assertFalse(limiter.allow("a"))
        clock.advance(10)
        self.assertEqual(allowed_count(limiter, "a", 100), 10)
        clock.advance(3600)
        self.assertEqual(allowed_count(limiter, "a", 100), 60)

    def test_awkward_rate_refills_exactly(self) -> None:
        """With 7 per minute, one token is back after exactly 60/7 seconds."""
        clock = Clock()
        limiter = RateLimiter(7, clock)
        self.assertEqual(allowed_count(limiter, "a", 10), 7)
        for _ in range(21):
            clock.advance(60 / 7)
            self.assertTrue(limiter.allow("a"))
            self.assertFalse(limiter.allow("a"))

    def test_refusals_do_not_consume(self) -> None:
        """Hammering while refused does not push the next token further away."""
        clock = Clock()
        limiter = RateLimiter(60, clock)
        allowed_count(limiter, "a", 60)
        for _ in range(9):
            clock.advance(0.1)
            self.assertFalse(limiter.allow("a"))
        clock.advance(0.1)
        self.assertTrue(limiter.allow("a"))

    def test_unlimited(self) -> None:
        """A rate of 0 or None allows everything and keeps no state."""
        for rate in (0, None):
            limiter = RateLimiter(rate, Clock())
            self.assertTrue(limiter.unlimited)
            self.assertEqual(allowed_count(limiter, "a", 10_000), 10_000)
            self.assertEqual(len(limiter), 0)

    def test_bad_arguments(self) -> None:
        """A negative rate or a zero key cap is a programming error."""
        self.assertRaises(ValueError, RateLimiter, -1, Clock())
        self.assertRaises(ValueError, RateLimiter, 1, Clock(), 0)

    def test_idle_full_buckets_are_dropped(self) -> None:
        """A key idle for a minute is full again, so its bucket is forgotten."""
        clock = Clock()
        limiter = RateLimiter(10, clock)
        for i in range(1000):
            limiter.allow(f"client-{i}")
        self.assertEqual(len(limiter), 1000)
        clock.advance(59)
        limiter.allow("late")
        self.assertEqual(len(limiter), 1001)
        clock.advance(1)
        limiter.allow("later")
        self.assertEqual(len(limiter), 2)  # "late" and "later"

    def test_forgetting_changes_nothing(self) -> None:
        """A dropped bucket behaves exactly like the full bucket it would be."""
        clock = Clock()
        limiter = RateLimiter(3, clock)
        self.assertEqual(allowed_count(limiter, "a", 5), 3)
        clock.advance(60)
        limiter.allow("b")
        self.assertEqual(len(limiter), 1)
        self.assertEqual(allowed_count(limiter, "a", 5), 3)

    def test_key_cap_evicts_least_recently_used(self) -> None:
        """Past max_keys, the key used longest ago is dropped, busy keys stay."""
        clock = Clock()
        limiter = RateLimiter(2, clock, max_keys=3)
        self.assertEqual(allowed_count(limiter, "busy", 2), 2)
        for key in ("x", "y", "z", "w"):
            limiter.allow(key)
            limiter.allow("busy")  # refused, but keeps "busy" recent
        self.assertEqual(len(limiter), 3)
        self.assertFalse(limiter.allow("busy"))  # still remembered as exhausted
        # "x" and "y" were evicted: they start over with a full burst.
        self.assertEqual(allowed_count(limiter, "x", 5), 2)

    def test_memory_bounded_under_flood(self) -> None:
        """A flood of distinct keys within one minute never exceeds max_keys."""
        limiter = RateLimiter(1, Clock(), max_keys=500)
        for i in range(5000):
            limiter.allow(str(i))
            self.assertLessEqual(len(limiter), 500)

    def test_clock_going_backwards(self) -> None:
        """A clock stepping back neither refills nor breaks the bucket."""
        clock = Clock()
        clock.advance(1000)
        limiter = RateLimiter(60, clock)
        allowed_count(limiter, "a", 60)
        clock.rightNow = 500.0
        self.assertFalse(limiter.allow("a"))
        clock.rightNow = 1001.0
        self.assertTrue(limiter.allow("a"))

    @given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 30)), max_size=60))
    def test_never_more_than_burst_plus_refill(self, steps: list[tuple[int, float]]) -> None:
        """Over any schedule, allowed events never exceed burst + rate * minutes."""
        clock = Clock()
        limiter = RateLimiter(4, clock)
        allowed = 0
        for attempts, wait in steps:
            clock.advance(wait)
            allowed += allowed_count(limiter, "k", attempts)
        self.assertLessEqual(allowed, 4 + 4 * clock.seconds() / 60 + 1e-6)


class TokenBucketTests(SynchronousTestCase):
    def test_take(self) -> None:
        """The bucket refills by elapsed time, caps at capacity, and takes whole tokens."""
        bucket = TokenBucket(tokens=0.0, updated=0.0)
        self.assertFalse(bucket.take(0.5, capacity=2.0, per_second=1.0))
        self.assertTrue(bucket.take(1.0, capacity=2.0, per_second=1.0))
        self.assertAlmostEqual(bucket.tokens, 0.0)
        self.assertTrue(bucket.take(100.0, capacity=2.0, per_second=1.0))
        self.assertAlmostEqual(bucket.tokens, 1.0)


class AuthFailureTrackerTests(SynchronousTestCase):
    def test_blocked_after_max_failures(self) -> None:
        """The tenth failure within the window blocks the address, and only it."""
        clock = Clock()
        tracker = AuthFailureTracker(clock)
        for _ in range(9):
            self.assertFalse(tracker.record_failure("192.0.2.1"))
            clock.advance(60)
        self.assertFalse(tracker.is_blocked("192.0.2.1"))
        self.assertTrue(tracker.record_failure("192.0.2.1"))
        self.assertTrue(tracker.is_blocked("192.0.2.1"))
        self.assertFalse(tracker.is_blocked("192.0.2.2"))

    def test_block_expires(self) -> None:
        """The block lasts exactly `block` seconds and then starts over from zero."""
        clock = Clock()
        tracker = AuthFailureTracker(clock, max_failures=3, window=60, block=300)
        for _ in range(3):
            tracker.record_failure("a")
        clock.advance(299.5)
        self.assertTrue(tracker.is_blocked("a"))
        clock.advance(0.5)
        self.assertFalse(tracker.is_blocked("a"))
        self.assertFalse(tracker.record_failure("a"))  # the count started again
        self.assertEqual(len(tracker), 1)

    def test_old_failures_leave_the_window(self) -> None:
        """Failures spread wider than the window never add up to a block."""
        clock = Clock()
        tracker = AuthFailureTracker(clock, max_failures=3, window=600, block=600)
        for _ in range(50):
            self.assertFalse(tracker.record_failure("slow"))
            clock.advance(300)  # two per window at most
        self.assertFalse(tracker.is_blocked("slow"))
        tracker.record_failure("slow")
        clock.advance(299)
        self.assertTrue(tracker.record_failure("slow"))

    def test_delay_grows_and_is_capped(self) -> None:
        """535 delays go 0, 1, 2, 4, then stay at the cap, even for absurd counts."""
        tracker = AuthFailureTracker(Clock())
        self.assertEqual(
            [tracker.delay_for(n) for n in range(-1, 8)],
            [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0],
        )
        self.assertEqual(tracker.delay_for(10**9), 5.0)
        self.assertEqual(AuthFailureTracker(Clock(), max_delay=30).delay_for(6), 16.0)

    def test_memory_forgets_quiet_addresses(self) -> None:
        """Addresses with no failure in the window, and expired blocks, are dropped."""
        clock = Clock()
        tracker = AuthFailureTracker(clock, max_failures=2, window=100, block=50)
        for i in range(1000):
            tracker.record_failure(f"10.0.{i // 256}.{i % 256}")
        tracker.record_failure("blocked")
        tracker.record_failure("blocked")
        self.assertEqual(len(tracker), 1001)
        clock.advance(100)
        self.assertFalse(tracker.is_blocked("blocked"))
        self.assertEqual(len(tracker), 0)

    def test_key_cap(self) -> None:
        """A flood of distinct addresses never holds more than max_keys per table."""
        clock = Clock()
        tracker = AuthFailureTracker(clock, max_failures=2, max_keys=100)
        for i in range(1000):
            tracker.record_failure(f"a{i}")
            tracker.record_failure(f"b{i}")
            tracker.record_failure(f"b{i}")
            self.assertLessEqual(len(tracker), 200)
        # The newest block survives the cap.
        self.assertTrue(tracker.is_blocked("b999"))

    def test_bad_arguments(self) -> None:
        """A failure limit or key cap below one is a programming error."""
        self.assertRaises(ValueError, AuthFailureTracker, Clock(), 0)
        self.assertRaises(ValueError, AuthFailureTracker, Clock(), max_keys=0)


class ConnectionCounterTests(SynchronousTestCase):
    def test_per_ip_cap(self) -> None:
        """The per-address cap refuses the extra connection from that address only."""
        counter = ConnectionCounter(max_total=10, max_per_ip=2)
        self.assertIsNone(counter.try_open("a"))
        self.assertIsNone(counter.try_open("a"))
        self.assertEqual(counter.try_open("a"), "per-ip")
        self.assertIsNone(counter.try_open("b"))
        self.assertEqual((counter.total, counter.count("a")), (3, 2))
        counter.close("a")
        self.assertIsNone(counter.try_open("a"))

    def test_total_cap(self) -> None:
        """The total cap refuses everyone once reached, and frees up on close."""
        counter = ConnectionCounter(max_total=3, max_per_ip=50)
        for ip in ("a", "b", "c"):
            self.assertIsNone(counter.try_open(ip))
        self.assertEqual(counter.try_open("d"), "total")
        self.assertEqual(counter.try_open("a"), "total")
        counter.close("b")
        self.assertIsNone(counter.try_open("d"))

    def test_never_negative_and_forgets_idle(self) -> None:
        """Unmatched closes do nothing; addresses at zero leave the table."""
        counter = ConnectionCounter(max_total=5, max_per_ip=5)
        counter.close("ghost")
        self.assertEqual((counter.total, len(counter)), (0, 0))
        counter.try_open("a")
        counter.close("a")
        counter.close("a")
        self.assertEqual((counter.total, counter.count("a"), len(counter)), (0, 0, 0))
        self.assertEqual(counter.try_open("b"), None)
        counter.close("a")
        self.assertEqual(counter.total, 1)

    def test_unlimited(self) -> None:
        """0 or None disables a cap."""
        counter = ConnectionCounter(max_total=None, max_per_ip=0)
        for _ in range(1000):
            self.assertIsNone(counter.try_open("a"))
        self.assertEqual(counter.count("a"), 1000)

    @given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=200))
    def test_counts_match_open_connections(self, ops: list[tuple[bool, str]]) -> None:
        """Under any open/close sequence the counts equal the connections really open."""
        counter = ConnectionCounter(max_total=6, max_per_ip=3)
        really_open: dict[str, int] = {}
        for opening, ip in ops:
            if opening:
                if counter.try_open(ip) is None:
                    really_open[ip] = really_open.get(ip, 0) + 1
            elif really_open.get(ip):
                counter.close(ip)
                really_open[ip] -= 1
            else:
                counter.close(ip)  # a stray close
            self.assertEqual(counter.total, sum(really_open.values()))
            self.assertLessEqual(counter.total, 6)
            for key in "abcd":
                self.assertEqual(counter.count(key), really_open.get(key, 0))
                self.assertLessEqual(counter.count(key), 3)
            self.assertEqual(len(counter), sum(1 for n in really_open.values() if n))
