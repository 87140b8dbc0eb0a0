"""Who may read the queue's files: the SQLite store's files as it creates them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smtpproxy.queue.model import Envelope
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.spool import MessageBody

SECRET = b"Subject: payroll\r\n\r\nsalary of the board: 1,234,567\r\n"


class QueueFileModeTests(TestCase):
    async def test_database_holding_small_bodies_is_private(self) -> None:
        """Defect: a body larger than 64 KiB gets a file created 0600 in a 0700 directory
        (sqlite.py _write_body, _open_in_thread), but every smaller body (most mail) is
        stored inside queue.db (inline_bodies), and queue.db, queue.db-wal and
        queue.db-shm are created by sqlite3 with the process umask: under the usual 022
        (systemd's default, twistd -n keeps it) they are 0644, so any local user can read
        the envelopes and bodies of every small queued message, and the dead ones for
        QUEUE_DEAD_RETENTION.

        Correct: the store creates its database files readable by the relay's user only
        (create queue.db 0600 before sqlite3 opens it, or open under umask 077), as it
        already does for the body files."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "queue.db")
        previous = os.umask(0o022)
        try:
            store = SQLiteStore(path, 1 << 30, reactor)
            await store.open()
            self.addCleanup(store.close)
            body = MessageBody()
            body.write(SECRET)
            await store.enqueue(
                "0" * 23 + "1", Envelope("a@example.com", ("b@example.org",)), body, 0
            )
        finally:
            os.umask(previous)
        stored = Path(path).read_bytes() + Path(path + "-wal").read_bytes()
        self.assertIn(b"salary of the board", stored)  # the body is in these files
        modes = {
            name: stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            for name in sorted(os.listdir(directory))
            if name.startswith("queue.db") and not name.endswith(".bodies")
        }
        self.assertEqual(
            {name: mode & 0o077 for name, mode in modes.items()},
            dict.fromkeys(modes, 0),
            f"queue files readable by others: { {n: oct(m) for n, m in modes.items()} }",
        )
