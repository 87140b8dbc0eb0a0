"""A queued body file damaged or removed by hand, as the real SQLite store and worker see it.

The queue stores a body larger than 64 KiB in a file of its own beside
C{queue.db}; the row keeps the size that was acknowledged with C{250}.
These tests damage that file between the acknowledgement and the delivery
and run one real delivery attempt (real store, real reactor, the worker's
real parser and pipeline; the provider records what it is handed).
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.queue.front import QueueFront
from smtpproxy.queue.model import Entry, Envelope, State
from smtpproxy.queue.policy import Schedule
from smtpproxy.queue.sqlite import SQLiteStore, body_directory
from smtpproxy.queue.worker import QueueRunner, RunnerSettings
from smtpproxy.spool import MessageBody
from tests.support import RecordingProvider, message

SETTINGS = RunnerSettings(
    concurrency=2,
    per_route=3,
    lease_time=30.0,
    schedule=Schedule(min_interval=60.0, max_interval=600.0, max_age=5 * 86400.0),
    dead_retention=86400.0,
    shutdown_timeout=1.0,
    poll_interval=0.05,
    purge_interval=600.0,
)

#: Larger than the store's inline limit (64 KiB), so the body gets a file.
BIG_TEXT = "".join(f"line {n:06d} of a long report\r\n" for n in range(4000))


class DamagedBodyTests(TestCase):
    async def setup_queue(self) -> tuple[SQLiteStore, str, str, int]:
        """A real SQLite queue holding one acknowledged large message; its id, file and size."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "queue.db")
        store = SQLiteStore(path, 1 << 30, reactor)
        await store.open()
        self.addCleanup(store.close)
        front = QueueFront(store, reactor, kick=lambda: None)
        data = message("Quarterly report", body=BIG_TEXT)
        body = MessageBody()
        body.write(data)
        id = front.new_id()
        await front.enqueue(id, Envelope("a@example.com", ("b@example.org",)), body)
        [name] = os.listdir(body_directory(path))
        return store, id, os.path.join(body_directory(path), name), len(data)

    async def one_attempt(
        self, store: SQLiteStore, id: str
    ) -> tuple[RecordingProvider, Entry | None]:
        """Run the real worker until the message's first attempt is recorded."""
        provider = RecordingProvider()
        runner = QueueRunner(
            store, provider, reactor, MessageParser(reactor), SETTINGS, owner="review9"
        )
        runner.startService()
        self.addCleanup(runner.stopService)
        for _ in range(200):
            entry = await store.show(id)
            if entry is None or entry.attempts >= 1:
                break
            await deferLater(reactor, 0.02, lambda: None)
        await runner.stopService()
        return provider, await store.show(id)

    async def test_truncated_body_file_is_not_delivered_as_if_whole(self) -> None:
        """Defect: a body file shorter than the size the queue acknowledged is delivered
        as it is, and the message leaves the queue as delivered.  The store's read_body
        (sqlite.py _read_file) and the worker's _parse never compare the bytes read with
        the stored size, so a body damaged on disk (truncated by a crash of the
        filesystem, a full disk during a restore, or by hand) reaches the recipient cut
        short with no error anywhere.

        Correct: a body whose length differs from the acknowledged size is never handed
        to the provider; the message is kept (dead, with a reply saying its body is
        damaged) so the operator can see it, as open() does for a missing body file."""
        store, id, path, size = await self.setup_queue()
        os.truncate(path, size // 3)
        provider, entry = await self.one_attempt(store, id)
        self.assertEqual(
            [len(e.raw) for e in provider.emails],
            [],
            "a truncated body was handed to the provider as the whole message",
        )
        self.assertIsNotNone(entry, "the damaged message left the queue as delivered")
        assert entry is not None
        self.assertEqual(entry.state, State.DEAD)

    async def test_body_file_removed_at_runtime_is_dead_with_a_clear_reply(self) -> None:
        """Defect: a body file that disappears while the relay runs (removed by hand or by
        a clean-up job) makes every attempt fail with FileNotFoundError, which the worker
        maps to the generic transient reply "451 4.3.0 Local error in processing" and
        retries on the back-off until QUEUE_MAX_AGE (five days by default).  Nothing can
        ever deliver it, the reply does not say why, and the message only dies days later
        as "expired".  The store already knows better: open() turns such a row dead at
        once with "554 5.3.0 queued body file was missing ..." (LOST_BODY_REPLY).

        Correct: the first attempt that finds the body gone makes the message dead at
        once, with a reply saying the body file is missing, and does not schedule retries."""
        store, id, path, _ = await self.setup_queue()
        os.unlink(path)
        provider, entry = await self.one_attempt(store, id)
        self.assertEqual(provider.emails, [])
        assert entry is not None
        self.assertEqual(
            (entry.state, entry.attempts),
            (State.DEAD, 1),
            f"a message whose body is gone was scheduled for retries: {entry.last_reply!r}",
        )
        self.assertIn("body", entry.last_reply)
