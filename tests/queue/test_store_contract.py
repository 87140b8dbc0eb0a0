"""The rules of L{smtpproxy.queue.store}, held against every backend.

L{StoreContract} is backend-agnostic: it only calls the L{QueueStore}
methods (no SQL, no file names), so the PostgreSQL store runs the same tests
by subclassing it with its own L{StoreContract.make_store} and
L{StoreContract.reopen}.  Each backend also exposes C{commits}, the number
of enqueue transactions it committed, so group commit can be checked.

Time is always an explicit C{now}; Deferreds are real (trial waits on the
async tests), and the SQLite tests use real files in a temporary directory.
L{SQLiteStoreTests} adds what only the file layout can show: crash
leftovers tidied at open, a lost body made dead, a full disk.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, cast

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from smtpproxy.queue.model import (
    Attempt,
    BodyDamagedError,
    EnqueueWithdrawnError,
    Envelope,
    LeaseLostError,
    Outcome,
    QueueFullError,
    Recipients,
    Refused,
    State,
)
from smtpproxy.queue.sqlite import (
    INLINE_MAX,
    LOST_BODY_REPLY,
    SCHEMA_VERSION,
    SQLiteStore,
    body_directory,
)
from smtpproxy.queue.store import QueueStore


def deferLater(seconds: float) -> defer.Deferred[None]:
    """Fires after C{seconds} of the real reactor (threads get to run meanwhile)."""
    return task.deferLater(cast(IReactorTime, reactor), seconds, lambda: None)


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

T0 = 1_700_000_000.0
LEASE = 60.0
MB = 1 << 20


class Body:
    """A body source over bytes, handed out in pieces like L{smtpproxy.spool.MessageBody}."""

    def __init__(self, data: bytes, piece: int = 64 * 1024) -> None:
        self.data = data
        self.piece = piece

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[bytes]:
        for start in range(0, len(self.data), self.piece):
            yield self.data[start : start + self.piece]


class FullDiskBody(Body):
    """A body whose copy fails like a full disk after C{room} bytes."""

    def __init__(self, data: bytes, room: int, code: int = errno.ENOSPC) -> None:
        super().__init__(data, piece=4096)
        self.room = room
        self.code = code

    def chunks(self) -> Iterator[bytes]:
        given = 0
        for chunk in super().chunks():
            if given + len(chunk) > self.room:
                raise OSError(self.code, os.strerror(self.code))
            given += len(chunk)
            yield chunk


class GatedBody(Body):
    """A body whose copy waits at its first piece until the test opens C{gate}."""

    def __init__(self, data: bytes, gate: threading.Event) -> None:
        super().__init__(data)
        self.gate = gate

    def chunks(self) -> Iterator[bytes]:
        self.gate.wait(30)
        yield from super().chunks()


def envelope(route: str = "", sender: str = "app@example.com") -> Envelope:
    return Envelope(
        sender=sender,
        recipients=("a@example.org", "b@example.org"),
        client="192.0.2.7",
        user="scanner",
        route=route,
        meta='{"smtputf8": false}',
    )


def attempt(at: float, outcome: Outcome, reply: str = "", worker: str = "w1") -> Attempt:
    return Attempt(at=at, outcome=outcome, reply=reply, request_id="req-1", worker=worker)


class _Counting(Protocol):
    commits: int


class StoreContract(_Base):
    """Every rule of the QueueStore protocol; a backend's test case mixes this in."""

    max_bytes = 64 * MB

    async def make_store(self, max_bytes: int | None = None) -> QueueStore:
        """An opened, empty store (closed again at the end of the test)."""
        raise NotImplementedError

    async def reopen(self, store: QueueStore) -> QueueStore:
        """Close C{store} and open a new store object on the same storage."""
        raise NotImplementedError

    def hold_writes(self) -> Callable[[], None]:
        """Take the storage's write lock from outside the store (as another process,
        or the operator command, may); returns what gives it back."""
        raise NotImplementedError

    def commits(self, store: QueueStore) -> int:
        """Enqueue transactions C{store} has committed (every backend counts them in C{commits})."""
        return cast(_Counting, store).commits

    async def put(
        self,
        store: QueueStore,
        id: str,
        now: float = T0,
        data: bytes = b"Subject: hi\r\n\r\nbody\r\n",
        route: str = "",
    ) -> None:
        await store.enqueue(id, envelope(route), Body(data), now)

    # Enqueue, claim, deliver.

    async def test_writable_checks_without_storing(self) -> None:
        """An open, healthy store says it can take a write, and checking stores nothing and
        leaves no write pending (the next enqueue and the statistics are as before)."""
        store = await self.make_store()
        await self.put(store, "m1")
        before = await store.stats(T0 + 3)
        for _ in range(3):
            found = await store.writable()
            self.assertIsNone(found.problem)
        self.assertEqual(await store.stats(T0 + 3), before)
        await self.put(store, "m2", T0 + 1)
        self.assertEqual((await store.stats(T0 + 3)).queued, 2)

    async def test_enqueue_claim_delivered(self) -> None:
        """A stored message is claimed with its envelope and body; delivered removes both."""
        store = await self.make_store()
        data = b"Subject: one\r\n\r\nhello\r\n"
        await self.put(store, "m1", data=data)
        [entry] = await store.claim("w1", T0, LEASE, 10, 10)
        self.assertEqual(entry.id, "m1")
        self.assertEqual(entry.envelope, envelope())
        self.assertEqual(entry.size, len(data))
        self.assertEqual(entry.state, State.DELIVERING)
        self.assertEqual((entry.lease_owner, entry.lease_until), ("w1", T0 + LEASE))
        self.assertEqual(await store.read_body("m1"), data)
        await store.delivered("m1", "w1", attempt(T0 + 1, Outcome.DELIVERED))
        self.assertIsNone(await store.show("m1"))
        self.assertEqual(await store.claim("w2", T0 + 999, LEASE, 10, 10), [])
        stats = await store.stats(T0 + 3)
        self.assertEqual((stats.queued, stats.delivering, stats.dead, stats.bytes), (0, 0, 0, 0))
        await self.assertFailure(store.read_body("m1"), KeyError)

    async def test_durable_across_reopen(self) -> None:
        """Queued and dead messages, bodies and history survive close and open, and a new store."""
        store = await self.make_store()
        await self.put(store, "q1", T0, b"first\r\n")
        await self.put(store, "d1", T0 + 1, b"second\r\n")
        await store.claim("w1", T0 + 2, LEASE, 10, 10)
        await store.deferred("q1", "w1", attempt(T0 + 2, Outcome.DEFERRED, "451 4.4.1 x"), T0 + 9)
        await store.dead("d1", "w1", attempt(T0 + 2, Outcome.FAILED, "550 5.1.1 no"))
        await store.close()
        await store.open()
        self.assertEqual(await store.read_body("q1"), b"first\r\n")
        store = await self.reopen(store)
        queued = await store.show("q1")
        dead = await store.show("d1")
        assert queued is not None and dead is not None
        self.assertEqual(
            (queued.state, queued.attempts, queued.next_attempt), (State.QUEUED, 1, T0 + 9)
        )
        self.assertEqual(queued.envelope, envelope())
        self.assertEqual(dead.state, State.DEAD)
        self.assertEqual([a.reply for a in dead.history], ["550 5.1.1 no"])
        self.assertEqual(await store.read_body("d1"), b"second\r\n")
        self.assertEqual((await store.stats(T0 + 3)).bytes, len(b"first\r\n") + len(b"second\r\n"))

    async def test_group_commit(self) -> None:
        """Fifty enqueues at once all fire, all are stored, and share fewer commits than that."""
        store = await self.make_store()
        before = self.commits(store)
        bodies = {f"g{i:02}": os.urandom(10_000) for i in range(50)}
        await defer.gatherResults(
            [
                store.enqueue(id, envelope(), Body(data), T0 + i)
                for i, (id, data) in enumerate(bodies.items())
            ]
        )
        commits = self.commits(store) - before
        self.assertLess(commits, 50)
        self.assertGreater(commits, 0)
        self.assertEqual((await store.stats(T0 + 3)).queued, 50)
        store = await self.reopen(store)
        for id, data in bodies.items():
            self.assertEqual(await store.read_body(id), data)

    async def test_enqueue_fires_only_once_committed(self) -> None:
        """When an enqueue's Deferred fires the message is already visible to a claim."""
        store = await self.make_store()
        seen: list[int] = []

        async def enqueue_then_look(id: str) -> None:
            await self.put(store, id)
            seen.append(len(await store.list(None, 100)))

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(enqueue_then_look(f"c{i}")) for i in range(10)]
        )
        self.assertEqual(len(seen), 10)
        self.assertTrue(all(count >= 1 for count in seen))
        self.assertEqual(len(await store.list(None, 100)), 10)

    async def test_close_finishes_pending_enqueues(self) -> None:
        """close() while enqueues are under way lets each one commit and fire first."""
        store = await self.make_store()
        pending = [store.enqueue(f"p{i}", envelope(), Body(b"x" * 5000), T0) for i in range(20)]
        await store.close()
        results = await defer.DeferredList(pending, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * 20)
        store = await self.reopen(store)
        self.assertEqual((await store.stats(T0 + 3)).queued, 20)

    # Partial deliveries (an upstream that refused some recipients).

    async def test_partial_delivery_narrows_the_recipients(self) -> None:
        """deferred() with recipients: the message is owed only to those from now on,
        keeps the ones failed for good, and its attempt keeps each refused recipient
        with its reply; all of it survives a reopen and is what the next claim gets.
        dead() with recipients keeps only those."""
        store = await self.make_store()
        await self.put(store, "p1")
        await store.claim("w1", T0, LEASE, 10, 10)
        refused = (
            Refused("b@example.org", "450 4.2.1 Busy"),
            Refused('"odd user"@example.org', "550 5.1.1 No such user"),
        )
        first = Attempt(T0 + 1, Outcome.DEFERRED, "450 4.2.1 Busy", None, "w1", refused)
        owed = Recipients(("b@example.org",), ('"odd user"@example.org',))
        await store.deferred("p1", "w1", first, T0 + 60, owed)
        store = await self.reopen(store)
        entry = await store.show("p1")
        assert entry is not None
        self.assertEqual(entry.envelope.recipients, ("b@example.org",))
        self.assertEqual(entry.failed, ('"odd user"@example.org',))
        self.assertEqual(entry.history, (first,))
        [claimed] = await store.claim("w1", T0 + 60, LEASE, 10, 10)
        self.assertEqual((claimed.envelope.recipients, claimed.failed), (owed.owed, owed.failed))
        last = Attempt(T0 + 61, Outcome.FAILED, "550 5.1.1 No such user", None, "w1")
        await store.dead("p1", "w1", last, Recipients(('"odd user"@example.org',)))
        entry = await store.show("p1")
        assert entry is not None
        self.assertEqual(entry.state, State.DEAD)
        self.assertEqual(
            (entry.envelope.recipients, entry.failed), (('"odd user"@example.org',), ())
        )
        self.assertEqual([a.refused for a in entry.history], [refused, ()])

    # Withdrawal (a session forced closed at shutdown).

    async def test_withdraw_while_writes_are_held(self) -> None:
        """Enqueues waiting for a write lock held elsewhere, in the batch under way or the
        next one, are withdrawn for good: they fail with EnqueueWithdrawnError once the
        lock goes, leave no row, body or bytes, and their ids are free again; an enqueue
        beside them that was not withdrawn is stored."""
        store = await self.make_store()
        release = self.hold_writes()
        try:
            first = store.enqueue("w1", envelope(), Body(b"1" * 5000), T0)
            second = store.enqueue("w2", envelope(), Body(b"2" * 100_000), T0)
            kept = store.enqueue("k1", envelope(), Body(b"k" * 300), T0)
            await deferLater(0.3)  # let the batch under way reach the lock
            self.assertTrue(store.withdraw("w1"))
            self.assertTrue(store.withdraw("w2"))
            self.assertFalse(store.withdraw("unknown"))
        finally:
            release()
        await self.assertFailure(first, EnqueueWithdrawnError)
        await self.assertFailure(second, EnqueueWithdrawnError)
        await kept
        self.assertFalse(store.withdraw("k1"))
        store = await self.reopen(store)
        stats = await store.stats(T0 + 3)
        self.assertEqual((stats.queued, stats.bytes), (1, 300))
        self.assertEqual([e.id for e in await store.list(None, 10)], ["k1"])
        await self.put(store, "w1")
        self.assertEqual((await store.stats(T0 + 3)).queued, 2)

    async def test_withdraw_while_the_body_is_copied(self) -> None:
        """A large body still being copied in when withdrawn: the copy finishes, nothing
        is kept (no row, no body, no bytes)."""
        store = await self.make_store()
        gate = threading.Event()
        copying = store.enqueue("g1", envelope(), GatedBody(os.urandom(300_000), gate), T0)
        await deferLater(0.2)
        try:
            self.assertTrue(store.withdraw("g1"))
        finally:
            gate.set()
        await self.assertFailure(copying, EnqueueWithdrawnError)
        store = await self.reopen(store)
        stats = await store.stats(T0 + 3)
        self.assertEqual((stats.queued, stats.bytes), (0, 0))

    async def test_withdraw_refused_once_committed(self) -> None:
        """A committed enqueue cannot be withdrawn: withdraw says False and it stays."""
        store = await self.make_store()
        await self.put(store, "c1")
        self.assertFalse(store.withdraw("c1"))
        self.assertEqual((await store.stats(T0 + 3)).queued, 1)

    # Leases.

    async def test_lease_is_exclusive(self) -> None:
        """While one owner holds a message, another owner's claim does not get it."""
        store = await self.make_store()
        await self.put(store, "m1")
        first = await store.claim("w1", T0, LEASE, 10, 10)
        second = await store.claim("w2", T0 + 1, LEASE, 10, 10)
        self.assertEqual([e.id for e in first], ["m1"])
        self.assertEqual(second, [])
        await self.assertFailure(
            store.delivered("m1", "w2", attempt(T0 + 2, Outcome.DELIVERED)), LeaseLostError
        )
        self.assertIsNotNone(await store.show("m1"))

    async def test_expired_lease_is_claimed_again(self) -> None:
        """A lease that ran out lets another owner claim; the first owner's outcome is refused."""
        store = await self.make_store()
        await self.put(store, "m1")
        await store.claim("w1", T0, LEASE, 10, 10)
        self.assertEqual(await store.claim("w2", T0 + LEASE - 1, LEASE, 10, 10), [])
        [entry] = await store.claim("w2", T0 + LEASE, LEASE, 10, 10)
        self.assertEqual((entry.lease_owner, entry.lease_until), ("w2", T0 + 2 * LEASE))
        await self.assertFailure(
            store.delivered("m1", "w1", attempt(T0 + 61, Outcome.DELIVERED)), LeaseLostError
        )
        await self.assertFailure(
            store.deferred("m1", "w1", attempt(T0 + 61, Outcome.DEFERRED), T0 + 999),
            LeaseLostError,
        )
        await self.assertFailure(
            store.dead("m1", "w1", attempt(T0 + 61, Outcome.FAILED)), LeaseLostError
        )
        await self.assertFailure(store.renew("m1", "w1", T0 + 999), LeaseLostError)
        shown = await store.show("m1")
        assert shown is not None
        self.assertEqual((shown.lease_owner, shown.attempts, shown.history), ("w2", 0, ()))
        await store.delivered("m1", "w2", attempt(T0 + 62, Outcome.DELIVERED))
        self.assertIsNone(await store.show("m1"))

    async def test_renew_extends_the_lease(self) -> None:
        """A renewed lease keeps other owners out past the first expiry."""
        store = await self.make_store()
        await self.put(store, "m1")
        await store.claim("w1", T0, LEASE, 10, 10)
        await store.renew("m1", "w1", T0 + 3 * LEASE)
        self.assertEqual(await store.claim("w2", T0 + 2 * LEASE, LEASE, 10, 10), [])
        self.assertEqual(len(await store.claim("w2", T0 + 3 * LEASE, LEASE, 10, 10)), 1)

    async def test_release_keeps_the_leases_it_is_told_to(self) -> None:
        """release(owner, keep) gives back the owner's other leases and leaves those of
        C{keep} (attempts a stop cut off after hand-over) held until they run out."""
        store = await self.make_store()
        await self.put(store, "m1", T0)
        await self.put(store, "m2", T0 + 1)
        await store.claim("w1", T0 + 5, LEASE, 2, 10)
        self.assertEqual(await store.release("w1", ["m2"]), 1)
        [due] = await store.claim("w2", T0 + 6, LEASE, 10, 10)
        self.assertEqual(due.id, "m1")
        [expired] = await store.claim("w2", T0 + 5 + LEASE, LEASE, 10, 10)
        self.assertEqual(expired.id, "m2")

    async def test_release_gives_leases_back(self) -> None:
        """release() returns an owner's messages at once; its later outcomes change nothing."""
        store = await self.make_store()
        await self.put(store, "m1", T0)
        await self.put(store, "m2", T0 + 1)
        await self.put(store, "m3", T0 + 2)
        await store.claim("w1", T0 + 5, LEASE, 2, 10)
        await store.claim("w2", T0 + 5, LEASE, 1, 10)
        self.assertEqual(await store.release("w1"), 2)
        self.assertEqual(await store.release("w1"), 0)
        await self.assertFailure(
            store.deferred("m1", "w1", attempt(T0 + 6, Outcome.DEFERRED, "451"), T0 + 999),
            LeaseLostError,
        )
        shown = await store.show("m1")
        assert shown is not None
        self.assertEqual((shown.state, shown.attempts, shown.next_attempt), (State.QUEUED, 0, T0))
        self.assertEqual(
            [e.id for e in await store.claim("w3", T0 + 6, LEASE, 10, 10)], ["m1", "m2"]
        )

    # Order and concurrency.

    async def test_oldest_first(self) -> None:
        """Due messages come in order of queued_at, whatever order they were stored in."""
        store = await self.make_store()
        for id, at in (("c", T0 + 3), ("a", T0 + 1), ("d", T0 + 4), ("b", T0 + 2)):
            await self.put(store, id, at)
        [oldest] = await store.claim("w1", T0 + 10, LEASE, 1, 10)
        self.assertEqual(oldest.id, "a")
        rest = await store.claim("w1", T0 + 10, LEASE, 10, 10)
        self.assertEqual([e.id for e in rest], ["b", "c", "d"])
        self.assertEqual([e.id for e in await store.list(None, 10)], ["a", "b", "c", "d"])

    async def test_per_route_cap(self) -> None:
        """No more than per_route live leases per route, counted across owners."""
        store = await self.make_store()
        for i in range(5):
            await self.put(store, f"a{i}", T0 + i, route="alice@x")
        await self.put(store, "b0", T0 + 10, route="bob@x")
        await self.put(store, "b1", T0 + 11, route="bob@x")
        first = await store.claim("w1", T0 + 20, LEASE, 10, 2)
        self.assertEqual([e.id for e in first], ["a0", "a1", "b0", "b1"])
        self.assertEqual(await store.claim("w2", T0 + 20, LEASE, 10, 2), [])
        await store.delivered("a0", "w1", attempt(T0 + 21, Outcome.DELIVERED))
        self.assertEqual([e.id for e in await store.claim("w2", T0 + 21, LEASE, 10, 2)], ["a2"])
        # Expired leases no longer count against the route; a2's (taken
        # a second later) still does, so alice gets one more, the oldest.
        later = await store.claim("w3", T0 + 20 + LEASE, LEASE, 10, 2)
        self.assertEqual([e.id for e in later], ["a1", "b0", "b1"])

    async def test_deferred_waits_for_next_attempt(self) -> None:
        """A deferred message is not due before its next attempt; the attempt is recorded."""
        store = await self.make_store()
        await self.put(store, "m1")
        await store.claim("w1", T0, LEASE, 10, 10)
        await store.deferred(
            "m1", "w1", attempt(T0 + 1, Outcome.DEFERRED, "451 4.4.1 busy"), T0 + 300
        )
        self.assertEqual(await store.claim("w1", T0 + 299, LEASE, 10, 10), [])
        [entry] = await store.claim("w1", T0 + 300, LEASE, 10, 10)
        self.assertEqual((entry.attempts, entry.last_reply), (1, "451 4.4.1 busy"))
        shown = await store.show("m1")
        assert shown is not None
        self.assertEqual(shown.history, (attempt(T0 + 1, Outcome.DEFERRED, "451 4.4.1 busy"),))

    async def test_dead_keeps_history(self) -> None:
        """A dead message stays with every attempt, in order, and is never claimed."""
        store = await self.make_store()
        await self.put(store, "m1")
        await store.claim("w1", T0, LEASE, 10, 10)
        first = attempt(T0 + 1, Outcome.DEFERRED, "451 4.4.1 later")
        await store.deferred("m1", "w1", first, T0 + 60)
        await store.claim("w2", T0 + 60, LEASE, 10, 10)
        last = Attempt(T0 + 61, Outcome.FAILED, "550 5.1.1 unknown", None, "w2")
        await store.dead("m1", "w2", last)
        shown = await store.show("m1")
        assert shown is not None
        self.assertEqual(shown.state, State.DEAD)
        self.assertEqual(shown.history, (first, last))
        self.assertEqual((shown.attempts, shown.last_reply), (2, "550 5.1.1 unknown"))
        self.assertIsNone(shown.lease_owner)
        self.assertEqual(await store.claim("w1", T0 + 10_000, LEASE, 10, 10), [])
        self.assertEqual((await store.stats(T0 + 3)).dead, 1)
        self.assertEqual(await store.read_body("m1"), b"Subject: hi\r\n\r\nbody\r\n")

    # The operator.

    async def make_dead(self, store: QueueStore, id: str, at: float) -> None:
        await self.put(store, id, at)
        claimed = await store.claim("op", at, LEASE, 100, 100)
        self.assertIn(id, [e.id for e in claimed])
        await store.dead(id, "op", attempt(at, Outcome.FAILED, "550 no"))
        await store.release("op")

    async def test_retry(self) -> None:
        """retry() makes a dead or waiting message due now; unknown or leased ids are refused;
        the dead one starts its age again (so it goes behind older mail), the waiting one
        keeps its age."""
        store = await self.make_store()
        await self.make_dead(store, "dead", T0)
        await self.put(store, "later", T0 + 1)
        await store.claim("w1", T0 + 1, LEASE, 10, 10)
        await store.deferred("later", "w1", attempt(T0 + 2, Outcome.DEFERRED), T0 + 5000)
        self.assertTrue(await store.retry("dead", T0 + 100))
        self.assertTrue(await store.retry("later", T0 + 100))
        self.assertFalse(await store.retry("absent", T0 + 100))
        claimed = await store.claim("w1", T0 + 100, LEASE, 10, 10)
        self.assertEqual(
            [(e.id, e.queued_at) for e in claimed], [("later", T0 + 1), ("dead", T0 + 100)]
        )
        self.assertFalse(await store.retry("dead", T0 + 101))
        self.assertEqual(len((await store.show("dead") or self.fail()).history), 1)

    async def test_retry_dead(self) -> None:
        """retry_dead() requeues every dead message and leaves the others alone."""
        store = await self.make_store()
        await self.make_dead(store, "d1", T0)
        await self.make_dead(store, "d2", T0 + 1)
        await self.put(store, "q1", T0 + 2)
        self.assertEqual(await store.retry_dead(T0 + 50), 2)
        self.assertEqual(await store.retry_dead(T0 + 50), 0)
        stats = await store.stats(T0 + 3)
        self.assertEqual((stats.queued, stats.dead, stats.oldest_queued_at), (3, 0, T0 + 2))
        self.assertEqual(len(await store.claim("w1", T0 + 50, LEASE, 10, 10)), 3)

    async def test_delete(self) -> None:
        """delete() removes a message and its body, but not one a worker holds."""
        store = await self.make_store()
        await self.put(store, "m1", T0, b"x" * 100)
        await self.put(store, "m2", T0 + 1, b"y" * 50)
        await store.claim("w1", reactor.seconds(), 3600, 1, 10)  # m1, leased now
        self.assertFalse(await store.delete("m1"))
        self.assertTrue(await store.delete("m2"))
        self.assertFalse(await store.delete("m2"))
        self.assertFalse(await store.delete("absent"))
        await self.assertFailure(store.read_body("m2"), KeyError)
        self.assertEqual((await store.stats(T0 + 3)).bytes, 100)
        self.assertEqual([e.id for e in await store.list(None, 10)], ["m1"])

    async def test_list(self) -> None:
        """list() gives messages oldest first, all or one state, at most limit."""
        store = await self.make_store()
        await self.make_dead(store, "d1", T0 + 5)
        for i in range(4):
            await self.put(store, f"q{i}", T0 + i)
        self.assertEqual([e.id for e in await store.list(None, 10)], ["q0", "q1", "q2", "q3", "d1"])
        self.assertEqual([e.id for e in await store.list(State.QUEUED, 2)], ["q0", "q1"])
        self.assertEqual([e.id for e in await store.list(State.DEAD, 10)], ["d1"])
        await store.claim("w1", T0 + 10, LEASE, 1, 10)
        [held] = await store.list(State.DELIVERING, 10)
        self.assertEqual((held.id, held.lease_owner), ("q0", "w1"))
        self.assertEqual(held.history, ())

    async def test_stats(self) -> None:
        """stats() counts each state, the bytes held and the oldest live message's time."""
        store = await self.make_store()
        self.assertEqual(await store.stats(T0 + 3), type(await store.stats(T0))(0, 0, 0, 0, None))
        await self.make_dead(store, "d1", T0)
        await self.put(store, "q1", T0 + 1, b"a" * 10)
        await self.put(store, "q2", T0 + 2, b"b" * 20)
        await store.claim("w1", T0 + 3, LEASE, 1, 10)
        stats = await store.stats(T0 + 3)
        dead_size = len(b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(
            (stats.queued, stats.delivering, stats.dead, stats.bytes, stats.oldest_queued_at),
            (1, 1, 1, 30 + dead_size, T0 + 1),
        )

    async def test_stats_count_an_expired_lease_as_queued(self) -> None:
        """stats(now) counts a message whose lease ran out before C{now} as queued, not
        delivering (nobody delivers it; the next claim takes it), and a live lease as
        delivering."""
        store = await self.make_store()
        await self.put(store, "q1", T0)
        await self.put(store, "q2", T0 + 1)
        await store.claim("dead-worker", T0 + 2, LEASE, 1, 10)
        await store.claim("live-worker", T0 + 10, LEASE, 1, 10)
        stats = await store.stats(T0 + 2 + LEASE)
        self.assertEqual((stats.queued, stats.delivering), (1, 1))
        stats = await store.stats(T0 + 2 + LEASE - 1)
        self.assertEqual((stats.queued, stats.delivering), (0, 2))

    async def test_purge_dead(self) -> None:
        """purge_dead() removes only messages that died before the cut-off, with their bodies."""
        store = await self.make_store()
        await self.make_dead(store, "old", T0)
        await self.make_dead(store, "new", T0 + 100)
        await self.put(store, "live", T0 - 50)
        self.assertEqual(await store.purge_dead(T0 + 50), 1)
        self.assertIsNone(await store.show("old"))
        await self.assertFailure(store.read_body("old"), KeyError)
        self.assertEqual({e.id for e in await store.list(None, 10)}, {"new", "live"})
        self.assertEqual(await store.purge_dead(T0 + 50), 0)

    # Refusals.

    async def test_duplicate_id(self) -> None:
        """An id already stored, or being stored, fails with KeyError and changes nothing."""
        store = await self.make_store()
        await self.put(store, "m1", data=b"original")
        await self.assertFailure(
            store.enqueue("m1", envelope(sender="x@y"), Body(b"imposter!"), T0 + 1), KeyError
        )
        racing = [
            store.enqueue("m2", envelope(), Body(b"one"), T0),
            store.enqueue("m2", envelope(), Body(b"two"), T0),
        ]
        results = await defer.DeferredList(racing, consumeErrors=True)
        self.assertEqual(sorted(ok for ok, _ in results), [False, True])
        [failure] = [value for ok, value in results if not ok]
        assert isinstance(failure, Failure)
        failure.trap(KeyError)
        self.assertEqual(await store.read_body("m1"), b"original")
        self.assertEqual((await store.show("m1") or self.fail()).envelope.sender, "app@example.com")
        stats = await store.stats(T0 + 3)
        self.assertEqual((stats.queued, stats.bytes), (2, len(b"original") + 3))
        store = await self.reopen(store)
        self.assertEqual((await store.stats(T0 + 3)).bytes, len(b"original") + 3)

    async def test_queue_full(self) -> None:
        """Past max_bytes an enqueue fails with QueueFullError, stores nothing, and room returns."""
        store = await self.make_store(max_bytes=1000)
        await self.put(store, "m1", data=b"a" * 600)
        await self.assertFailure(
            store.enqueue("m2", envelope(), Body(b"b" * 401), T0), QueueFullError
        )
        await self.put(store, "m3", data=b"c" * 400)
        self.assertIsNone(await store.show("m2"))
        self.assertEqual((await store.stats(T0 + 3)).bytes, 1000)
        await store.claim("w1", T0, LEASE, 1, 10)
        await store.delivered("m1", "w1", attempt(T0, Outcome.DELIVERED))
        await self.put(store, "m4", data=b"d" * 600)
        self.assertEqual((await store.stats(T0 + 3)).bytes, 1000)

    async def test_body_bytes_exact(self) -> None:
        """Bodies come back byte for byte: every octet, bare CR and LF, NUL, empty, 3 MB."""
        store = await self.make_store()
        rng = random.Random(12)
        bodies = {
            "octets": bytes(range(256)) * 4,
            "line-ends": b"a\rb\nc\r\n\r\n.\r\n..\n\r",
            "nul": b"\x00" * 100 + b"after",
            "empty": b"",
            "big": rng.randbytes(3 * MB + 7),
        }
        for id, data in bodies.items():
            await store.enqueue(id, envelope(), Body(data, piece=100_000), T0)
        store = await self.reopen(store)
        for id, data in bodies.items():
            self.assertEqual(await store.read_body(id), data, id)
        self.assertEqual((await store.stats(T0 + 3)).bytes, sum(map(len, bodies.values())))


class _SQLiteFiles(StoreContract):
    """A fresh SQLite file per test; C{inline_max} chooses where small bodies go."""

    inline_max = INLINE_MAX

    def setUp(self) -> None:
        self.directory = cast(TestCase, self).mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "queue.db")

    def new_store(self, max_bytes: int | None = None) -> SQLiteStore:
        store = SQLiteStore(
            self.path, max_bytes or self.max_bytes, reactor, inline_max=self.inline_max
        )
        cast(TestCase, self).addCleanup(store.close)
        return store

    async def make_store(self, max_bytes: int | None = None) -> QueueStore:
        store = self.new_store(max_bytes)
        await store.open()
        return store

    async def reopen(self, store: QueueStore) -> QueueStore:
        await store.close()
        return await self.make_store()

    def hold_writes(self) -> Callable[[], None]:
        holder = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        holder.execute("BEGIN IMMEDIATE")

        def release() -> None:
            holder.execute("ROLLBACK")
            holder.close()

        return release

    def body_files(self) -> list[str]:
        return sorted(os.listdir(body_directory(self.path)))


