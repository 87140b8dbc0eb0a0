"""Review 7: a forced stop must not tell "not accepted" for a message the mailbox already kept.

The mailbox provider with a file (MAILBOX_PATH) keeps a message in its
store at once and fires its send only when the SQLite copy is committed.
It never marks the caller's L{smtpproxy.providers.result.Handover}, so at a
forced stop the session reads the send as "not handed over", answers 421
and cancels it; but cancelling cannot take the message out of the mailbox
(the file write goes on in its thread and commits the row, and the
cancelled waiter is then fired a second time).  The client hears "not
accepted" and retries; after the next start the mailbox holds the message
twice.
"""

from __future__ import annotations

import sqlite3
from typing import cast

from twisted.trial.unittest import TestCase

from smtpproxy.providers.mailbox.persist import MailboxFile
from smtpproxy.providers.mailbox.provider import MailboxProvider
from tests.providers.mailbox.test_provider import settings
from tests.smtp.test_protocol_edges import Harness, reply_codes
from tests.support import RecordingProvider, async_test, message


class MailboxForcedStopTests(TestCase):
    @async_test
    async def test_message_kept_by_the_mailbox_is_not_answered_421(self) -> None:
        """A message the mailbox (with a file) has already kept when the stop forces
        the session closed: the client must not hear 421 (the message is in the
        mailbox, so its retry is a duplicate).  Right: the provider marks the
        hand-over once the store has the message, and the client hears the send's
        real outcome (250 once the file commits) within the handover grace."""
        from twisted.internet import reactor

        path = self.mktemp()
        file = MailboxFile(path)
        provider = MailboxProvider(settings(path=path), reactor, file=file)
        self.addCleanup(provider.close)
        await provider.loaded()
        harness = Harness(provider=cast(RecordingProvider, provider))
        protocol, transport = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            + message("kept").replace(b"\n", b"\r\n")
            + b".\r\n"
        )
        harness.clock.advance(0)
        # The store has it; its file write is on the pool's thread.
        self.assertEqual(len(provider.store), 1)
        harness.factory.shutdown(timeout=30)
        harness.clock.advance(30)  # the shutdown timeout: force_close
        # Writes go in order: this one fires once the message's batch is done.
        await file.delete([])
        with sqlite3.connect(path) as db:
            (rows,) = db.execute("SELECT count(*) FROM messages").fetchone()
        codes = reply_codes(transport)
        self.assertEqual(codes[:5], [220, 250, 250, 250, 354])
        # The reply to the message itself is its real outcome; a 421 after it
        # is only the stopping session's goodbye (as for any handed-over send,
        # tests.test_handover_at_stop), which asks for no retry of the message.
        self.assertEqual(
            (codes[5], rows, len(provider.store)),
            (250, 1, 1),
            "the message the mailbox kept was not answered with its real outcome (250)",
        )
        self.assertNotIn(b"message not accepted", transport.value())

    @async_test
    async def test_client_gone_does_not_cancel_a_message_the_mailbox_kept(self) -> None:
        """Since fixshutdown a client that disconnects before its answer has its
        direct-mode send cancelled unless the provider marked the hand-over.  The
        mailbox (with a file) never marks it, so a disconnect right after the final
        dot takes the message out of the mailbox as it is seen (API, /metrics) while
        the file write goes on: the file and the mailbox disagree, and the message
        comes back at the next start.  Right: once the store has the message the
        send counts as handed over and is left to finish (mailbox and file agree)."""
        from twisted.internet import reactor

        path = self.mktemp()
        file = MailboxFile(path)
        provider = MailboxProvider(settings(path=path), reactor, file=file)
        self.addCleanup(provider.close)
        await provider.loaded()
        harness = Harness(provider=cast(RecordingProvider, provider))
        protocol, _ = harness.connect()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            + message("kept").replace(b"\n", b"\r\n")
            + b".\r\n"
        )
        harness.clock.advance(0)
        self.assertEqual(len(provider.store), 1)
        protocol.connectionLost(None)
        # Writes go in order: this one fires once the message's batch is done.
        await file.delete([])
        with sqlite3.connect(path) as db:
            (rows,) = db.execute("SELECT count(*) FROM messages").fetchone()
        self.assertEqual(
            (len(provider.store), rows),
            (1, 1),
            "the mailbox (in memory) and its file disagree about the message",
        )
