"""The SQLite queue when another process holds its write lock, and when its storage refuses writes.

Another process (the operator's C{sqlite3} shell left in a transaction, a
backup tool, a second relay by mistake) can hold SQLite's write lock for as
long as it likes.  The relay's one database connection used to wait the
whole busy timeout (30 s) for it: each enqueue's client sat in DATA that
long and then heard a generic 451, and every other piece of work of the
store (the next batches, the worker's claims, the readiness check) queued
behind it.  The relay now waits L{WRITE_LOCK_WAIT} and says why.

Real files, a real second SQLite connection holding the lock (SQLite's
locks are per connection, so this is what another process does), the real
reactor; the same behaviour through the twistd process is in
C{test_busy_e2e.py}.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from smtpproxy.queue.model import (
    Outcome,
    QueueBusyError,
    QueueFullError,
    QueueReadOnlyError,
)
from smtpproxy.queue.sqlite import (
    CLAIM_LOCK_WAIT,
    INLINE_MAX,
    WRITE_LOCK_WAIT,
    SQLiteStore,
    body_directory,
)
from smtpproxy.queue.storage_errors import storage_error
from tests.queue.test_store_contract import T0, Body, attempt, deferLater, envelope

#: What the bound may exceed L{WRITE_LOCK_WAIT} by on a loaded machine (thread hops, fsync).
SLACK = 2.5


class LockHeldTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "queue.db")

    async def store(self) -> SQLiteStore:
        store = SQLiteStore(self.path, 1 << 30, reactor)
        self.addCleanup(store.close)
        await store.open()
        return store

    def hold(self) -> Callable[[], None]:
        """Take the write lock from a connection of our own; returns what gives it back."""
        holder = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        holder.execute("BEGIN EXCLUSIVE")
        released: list[bool] = []

        def release() -> None:
            if not released:
                released.append(True)
                holder.execute("ROLLBACK")
                holder.close()

        self.addCleanup(release)
        return release

    async def test_enqueue_refused_busy_within_the_bound_nothing_stored(self) -> None:
        """With the lock held elsewhere, a small and a large enqueue each fail with
        QueueBusyError within WRITE_LOCK_WAIT (plus slack), not the old 30 s; once the
        lock is free nothing of them is stored (no row, no body file, no bytes held) and
        their ids take a new enqueue."""
        store = await self.store()
        release = self.hold()
        started = time.monotonic()
        small = store.enqueue("small", envelope(), Body(b"s" * 300), T0)
        large = store.enqueue("large", envelope(), Body(b"L" * (INLINE_MAX + 1)), T0)
        errors: list[BaseException | None] = []

        def seen(failure: Failure) -> Failure:
            errors.append(failure.value)
            return failure

        small.addErrback(seen)
        await self.assertFailure(small, QueueBusyError)
        await self.assertFailure(large, QueueBusyError)
        took = time.monotonic() - started
        self.assertLess(took, WRITE_LOCK_WAIT * 2 + SLACK)
        self.assertIn("write lock", str(errors[0]))
        release()
        self.assertEqual(os.listdir(body_directory(self.path)), [])
        self.assertEqual(store.held, 0)
        stats = await store.stats(time.time())
        self.assertEqual((stats.queued, stats.bytes), (0, 0))
        await store.enqueue("small", envelope(), Body(b"s" * 300), T0 + 1)
        self.assertEqual((await store.stats(time.time())).queued, 1)

    async def test_delivery_in_a_busy_batch_is_kept_not_lost(self) -> None:
        """A delivery recorded while the lock is held shares its batch with a refused
        enqueue; it is not failed with it (which would leave the message to be sent
        again when its lease ran out) but committed once the lock is free."""
        store = await self.store()
        await store.enqueue("sent", envelope(), Body(b"x" * 100), T0)
        [entry] = await store.claim("w1", T0 + 1, 600.0, 10, 10)
        release = self.hold()
        refused = store.enqueue("new", envelope(), Body(b"n" * 100), T0 + 2)
        recorded = store.delivered(entry.id, "w1", attempt(T0 + 2, Outcome.DELIVERED))
        await self.assertFailure(refused, QueueBusyError)
        await deferLater(0.2)
        self.assertFalse(recorded.called)
        release()
        await recorded
        stats = await store.stats(time.time())
        self.assertEqual((stats.queued, stats.delivering, stats.bytes), (0, 0, 0))

    async def test_close_with_the_lock_held_is_bounded(self) -> None:
        """A delivery kept for the next batch does not hold the stop for ever: once the
        store is closing, a batch that finds the lock busy fails it (the worker logs it,
        and the message's lease runs out as after a crash), and close() returns within
        about two lock waits."""
        store = await self.store()
        await store.enqueue("sent", envelope(), Body(b"x" * 100), T0)
        [entry] = await store.claim("w1", T0 + 1, 600.0, 10, 10)
        self.hold()
        recorded = store.delivered(entry.id, "w1", attempt(T0 + 2, Outcome.DELIVERED))
        await deferLater(0.2)
        started = time.monotonic()
        await store.close()
        self.assertLess(time.monotonic() - started, WRITE_LOCK_WAIT * 2 + SLACK)
        await self.assertFailure(recorded, QueueBusyError)

    async def test_claim_gives_up_within_its_short_bound(self) -> None:
        """The worker's claim does not hold the store's one connection for 30 s, nor for
        a whole WRITE_LOCK_WAIT: it fails with QueueBusyError after CLAIM_LOCK_WAIT, so an
        enqueue issued behind it is answered within one WRITE_LOCK_WAIT and a little."""
        store = await self.store()
        release = self.hold()
        started = time.monotonic()
        claimed = store.claim("w1", T0, 600.0, 10, 10)
        claim_took: list[float] = []

        def timed(result: object) -> object:
            claim_took.append(time.monotonic() - started)
            return result

        claimed.addBoth(timed)
        behind = store.enqueue("behind", envelope(), Body(b"b" * 100), T0)
        await self.assertFailure(claimed, QueueBusyError)
        await self.assertFailure(behind, QueueBusyError)
        self.assertLess(claim_took[0], CLAIM_LOCK_WAIT + SLACK)
        self.assertLess(time.monotonic() - started, WRITE_LOCK_WAIT + CLAIM_LOCK_WAIT + SLACK)
        release()


class StorageErrorTests(TestCase):
    """The mapping from what the store's I/O raised to what the front door answers (pure)."""

    def test_full_read_only_and_busy(self) -> None:
        """ENOSPC, EDQUOT and EFBIG are a full queue (452); EROFS is read-only storage;
        SQLite's FULL, READONLY (any extended code) and BUSY map alike; anything else
        is passed on unchanged (a 451 and a logged failure)."""
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            self.assertIsInstance(storage_error(OSError(code, os.strerror(code))), QueueFullError)
        rofs = storage_error(OSError(errno.EROFS, os.strerror(errno.EROFS)))
        self.assertIsInstance(rofs, QueueReadOnlyError)
        self.assertIn("read-only", str(rofs))

        def sqlite_error(code: int) -> sqlite3.OperationalError:
            error = sqlite3.OperationalError("from sqlite")
            error.sqlite_errorcode = code  # as sqlite3 sets it
            return error

        self.assertIsInstance(storage_error(sqlite_error(sqlite3.SQLITE_FULL)), QueueFullError)
        for code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_READONLY_DBMOVED):
            self.assertIsInstance(storage_error(sqlite_error(code)), QueueReadOnlyError)
        busy = storage_error(sqlite_error(sqlite3.SQLITE_BUSY))
        self.assertIsInstance(busy, QueueBusyError)
        self.assertIn(f"{WRITE_LOCK_WAIT:g} s", str(busy))
        for other in (OSError(errno.EIO, "I/O error"), sqlite_error(sqlite3.SQLITE_IOERR)):
            self.assertIs(storage_error(other), other)
        plain = ValueError("the body source gave 3 bytes of 4")
        self.assertIs(storage_error(plain), plain)
