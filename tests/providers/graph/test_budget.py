"""The sending budgets' pure rules: windows, waits, the choice of mailbox (explicit times)."""

from __future__ import annotations

import math

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.graph.budget import (
    DAY_BUCKETS,
    MESSAGES,
    RECIPIENTS,
    Budgets,
    Granted,
    Limits,
    Wait,
    Window,
)

A, B, C = "a@contoso.example", "b@contoso.example", "c@contoso.example"


class WindowTests(SynchronousTestCase):
    def test_counts_within_the_span_only(self) -> None:
        """What was counted leaves the window once its whole bucket is a span old."""
        window = Window(limit=3, span=60.0, buckets=60)
        window.add(100.2, 2)
        window.add(130.0, 1)
        self.assertEqual(window.used(159.9), 3)
        # The bucket [100, 101) leaves at 161: counted until then, never freed early.
        self.assertEqual(window.used(160.9), 3)
        self.assertEqual(window.used(161.0), 1)
        self.assertEqual(window.used(191.0), 0)

    def test_wait_is_when_enough_leaves(self) -> None:
        """The wait for room is the end of the bucket whose leaving makes room."""
        window = Window(limit=3, span=60.0, buckets=60)
        for at in (10.0, 20.0, 30.0):
            window.add(at, 1)
        self.assertEqual(window.wait(40.0, 1), 31.0)  # 10's bucket leaves at 71
        self.assertEqual(window.wait(40.0, 2), 41.0)  # and 20's at 81
        self.assertEqual(window.wait(71.0, 1), 0.0)
        self.assertEqual(window.wait(40.0, 4), math.inf)

    def test_memory_is_bounded(self) -> None:
        """A day of sending at every second keeps at most one entry per bucket."""
        window = Window(limit=10**9, span=86_400.0, buckets=DAY_BUCKETS)
        for second in range(0, 2 * 86_400, 7):
            window.add(float(second), 1)
        self.assertLessEqual(len(window._slots), DAY_BUCKETS + 1)
        self.assertEqual(window.used(2 * 86_400.0), sum(1 for s in range(86_400, 2 * 86_400, 7)))

    def test_no_limit_counts_nothing(self) -> None:
        """A limit of 0 means not counted: always room."""
        window = Window(limit=0, span=60.0, buckets=60)
        window.add(1.0, 100)
        self.assertEqual((window.used(1.0), window.wait(1.0, 10**6)), (0, 0.0))

    def test_remove_gives_back_to_the_bucket_it_came_from(self) -> None:
        """A charge given back later leaves the earlier bucket, not a new one."""
        window = Window(limit=2, span=60.0, buckets=60)
        window.add(10.0, 2)
        window.remove(15.0, 1, at=10.0)
        self.assertEqual(window.used(15.0), 1)
        self.assertEqual(window.wait(15.0, 1), 0.0)

    def test_replace_takes_stored_counts_inside_the_window(self) -> None:
        """Counts read from the store replace ours; slots outside the window are ignored."""
        window = Window(limit=5, span=60.0, buckets=60)
        window.add(100.0, 5)
        window.replace(120.0, [(30, 4), (110, 2), (110, 1), (200, 9)])
        self.assertEqual(window.used(120.0), 3)


class BudgetsTests(SynchronousTestCase):
    def test_least_used_mailbox_takes_the_message(self) -> None:
        """Without a From match, mail spreads over the mailboxes: each goes to the
        least-used one, ties to the first configured."""
        budgets = Budgets(Limits(recipients_per_day=100, messages_per_minute=30), (A, B, C))
        chosen = [budgets.take((A, B, C), 1, 0.0) for _ in range(6)]
        self.assertEqual([c.mailbox for c in chosen if isinstance(c, Granted)], [A, B, C, A, B, C])
        budgets.take((A,), 30, 1.0)  # A is now far more used (recipients)
        chosen = [budgets.take((A, B, C), 1, 2.0) for _ in range(2)]
        self.assertEqual([c.mailbox for c in chosen if isinstance(c, Granted)], [B, C])

    def test_message_rate_then_wait(self) -> None:
        """Three messages a minute: the fourth waits until the first one's bucket leaves."""
        budgets = Budgets(Limits(messages_per_minute=3), (A,))
        for at in (0.5, 1.5, 2.5):
            self.assertEqual(budgets.take((A,), 1, at), Granted(A))
        self.assertEqual(budgets.take((A,), 1, 3.0), Wait(58.0, MESSAGES, (A,)))
        self.assertEqual(budgets.take((A,), 1, 61.0), Granted(A))

    def test_recipients_per_day(self) -> None:
        """The day's recipients bind: the wait runs until the day-old bucket leaves, and
        names the recipient limit."""
        budgets = Budgets(Limits(recipients_per_day=10, messages_per_minute=0), (A,))
        self.assertEqual(budgets.take((A,), 8, 0.0), Granted(A))
        decision = budgets.take((A,), 3, 3600.0)
        self.assertEqual(decision, Wait(86_460.0 - 3600.0, RECIPIENTS, (A,)))
        self.assertEqual(budgets.take((A,), 2, 3600.0), Granted(A))

    def test_every_mailbox_full_waits_for_the_first_to_free(self) -> None:
        """All candidates out of budget: the wait is the shortest of theirs."""
        budgets = Budgets(Limits(messages_per_minute=1), (A, B))
        budgets.take((A,), 1, 0.0)
        budgets.take((B,), 1, 20.0)
        decision = budgets.take((A, B), 1, 30.0)
        self.assertEqual(decision, Wait(31.0, MESSAGES, (A, B)))

    def test_from_match_is_not_moved(self) -> None:
        """A message that may only go from A waits for A even while B has room."""
        budgets = Budgets(Limits(messages_per_minute=1), (A, B))
        budgets.take((A,), 1, 0.0)
        self.assertIsInstance(budgets.take((A,), 1, 1.0), Wait)
        self.assertEqual(budgets.take((A, B), 1, 1.0), Granted(B))

    def test_more_recipients_than_a_day_allows(self) -> None:
        """A message with more recipients than the whole day's budget can never go."""
        budgets = Budgets(Limits(recipients_per_day=5), (A,))
        decision = budgets.take((A,), 6, 0.0)
        assert isinstance(decision, Wait)
        self.assertEqual(decision.delay, math.inf)

    def test_give_back(self) -> None:
        """A charge given back frees its room at once."""
        budgets = Budgets(Limits(messages_per_minute=1), (A,))
        budgets.take((A,), 1, 0.0)
        budgets.give_back(A, 1, 5.0, at=0.0)
        self.assertEqual(budgets.take((A,), 1, 5.0), Granted(A))

    def test_mailboxes_are_case_insensitive(self) -> None:
        """Relay@ and relay@ share one budget, as they share one Exchange mailbox."""
        budgets = Budgets(Limits(messages_per_minute=1), (A,))
        budgets.take((A.upper(),), 1, 0.0)
        self.assertIsInstance(budgets.take((A,), 1, 0.0), Wait)
