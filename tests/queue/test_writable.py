"""The SQLite store's write check (L{SQLiteStore.writable}), against real files and locks.

What the readiness probe is told must match what an enqueue would meet: each
test that finds the queue unwritable also shows an enqueue failing (or
waiting) there, and the check clearing once the cause is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import time

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.queue.model import QueueReadOnlyError
from smtpproxy.queue.sqlite import INLINE_MAX, LOCK_CHECK_WAIT, SQLiteStore
from tests.queue.readonly import make_unwritable
from tests.queue.test_store_contract import T0, Body, deferLater, envelope

MB = 1 << 20


class SQLiteWritableTests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "queue.db")

    async def opened(self) -> SQLiteStore:
        """A store on this test's file, open, with the usual 30 s wait for the write lock."""
        store = SQLiteStore(self.path, 1 << 30, reactor, timeout=30.0)
        self.addCleanup(store.close)
        await store.open()
        return store

    async def test_open_store_is_writable_with_its_free_space(self) -> None:
        """An open store on a writable disk: no problem, and the free space is the
        filesystem's as statvfs tells an unprivileged user (within what others write
        meanwhile)."""
        store = await self.opened()
        found = await store.writable()
        self.assertIsNone(found.problem)
        assert found.free_bytes is not None
        seen = os.statvfs(self.directory)
        self.assertLess(abs(found.free_bytes - seen.f_bavail * seen.f_frsize), 256 * MB)
        self.assertGreater(found.free_bytes, 0)

    async def test_closed_store_fails_the_check(self) -> None:
        """A store not open cannot be checked: the Deferred fails (the probe names why)."""
        store = SQLiteStore(self.path, 1 << 30, reactor)
        with self.assertRaises(RuntimeError):
            await store.writable()

    async def test_write_lock_held_elsewhere(self) -> None:
        """Another process's connection holds SQLite's write lock: the check says "write
        lock busy" after about LOCK_CHECK_WAIT, not the store's 30 s, so deliveries on the
        same thread are not held up; the store's own patience is back afterwards (an
        enqueue waits for the lock rather than failing) and the check clears on release."""
        store = await self.opened()
        holder = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        found = await store.writable()
        waited = time.monotonic() - started
        self.assertIsNotNone(found.problem)
        self.assertIn("write lock busy", found.problem or "")
        self.assertGreaterEqual(waited, LOCK_CHECK_WAIT * 0.8)
        self.assertLess(waited, 10)
        enqueued = store.enqueue("waits", envelope(), Body(b"x" * 100), T0)
        await deferLater(LOCK_CHECK_WAIT * 4)
        self.assertFalse(enqueued.called, "the enqueue gave up instead of waiting for the lock")
        holder.execute("ROLLBACK")
        await enqueued
        self.assertIsNone((await store.writable()).problem)

    async def test_unwritable_database_file(self) -> None:
        """The database and its WAL stop taking writes under the open store (chattr +i as
        root, where chmod would not stop it): SQLite still grants the write lock, but the
        check says "read-only database", and an enqueue there really fails; undone, the
        check clears and an enqueue commits."""
        store = await self.opened()
        await store.enqueue("before", envelope(), Body(b"x" * 100), T0)
        thaw = make_unwritable([self.path, self.path + "-wal"])
        try:
            found = await store.writable()
            self.assertEqual(found.problem, f"read-only database: cannot write {self.path}")
            with self.assertRaises(sqlite3.OperationalError):
                await store.enqueue("refused", envelope(), Body(b"y" * 100), T0 + 1)
        finally:
            thaw()
        self.assertIsNone((await store.writable()).problem)
        await store.enqueue("after", envelope(), Body(b"z" * 100), T0 + 2)
        self.assertEqual((await store.stats(T0 + 2)).queued, 2)

    async def test_read_only_filesystem_under_the_bodies(self) -> None:
        """The body directory's filesystem goes read-only (a read-only bind mount; root
        only): the check names it, and a message too large for the database's rows is
        refused there (EROFS), as the check foretold, as a QueueReadOnlyError (which the
        front doors answer 451 4.3.0 and log by its cause) rather than a bare OSError."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("a read-only bind mount needs root and mount(8)")
        store = await self.opened()
        bodies = store.bodies
        for args in (["--bind", bodies, bodies], ["-o", "remount,bind,ro", bodies]):
            done = subprocess.run(["mount", *args], capture_output=True, timeout=30, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", bodies], capture_output=True, timeout=30, check=False)
                raise SkipTest(f"cannot bind-mount here: {done.stderr.decode().strip()}")
        try:
            found = await store.writable()
            self.assertEqual(found.problem, f"read-only filesystem at {bodies}")
            with self.assertRaises(QueueReadOnlyError) as refused:
                await store.enqueue("large", envelope(), Body(b"L" * (INLINE_MAX + 1)), T0)
            cause = refused.exception.__cause__
            self.assertIsInstance(cause, OSError)
            self.assertEqual(getattr(cause, "errno", None), errno.EROFS)
            self.assertEqual(store.held, 0)
        finally:
            subprocess.run(["umount", bodies], capture_output=True, timeout=30, check=True)
        self.assertIsNone((await store.writable()).problem)