class SQLiteInlineStoreTests(_SQLiteFiles, TestCase):
    """The contract against SQLite with small bodies kept in their rows (the default)."""

    async def test_small_bodies_inline_large_in_files(self) -> None:
        """A body up to inline_max lives in its row (no file); one byte more gets a file;
        both read back byte for byte after a reopen, and delivering removes both."""
        store = await self.make_store()
        small, large = os.urandom(INLINE_MAX), os.urandom(INLINE_MAX + 1)
        await self.put(store, "small", data=small)
        self.assertEqual(self.body_files(), [])
        await self.put(store, "large", T0 + 1, data=large)
        self.assertEqual(len(self.body_files()), 1)
        store = await self.reopen(store)
        self.assertEqual(len(self.body_files()), 1)
        self.assertEqual((await store.stats(T0 + 3)).bytes, len(small) + len(large))
        claimed = await store.claim("w1", T0 + 5, LEASE, 10, 10)
        self.assertEqual([e.id for e in claimed], ["small", "large"])
        self.assertEqual(await store.read_body("small"), small)
        self.assertEqual(await store.read_body("large"), large)
        for id in ("small", "large"):
            await store.delivered(id, "w1", attempt(T0 + 6, Outcome.DELIVERED))
        self.assertEqual(self.body_files(), [])
        self.assertEqual((await store.stats(T0 + 3)).bytes, 0)

    async def test_damaged_inline_body_is_refused(self) -> None:
        """A small body whose stored bytes are shorter than the size acknowledged (changed
        behind the store's back) is never handed out: read_body and a claim's own read both
        end in BodyDamagedError naming the lengths, while an intact neighbour reads back."""
        store = await self.make_store()
        await self.put(store, "cut", data=b"x" * 1000)
        await self.put(store, "fine", T0 + 1, data=b"y" * 20)
        with sqlite3.connect(self.path) as outside:
            outside.execute(
                "UPDATE inline_bodies SET data = substr(data, 1, 10)"
                " WHERE message = (SELECT seq FROM messages WHERE id = 'cut')"
            )
        with self.assertRaises(BodyDamagedError) as caught:
            await store.read_body("cut")
        error = caught.exception
        self.assertEqual((error.found, error.expected), (10, 1000))
        self.assertEqual(len(await store.claim("w1", T0 + 5, LEASE, 10, 10)), 2)
        await self.assertFailure(store.read_body("cut"), BodyDamagedError)
        self.assertEqual(await store.read_body("fine"), b"y" * 20)

    async def test_deliveries_share_commits(self) -> None:
        """Fifty deliveries recorded at once are committed together (far fewer commits than
        messages) and each is answered: the delivered ones gone, a lost lease refused."""
        store = cast(SQLiteStore, await self.make_store())
        for i in range(50):
            await self.put(store, f"d{i:02}", T0 + i)
        claimed = await store.claim("w1", T0 + 99, LEASE, 50, 50)
        self.assertEqual(len(claimed), 50)
        before = store.group_commits
        done = [store.delivered(e.id, "w1", attempt(T0 + 100, Outcome.DELIVERED)) for e in claimed]
        wrong = store.delivered("d00", "someone-else", attempt(T0 + 100, Outcome.DELIVERED))
        await defer.gatherResults(done)
        await self.assertFailure(wrong, LeaseLostError)
        self.assertLessEqual(store.group_commits - before, 2)
        self.assertEqual((await store.stats(T0 + 3)).queued + (await store.stats(T0)).delivering, 0)

    async def test_claims_unsynced_enqueues_synced(self) -> None:
        """A claim commits without the WAL fsync (synchronous NORMAL: its loss in a power cut
        only queues the message again), and the next enqueue's commit is synced (FULL)."""
        store = cast(SQLiteStore, await self.make_store())
        pool = store._pool
        assert pool is not None

        def level() -> defer.Deferred[int]:
            return cast(
                defer.Deferred[int],
                pool.runInteraction(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]),
            )

        await self.put(store, "m1")
        self.assertEqual(await level(), 2)  # FULL
        await store.claim("w1", T0, LEASE, 10, 10)
        self.assertEqual(await level(), 1)  # NORMAL
        await self.put(store, "m2", T0 + 1)
        self.assertEqual(await level(), 2)
        await store.delivered("m1", "w1", attempt(T0 + 2, Outcome.DELIVERED))
        self.assertEqual(await level(), 2)

    async def test_small_body_disk_full(self) -> None:
        """A small body whose read fails with ENOSPC is QueueFullError; nothing is stored
        and its bytes are free again."""
        store = await self.make_store(max_bytes=100_000)
        body = FullDiskBody(b"z" * 50_000, room=20_000)
        await self.assertFailure(store.enqueue("m", envelope(), body, T0), QueueFullError)
        self.assertIsNone(await store.show("m"))
        await self.put(store, "after", data=b"a" * 100_000)

    async def test_version_1_file_upgraded(self) -> None:
        """A queue written by schema 1 (every body in a file) is upgraded at open: its
        messages and bodies stay, and new small messages go inline."""
        store = await self.make_store()
        await store.close()
        with sqlite3.connect(self.path) as db:
            # What version 1 looked like: no table of small bodies.
            db.execute("DROP TABLE inline_bodies")
            db.execute("PRAGMA user_version = 1")
        db.close()
        old = SQLiteStore(self.path, self.max_bytes, reactor, inline_max=0)
        await old.open()
        await old.enqueue("old", envelope(), Body(b"old body"), T0)
        await old.close()
        store = await self.make_store()
        await self.put(store, "new", T0 + 1, data=b"new body")
        self.assertEqual(await store.read_body("old"), b"old body")
        self.assertEqual(await store.read_body("new"), b"new body")
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        db.close()

    async def test_version_3_file_gets_the_route_index(self) -> None:
        """A queue written by schema 3 (no per-route index) is upgraded at open: the
        claims' index on (state, route, queued_at, seq) is created, its messages stay
        claimable."""
        store = await self.make_store()
        await self.put(store, "old", T0)
        await store.close()
        with sqlite3.connect(self.path) as db:
            db.execute("DROP INDEX messages_route")
            db.execute("PRAGMA user_version = 3")
        db.close()
        store = await self.make_store()
        [claimed] = await store.claim("w1", T0 + 1, LEASE, 5, 5)
        self.assertEqual(claimed.id, "old")
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            indexes = {row[1] for row in db.execute("PRAGMA index_list(messages)")}
        db.close()
        self.assertIn("messages_route", indexes)


