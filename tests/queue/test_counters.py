"""Counters kept with the queue (L{smtpproxy.queue.store.CounterStore}), on both backends.

The Graph sending budgets are kept there; these tests hold each backend to
the counter rules (atomic adds, reads from a slot on, old slots forgotten,
kept over a reopen) and show a budget kept in a real store surviving a
restart and being shared by two keepers (two relay processes).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.graph.budget import Limits
from smtpproxy.providers.graph.budgetkeeper import BudgetKeeper
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.queue.store import CounterStore, QueueStore
from tests.queue.test_postgres_store import PostgresCase

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

A, B = "a@contoso.example", "b@contoso.example"
T0 = 1_700_000_000.0


class CountersContract(_Base):
    async def make_store(self) -> QueueStore:
        raise NotImplementedError

    async def counters(self) -> CounterStore:
        store = await self.make_store()
        assert isinstance(store, CounterStore)
        return store

    async def refused(self, keeper: BudgetKeeper, candidates: tuple[str, ...]) -> Exception:
        """The error C{keeper} refuses a one-recipient message with."""
        try:
            await keeper.charge(candidates, 1)
        except TransientDeliveryError as e:
            return e
        raise AssertionError("the keeper charged a budget that was used up")

    async def test_adds_sum_per_slot(self) -> None:
        """Adds to one slot sum (negative amounts too); reads start at the given slot
        and leave out slots at zero."""
        store = await self.counters()
        await store.add_counts([("k", 10, 2), ("k", 11, 1), ("j", 10, 5)], {})
        await store.add_counts([("k", 10, 3), ("k", 11, -1)], {})
        rows = await store.read_counts({"k": 0, "j": 0})
        self.assertEqual(sorted(rows), [("j", 10, 5), ("k", 10, 5)])
        self.assertEqual(await store.read_counts({"k": 11}), [])

    async def test_old_slots_are_forgotten(self) -> None:
        """forget_before deletes a key's older slots, and only that key's."""
        store = await self.counters()
        await store.add_counts([("k", 1, 1), ("k", 5, 1), ("j", 1, 1)], {})
        await store.add_counts([("k", 6, 1)], {"k": 5})
        rows = await store.read_counts({"k": -1, "j": -1})
        self.assertEqual(sorted(rows), [("j", 1, 1), ("k", 5, 1), ("k", 6, 1)])

    async def test_concurrent_adds_are_not_lost(self) -> None:
        """Many adds to one row at once, as deliveries in flight make them: none is lost."""
        store = await self.counters()
        await defer.gatherResults([store.add_counts([("k", 7, 1)], {}) for _ in range(40)])
        self.assertEqual(await store.read_counts({"k": 0}), [("k", 7, 40)])

    async def test_budget_survives_a_restart(self) -> None:
        """A keeper that used up a mailbox's budget, then a new keeper on a reopened
        store (a restarted relay): the new one refuses too, with retry_after, until the
        window has passed."""
        limits = Limits(messages_per_minute=2, recipients_per_day=100)
        clock = Clock()
        clock.advance(T0)
        first = BudgetKeeper(limits, (A,), clock)
        first.keep_in(await self.counters())
        for _ in range(2):
            await first.charge((A,), 1)
        second = BudgetKeeper(limits, (A,), clock)
        second.keep_in(await self.counters())
        refused = await self.refused(second, (A,))
        assert isinstance(refused, TransientDeliveryError)
        self.assertEqual((refused.status, refused.retry_after), ("4.7.0", 61.0))
        clock.advance(61.0)
        self.assertEqual((await second.charge((A,), 1)).mailbox, A)

    async def test_keepers_share_one_store(self) -> None:
        """Two keepers on one store (two relays on one queue) see each other's charges:
        the least-used choice spreads their mail over both mailboxes."""
        limits = Limits(messages_per_minute=1, recipients_per_day=100)
        clock = Clock()
        clock.advance(T0)
        store = await self.counters()
        one, two = BudgetKeeper(limits, (A, B), clock), BudgetKeeper(limits, (A, B), clock)
        one.keep_in(store)
        two.keep_in(store)
        self.assertEqual((await one.charge((A, B), 1)).mailbox, A)
        self.assertEqual((await two.charge((A, B), 1)).mailbox, B)
        await self.refused(one, (A, B))


class SQLiteCountersTests(CountersContract, TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "queue.db")

    async def make_store(self) -> QueueStore:
        """A new store object on the same file each time (as a restarted relay opens it)."""
        store = SQLiteStore(self.path, 1 << 30, reactor)
        self.addCleanup(store.close)
        await store.open()
        return store


class PostgresCountersTests(CountersContract, PostgresCase):
    async def make_store(self) -> QueueStore:
        """A new store (its own connection pool) on the test's database each time."""
        return await self.opened()
