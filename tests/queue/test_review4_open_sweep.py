"""Review 4: a second process opening the SQLite queue deletes the relay's bodies in flight.

C{smtpproxy doctor}'s new queue check (L{smtpproxy.tools.queuecheck.check})
opens the relay's own store "as the relay opens it at start", and is meant
to run beside a running relay (its probe is queued a century ahead "so no
running worker can claim it").  L{SQLiteStore.open} tidies crash leftovers:
inside its transaction it deletes every body file without a row.  But a
running relay writes and renames a body file before its group commit inserts
the row; while that commit waits for SQLite's write lock, the body is
exactly such a file.  The opener deletes it, the relay's commit then inserts
the row and the client hears 250 for a message whose body is gone: the
worker finds it unreadable and the message is lost.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.trial.unittest import TestCase

from smtpproxy.queue.model import Envelope
from smtpproxy.queue.sqlite import SQLiteStore, body_directory
from tests.queue.test_store_contract import Body

reactor: Any = _reactor


class OpenBesideRelayTests(TestCase):
    timeout = 120

    async def _renamed_body(self, bodies: str, known: set[str]) -> str:
        """Wait until the relay's body file is written and renamed to its final name."""
        for _ in range(500):
            names = {n for n in os.listdir(bodies) if not n.endswith(".tmp")} - known
            if names:
                [name] = names
                return name
            await task.deferLater(reactor, 0.01)
        self.fail("the relay never wrote the body file")

    async def test_doctor_open_keeps_the_relays_uncommitted_bodies(self) -> None:
        """A message whose enqueue fired (the client's 250) keeps a readable body when another
        process (the doctor's queue check) opened the store while the relay's commit waited
        for the write lock (held for a moment by, say, the operator's queue command).
        Tried three times: each time the second opener takes the lock first (it polls for it
        more often), deletes the relay's renamed body as an orphan, and the relay then
        commits a row without a body."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "queue.db")
        relay = SQLiteStore(path, 1 << 30, reactor, inline_max=0)
        await relay.open()
        self.addCleanup(relay.close)
        bodies = body_directory(path)
        envelope = Envelope("app@example.com", ("ops@example.org",))
        known: set[str] = set()
        for attempt in range(3):
            data = b"Subject: %d\r\n\r\n" % attempt + b"x" * 10_000 + b"\r\n"
            holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN IMMEDIATE")
            try:
                stored = relay.enqueue(f"m{attempt}", envelope, Body(data), reactor.seconds())
                known.add(await self._renamed_body(bodies, known))
                # The relay's commit now waits for the lock, polling every 100 ms.
                await task.deferLater(reactor, 0.5)
                doctor = SQLiteStore(path, 1 << 30, reactor)
                opening = doctor.open()
                await task.deferLater(reactor, 0.05)
            finally:
                holder.rollback()
                holder.close()
            await opening
            await doctor.close()
            await stored  # the client hears 250 now
            body = await relay.read_body(f"m{attempt}")
            self.assertEqual(body, data)


def _leftovers(bodies: str) -> list[str]:
    """Write a partial body and a body without a row, as a crash before commit leaves them."""
    names = ["0" * 32 + ".tmp", "f" * 32]
    for name in names:
        with open(os.path.join(bodies, name), "wb") as f:
            f.write(b"half a mess")
    return names


class WriterLockTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "queue.db")
        self.bodies = body_directory(self.path)

    async def _open(self, writer: bool = True) -> SQLiteStore:
        store = SQLiteStore(self.path, 1 << 30, reactor, writer=writer)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def test_relay_open_after_a_crash_tidies(self) -> None:
        """A relay killed with SIGKILL while holding the writer lock leaves leftovers and the
        lock file; the kernel released its lock, so the next relay's open takes it and
        deletes the leftovers.  A reader's open before it (the operator command) leaves them."""
        first = await self._open()
        await first.close()
        names = _leftovers(self.bodies)
        crashed = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n",
                self.path + ".lock",
            ],
            stdout=subprocess.PIPE,
        )
        assert crashed.stdout is not None
        self.assertEqual(crashed.stdout.readline(), b"locked\n")
        reader = await self._open(writer=False)
        await reader.close()
        self.assertEqual(sorted(os.listdir(self.bodies)), sorted(names))
        crashed.kill()
        crashed.wait()
        crashed.stdout.close()
        self.assertTrue(os.path.exists(self.path + ".lock"))
        await self._open()
        self.assertEqual(os.listdir(self.bodies), [])

    async def test_second_writer_does_not_tidy(self) -> None:
        """A second relay on the same file (a mistake) cannot take the writer lock and leaves
        files it cannot know to be leftovers; once the first closes, a new open tidies."""
        first = await self._open()
        names = _leftovers(self.bodies)
        second = await self._open()
        self.assertEqual(sorted(os.listdir(self.bodies)), sorted(names))
        await second.close()
        await first.close()
        await self._open()
        self.assertEqual(os.listdir(self.bodies), [])
