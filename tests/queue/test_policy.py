"""The queue's retry, expiry and give-up decisions, with plain numbers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.queue.model import Outcome, Recipients
from smtpproxy.queue.policy import (
    JITTER,
    Dead,
    Delivered,
    Retry,
    Schedule,
    after_partial,
    decide,
    request_id,
    wait,
)

HOUR = 3600.0
SCHEDULE = Schedule(min_interval=60.0, max_interval=HOUR, max_age=5 * 86400.0)
T0 = 1_700_000_000.0


def _throttled(retry_after: float | None = None) -> TransientDeliveryError:
    error = TransientDeliveryError("Graph ApplicationThrottled: temporarily unavailable", "4.4.5")
    error.retry_after = retry_after
    return error


def _reply(decision: object) -> str:
    assert isinstance(decision, Retry | Dead), decision
    return decision.reply


class WaitTests(SynchronousTestCase):
    def test_doubles_from_the_minimum_to_the_maximum(self) -> None:
        """Without jitter the waits are 1, 2, 4 ... minutes, then the maximum for ever."""
        waits = [wait(n, SCHEDULE, 0.0) for n in range(1, 10)]
        self.assertEqual(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600])
        self.assertEqual(wait(10_000, SCHEDULE, 0.0), HOUR)

    def test_jitter_only_shortens(self) -> None:
        """Jitter takes at most JITTER of the wait off, so no wait passes the maximum."""
        self.assertEqual(wait(1, SCHEDULE, 0.5), 60 * (1 - JITTER / 2))
        almost_one = 0.999999
        self.assertGreaterEqual(wait(1, SCHEDULE, almost_one), 60 * (1 - JITTER))
        self.assertLessEqual(wait(20, SCHEDULE, 0.0), HOUR)
        self.assertLess(wait(20, SCHEDULE, almost_one), HOUR)


class DecideTests(SynchronousTestCase):
    def test_success(self) -> None:
        """No error: delivered."""
        self.assertEqual(decide(None, 3, T0, T0 + 10, SCHEDULE, 0.0), Delivered())

    def test_temporary_failure_retries_later(self) -> None:
        """A 451 is retried after the backoff for its attempt count, with the reply recorded."""
        decision = decide(_throttled(), 2, T0, T0 + 100, SCHEDULE, 0.0)
        self.assertEqual(
            decision,
            Retry(T0 + 100 + 120, "451 4.4.5 Graph ApplicationThrottled: temporarily unavailable"),
        )

    def test_unknown_exception_is_temporary(self) -> None:
        """A bug in a provider is not the sender's fault: retry, never bounce."""
        decision = decide(ValueError("oops"), 1, T0, T0, SCHEDULE, 0.0)
        assert isinstance(decision, Retry)
        self.assertEqual(decision.reply, "451 4.3.0 Local error in processing, try again later")

    def test_permanent_failure_is_dead_at_once(self) -> None:
        """A 5xx makes the message dead on its first attempt, however young."""
        error = PermanentDeliveryError("Graph ErrorInvalidRecipients", "5.1.1", 550)
        decision = decide(error, 1, T0, T0, SCHEDULE, 0.0)
        self.assertEqual(decision, Dead(Outcome.FAILED, "550 5.1.1 Graph ErrorInvalidRecipients"))

    def test_retry_after_is_a_floor(self) -> None:
        """Graph's Retry-After longer than the backoff is honoured, up to the schedule's
        longest wait; a shorter one does not cut the backoff short."""
        longer = decide(_throttled(retry_after=1800.0), 1, T0, T0, SCHEDULE, 0.0)
        self.assertEqual(longer, Retry(T0 + 1800, _reply(longer)))
        capped = decide(_throttled(retry_after=7200.0), 1, T0, T0, SCHEDULE, 0.0)
        self.assertEqual(capped, Retry(T0 + HOUR, _reply(capped)))
        shorter = decide(_throttled(retry_after=5.0), 1, T0, T0, SCHEDULE, 0.0)
        self.assertEqual(shorter, Retry(T0 + 60, _reply(shorter)))

    def test_far_future_retry_after_does_not_expire_a_young_message(self) -> None:
        """A wait asked for past QUEUE_MAX_AGE (an HTTP date in 2100 is some 2.3e9 s)
        is cut to the schedule's longest wait: the message is retried, not dead."""
        decision = decide(_throttled(retry_after=2.3e9), 1, T0, T0, SCHEDULE, 0.0)
        self.assertEqual(decision, Retry(T0 + HOUR, _reply(decision)))

    def test_held_back_without_an_attempt_comes_back_exactly_then(self) -> None:
        """A message a sending budget held back (not_attempted) is due again exactly at
        its retry_after, however many times it was held: no back-off is added."""
        error = _throttled(retry_after=5.0)
        error.not_attempted = True
        for attempts in (1, 9):
            decision = decide(error, attempts, T0, T0 + 10, SCHEDULE, 0.0)
            assert isinstance(decision, Retry)
            self.assertEqual(decision.at, T0 + 15)

    def test_nonsense_retry_after_ignored(self) -> None:
        """A negative or infinite Retry-After falls back to the backoff."""
        for value in (-1.0, float("inf"), float("nan")):
            decision = decide(_throttled(retry_after=value), 1, T0, T0, SCHEDULE, 0.0)
            self.assertEqual(decision, Retry(T0 + 60, _reply(decision)))

    def test_expires_when_the_next_attempt_is_past_the_maximum_age(self) -> None:
        """Postfix-like: a temporary failure whose next try would fall after queued_at +
        max_age makes the message dead now; one that still fits is retried."""
        max_age = SCHEDULE.max_age
        now = T0 + max_age - HOUR
        fits = decide(_throttled(), 30, T0, now, SCHEDULE, 0.0)
        self.assertEqual(fits, Retry(T0 + max_age, _reply(fits)))
        late = decide(_throttled(), 30, T0, now + 1, SCHEDULE, 0.0)
        self.assertEqual(late, Dead(Outcome.EXPIRED, _reply(fits)))

    def test_reply_is_clipped(self) -> None:
        """A provider's long reason is kept bounded in the history."""
        decision = decide(TransientDeliveryError("x" * 5000), 1, T0, T0, SCHEDULE, 0.0)
        assert isinstance(decision, Retry)
        self.assertLessEqual(len(decision.reply), 500)
        self.assertTrue(decision.reply.startswith("451 4.3.0 xxx"))