class SQLiteStoreTests(_SQLiteFiles, TestCase):
    """The contract against SQLite with every body in a file, and what only files show."""

    inline_max = 0

    async def test_crash_leftovers_tidied_at_open(self) -> None:
        """A partial body and a body without a row (a crash before commit) are deleted at open."""
        store = await self.make_store()
        await self.put(store, "kept", data=b"kept body")
        await store.close()
        [kept] = self.body_files()
        bodies = body_directory(self.path)
        partial = os.path.join(bodies, "0" * 32 + ".tmp")
        orphan = os.path.join(bodies, "f" * 32)
        stranger = os.path.join(bodies, "README")
        for name in (partial, orphan, stranger):
            with open(name, "wb") as f:
                f.write(b"half a mess")
        store = await self.make_store()
        self.assertEqual(self.body_files(), sorted([kept, "README"]))
        self.assertEqual(await store.read_body("kept"), b"kept body")
        self.assertEqual((await store.stats(T0 + 3)).bytes, len(b"kept body"))

    async def test_missing_body_made_dead(self) -> None:
        """A row whose body file is gone becomes dead with a reply that says so, never vanishes."""
        store = await self.make_store()
        await self.put(store, "lost", data=b"x" * 10)
        [lost_file] = self.body_files()
        await self.put(store, "fine", T0 + 1, data=b"y" * 20)
        await store.close()
        os.unlink(os.path.join(body_directory(self.path), lost_file))
        store = await self.make_store()
        shown = await store.show("lost")
        assert shown is not None
        self.assertEqual((shown.state, shown.last_reply), (State.DEAD, LOST_BODY_REPLY))
        await self.assertFailure(store.read_body("lost"), FileNotFoundError)
        self.assertFalse(await store.retry("lost", T0 + 5))
        self.assertEqual(await store.retry_dead(T0 + 5), 0)
        self.assertEqual((await store.stats(T0 + 3)).bytes, 20)
        self.assertEqual([e.id for e in await store.claim("w1", T0 + 9, LEASE, 10, 10)], ["fine"])

    async def test_body_file_of_the_wrong_length_is_refused(self) -> None:
        """A body file cut short, or grown, after the 250 fails read_body with
        BodyDamagedError (the lengths, never the bytes) instead of reading as the message."""
        store = await self.make_store()
        await self.put(store, "m1", data=b"x" * 5000)
        [name] = self.body_files()
        path = os.path.join(body_directory(self.path), name)
        os.truncate(path, 1200)
        with self.assertRaises(BodyDamagedError) as caught:
            await store.read_body("m1")
        error = caught.exception
        self.assertEqual((error.found, error.expected), (1200, 5000))
        os.truncate(path, 9000)
        with self.assertRaises(BodyDamagedError) as caught:
            await store.read_body("m1")
        error = caught.exception
        self.assertEqual((error.found, error.expected), (5001, 5000))

    async def test_disk_full_leaves_nothing(self) -> None:
        """A body copy failing with ENOSPC or EDQUOT is QueueFullError, with no file or row left."""
        store = await self.make_store(max_bytes=100_000)
        for code in (errno.ENOSPC, errno.EDQUOT):
            body = FullDiskBody(b"z" * 50_000, room=20_000, code=code)
            await self.assertFailure(
                store.enqueue(f"m{code}", envelope(), body, T0), QueueFullError
            )
            self.assertIsNone(await store.show(f"m{code}"))
        self.assertEqual(self.body_files(), [])
        self.assertEqual(await store.stats(T0 + 3), type(await store.stats(T0))(0, 0, 0, 0, None))
        # The bytes it had reserved are free again: a message of the whole size fits.
        await self.put(store, "after", data=b"a" * 100_000)

    async def test_wal_and_schema_version(self) -> None:
        """The file is in WAL mode, and a file from a newer schema is refused, not misread."""
        store = await self.make_store()
        await store.close()
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            db.execute("PRAGMA user_version = 99")
        db.close()
        newer = self.new_store()
        with self.assertRaises(RuntimeError) as caught:
            await newer.open()
        self.assertIn("schema 99", str(caught.exception))
