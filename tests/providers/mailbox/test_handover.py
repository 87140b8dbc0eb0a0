"""The mailbox's hand-over: once its store has a message, a cancel cannot take it back.

What the session and the HTTP API read at a forced stop or a client gone
(L{smtpproxy.providers.result.Handover}); the session-level cases are in
tests/test_review7_mailbox_stop.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.providers.mailbox.persist import MailboxFile, Row
from smtpproxy.providers.mailbox.provider import MailboxProvider
from smtpproxy.providers.result import SendCancelledError, watched
from tests.providers.mailbox.helpers import email
from tests.providers.mailbox.test_provider import settings
from tests.support import async_test


class HeldWriteFile(MailboxFile):
    """The real file, whose inserts answer only when the test says (to fail one later)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.inserts: list[defer.Deferred[None]] = []

    def insert(self, row: Row, evicted: Sequence[str]) -> defer.Deferred[None]:
        held: defer.Deferred[None] = defer.Deferred()
        self.inserts.append(held)
        return held


def rows_in(path: str) -> int:
    with sqlite3.connect(path) as db:
        (rows,) = db.execute("SELECT count(*) FROM messages").fetchone()
    return int(rows)


class HandoverTests(TestCase):
    async def opened(self, path: str, file: MailboxFile) -> MailboxProvider:
        """A mailbox on the real reactor keeping C{file}, once the file is read."""
        from twisted.internet import reactor

        provider = MailboxProvider(settings(path=path), reactor, file=file)
        self.addCleanup(provider.close)
        await provider.loaded()
        return provider

    def test_in_memory_the_send_is_handed_over_and_done(self) -> None:
        """Without a file the message is kept at once: handed over, and the send has
        already fired, so there is nothing left to cancel."""
        provider = MailboxProvider(settings(), Clock())
        sending, handover = watched(lambda: provider.send(email()))
        self.assertIsNone(self.successResultOf(sending))
        self.assertTrue(handover.handed_over)

    def test_a_refused_message_is_not_handed_over(self) -> None:
        """A message too large for the mailbox is refused before the store has it: the
        hand-over stays unmarked, so a cancel would (rightly) count it undelivered."""
        provider = MailboxProvider(settings(max_bytes=10), Clock())
        sending, handover = watched(lambda: provider.send(email()))
        self.failureResultOf(sending, PermanentDeliveryError)
        self.assertFalse(handover.handed_over)

    @async_test
    async def test_a_cancel_after_the_store_keeps_the_message(self) -> None:
        """With a file, the send is handed over as soon as the store has the message
        (before the row commits).  Cancelling it then fails the send with
        SendCancelledError(handed_over=True) and leaves the write alone: the message
        stays in the mailbox and its row is committed, so the two agree."""
        path = self.mktemp()
        file = MailboxFile(path)
        provider = await self.opened(path, file)
        sending, handover = watched(lambda: provider.send(email()))
        self.assertTrue(handover.handed_over)
        self.assertNoResult(sending)
        sending.cancel()
        failure = self.failureResultOf(sending, SendCancelledError)
        self.assertTrue(failure.value.handed_over)
        # Writes go in order: this one fires once the message's batch is done.
        await file.delete([])
        self.assertEqual((len(provider.store), rows_in(path)), (1, 1))

    @async_test
    async def test_the_handover_is_marked_for_a_send_that_waited_for_the_load(self) -> None:
        """A message sent while the file is still being read is kept after the load, in
        another call stack than the caller's: it still marks the caller's hand-over."""
        from twisted.internet import reactor

        path = self.mktemp()
        provider = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        self.addCleanup(provider.close)
        self.assertFalse(provider.is_loaded)
        sending, handover = watched(lambda: provider.send(email()))
        self.assertFalse(handover.handed_over)
        await sending
        self.assertTrue(handover.handed_over)
        self.assertEqual(len(provider.store), 1)

    @async_test
    async def test_a_write_that_fails_takes_the_message_out_even_after_a_cancel(self) -> None:
        """The cancel only cut off the answer: when the row then cannot be written, the
        message still leaves the mailbox (not on disk, not kept; its client had no 250
        and retries), and the write's error goes nowhere unhandled.  Without a cancel
        the client hears the write's failure as a temporary one."""
        file = HeldWriteFile(self.mktemp())
        provider = await self.opened(file.path, file)
        cancelled, _ = watched(lambda: provider.send(email()))
        answered, _ = watched(lambda: provider.send(email()))
        self.assertEqual(len(provider.store), 2)
        cancelled.cancel()
        self.failureResultOf(cancelled, SendCancelledError)
        self.assertEqual(len(provider.store), 2)
        for held in file.inserts:
            held.errback(OSError("disk full"))
        self.assertEqual(len(provider.store), 0)
        self.failureResultOf(answered, TransientDeliveryError)

    @async_test
    async def test_a_send_cancelled_while_the_file_loads_is_not_kept(self) -> None:
        """Cancelled before the load let it into the store: the send says nothing was
        handed over (so the caller logs "not delivered", not "unknown"), and the
        message never reaches the mailbox once the load is done."""
        from twisted.internet import reactor

        path = self.mktemp()
        provider = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        self.addCleanup(provider.close)
        sending, handover = watched(lambda: provider.send(email()))
        sending.cancel()
        failure = self.failureResultOf(sending, SendCancelledError)
        self.assertFalse(failure.value.handed_over)
        await provider.loaded()
        self.assertFalse(handover.handed_over)
        self.assertEqual(len(provider.store), 0)