class RequestIdTests(SynchronousTestCase):
    def test_read_from_the_error(self) -> None:
        """Graph's request id rides on the error; absent or empty is None."""
        error = _throttled()
        self.assertIsNone(request_id(error))
        self.assertIsNone(request_id(None))
        error.request_id = "5e8c1f1a-0000-4000-8000-000000000001"
        self.assertEqual(request_id(error), "5e8c1f1a-0000-4000-8000-000000000001")
        error.request_id = ""
        self.assertIsNone(request_id(error))


class AfterPartialTests(SynchronousTestCase):
    """after_partial: an attempt that reached some recipients, judged per recipient."""

    OWED = ("ok@x.example", "busy@x.example", "gone@x.example")

    def decide(
        self, refused: list[tuple[str, str, bool]], failed: tuple[str, ...] = (), attempts: int = 1
    ) -> object:
        return after_partial(self.OWED, failed, refused, attempts, T0, T0, SCHEDULE, 0.0)

    def test_temporary_owed_alone_on_the_back_off(self) -> None:
        """4xx-refused recipients are all that is owed next, after the normal back-off;
        5xx-refused ones join the failed."""
        decision = self.decide(
            [("busy@x.example", "450 4.2.1 Busy", False), ("gone@x.example", "550 5.1.1 No", True)],
            attempts=3,
        )
        self.assertEqual(
            decision,
            Retry(
                T0 + 240,
                "450 4.2.1 Busy (delivered to 1 of 3 recipients)",
                recipients=Recipients(("busy@x.example",), ("gone@x.example",)),
            ),
        )

    def test_permanent_only_is_dead_for_them(self) -> None:
        """Only 5xx refusals: dead now (a permanent failure), owed to nobody else."""
        decision = self.decide([("gone@x.example", "550 5.1.1 No", True)])
        self.assertEqual(
            decision,
            Dead(
                Outcome.FAILED,
                "550 5.1.1 No (delivered to 2 of 3 recipients)",
                Recipients(("gone@x.example",)),
            ),
        )

    def test_earlier_failures_end_dead_once_the_rest_is_delivered(self) -> None:
        """Everything owed now delivered, some failed for good before: dead for those."""
        decision = self.decide([], failed=("old@x.example",))
        assert isinstance(decision, Dead), decision
        self.assertEqual(
            (decision.outcome, decision.recipients),
            (
                Outcome.FAILED,
                Recipients(("old@x.example",)),
            ),
        )
        self.assertIn("old@x.example", decision.reply)

    def test_nothing_refused_nothing_failed_is_delivered(self) -> None:
        """No refusal and nothing failed before: delivered."""
        self.assertEqual(self.decide([]), Delivered())

    def test_every_recipient_refused_mixed(self) -> None:
        """Every recipient refused (an L{AllRefusedError}, judged here too): the 5xx ones
        fail at once and only the 4xx one is owed next; none is retried for nothing."""
        decision = self.decide(
            [
                ("ok@x.example", "550 5.1.1 No", True),
                ("busy@x.example", "450 4.2.1 Busy", False),
                ("gone@x.example", "550 5.1.1 No", True),
            ]
        )
        self.assertEqual(
            decision,
            Retry(
                T0 + 60,
                "450 4.2.1 Busy (delivered to 0 of 3 recipients)",
                recipients=Recipients(("busy@x.example",), ("ok@x.example", "gone@x.example")),
            ),
        )

    def test_every_recipient_refused_for_good(self) -> None:
        """Every recipient refused with 5xx: dead (failed) for all of them, now."""
        refused = [(address, "550 5.1.1 No", True) for address in self.OWED]
        self.assertEqual(
            self.decide(refused),
            Dead(
                Outcome.FAILED,
                "550 5.1.1 No (delivered to 0 of 3 recipients)",
                Recipients(self.OWED),
            ),
        )

    def test_past_max_age_expires_for_all_never_reached(self) -> None:
        """A retry that would fall past QUEUE_MAX_AGE: dead (expired) for the temporarily
        refused and the failed alike."""
        decision = after_partial(
            self.OWED,
            ("old@x.example",),
            [("busy@x.example", "450 4.2.1 Busy", False)],
            1,
            T0,
            T0 + SCHEDULE.max_age,
            SCHEDULE,
            0.0,
        )
        assert isinstance(decision, Dead), decision
        self.assertEqual(decision.outcome, Outcome.EXPIRED)
        self.assertEqual(decision.recipients, Recipients(("busy@x.example", "old@x.example")))
