"""The SQLite queue's database file: who may read it, and who may create it.

Real files in a temporary directory, real SQLite, the store opened as the
relay (the writer) and as the operator command and the doctor open it.
"""

from __future__ import annotations

import os
import stat
import time
from typing import cast

from twisted.internet import reactor
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from smtpproxy.queue.sqlite import SQLiteStore

WARNING = "queue file readable by other users"


class DatabaseFileTests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "queue.db")
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    async def opened(self, writer: bool = True) -> SQLiteStore:
        store = SQLiteStore(self.path, 1 << 30, reactor, writer=writer)
        await store.open()
        self.addCleanup(store.close)
        return store

    def warned(self) -> list[tuple[str, str]]:
        return [(e["path"], e["mode"]) for e in self.events if e.get("log_format") == WARNING]

    def mode(self) -> int:
        return stat.S_IMODE(os.stat(self.path).st_mode)

    async def test_existing_file_keeps_its_mode_and_world_readable_is_warned(self) -> None:
        """An existing queue.db keeps the mode its operator gave it (0640 for a backup group:
        no warning); one that any user can read (0644, as earlier versions created it) is
        left as it is too, but each start logs a warning naming the file and its mode."""
        store = await self.opened()
        await store.close()
        self.assertEqual(self.mode(), 0o600)
        self.assertEqual(self.warned(), [])
        os.chmod(self.path, 0o640)
        await (await self.opened()).close()
        self.assertEqual((self.mode(), self.warned()), (0o640, []))
        os.chmod(self.path, 0o644)
        await self.opened()
        self.assertEqual(self.mode(), 0o644)
        self.assertEqual(self.warned(), [(self.path, "0644")])

    async def test_reader_never_creates_a_queue(self) -> None:
        """Opened as not the writer (the operator command, the doctor), the store fails on a
        missing file with an error naming it, and creates nothing: no database, no body
        directory.  An empty file (not a queue) is refused too and left empty."""
        with self.assertRaises(FileNotFoundError) as caught:
            await self.opened(writer=False)
        self.assertEqual(caught.exception.filename, self.path)
        self.assertEqual(os.listdir(self.directory), [])
        open(self.path, "wb").close()
        with self.assertRaises(RuntimeError) as refused:
            await self.opened(writer=False)
        self.assertIn("holds no queue", str(refused.exception))
        self.assertEqual(os.path.getsize(self.path), 0)
        self.assertEqual(sorted(os.listdir(self.directory)), ["queue.db"])

    async def test_reader_opens_the_writers_queue(self) -> None:
        """A queue the relay created opens for the operator (the rw-only open still finds it),
        and sees what the relay stored."""
        await (await self.opened()).close()
        reader = await self.opened(writer=False)
        self.assertEqual((await reader.stats(time.time())).queued, 0)
