"""DATA and BDAT bodies of an SMTP session, from the go-ahead to the delivery's answer.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from smtpproxy.errors import Reply, reply_for_failure
from smtpproxy.queue.model import EnqueueWithdrawnError
from smtpproxy.smtp.base import CHUNK, COMMAND, DATA, ShellBase, log
from smtpproxy.smtp.chunking import ChunkReader
from smtpproxy.smtp.dotreader import DataReader
from smtpproxy.smtp.session import (
    GO_AHEAD,
    Abandon,
    Message,
    OpenData,
    ReadChunk,
    Say,
    Transaction,
)
from smtpproxy.spool import MessageBody

# DATA must keep up this average rate once SMTP_DATA_TIMEOUT has passed
# (Postfix's smtpd_min_data_rate idea): a client trickling a byte at a time
# cannot hold a session for ever by resetting the idle timer.
MIN_DATA_RATE = 500.0
# DATA's go-ahead, formatted once.
_GO_AHEAD = Say(GO_AHEAD)
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")


class Intake(ShellBase):
    """C{OpenData} and C{ReadChunk} carried out: the body read, spooled, refused or delivered."""

    def _open_data(self, action: OpenData) -> None:
        failure = self._open_message()
        if failure is not None:
            self.reply(failure)
            return
        tx = self.session.tx
        tx.reader = DataReader(self.settings.max_message_size, tx.body)
        self.mode = DATA
        self.setTimeout(self.settings.data_timeout)
        self.reply(_GO_AHEAD)

    def _open_message(self) -> Reply | None:
        """Build the transaction's message and an empty body; the reply if that failed."""
        messages: list[Message] = []
        try:
            for _, factory in self.session.tx.recipients:
                message = factory()
                if not any(message is seen for seen in messages):
                    messages.append(message)
        except Exception as e:
            for message in messages:
                message.connectionLost()
            self._reset_transaction()
            return reply_for_failure(e)
        self.session.tx.messages = messages
        self.session.tx.body = self.factory.spool.body()
        self._data_started = self._clock.seconds()
        return None

    def _feed_data(self, data: bytes) -> None:
        reader = self.session.tx.reader
        assert reader is not None
        if self._too_slow(reader):
            self._cut_off_slow()
            return
        end = reader.feed(data)
        if end is None:
            return
        if end < len(data):
            self._input[:0] = data[end:]
        self._end_of_data()

    def _cut_off_slow(self) -> None:
        self._abandon(self.session.tx)
        self.mode = COMMAND
        self._reset_transaction()
        self.reply(421, "4.4.2", "Data arriving too slowly, closing connection")
        self._close(grace=1.0)

    def _too_slow(self, reader: DataReader | ChunkReader) -> bool:
        """Past the DATA timeout, has the body fallen below the minimum average rate?"""
        elapsed = self._clock.seconds() - self._data_started
        allowed = self.settings.data_timeout + reader.size / MIN_DATA_RATE
        return elapsed > allowed

    def _end_of_data(self) -> None:
        tx = self.session.tx
        reader, messages, body = tx.reader, tx.messages, tx.body
        assert reader is not None and body is not None
        tx.reader = tx.body = None
        tx.messages = []
        self.mode = COMMAND
        self.setTimeout(self._limits().command)
        self._complete(messages, body, reader.oversize, reader.size)

    def _complete(
        self, messages: list[Message], body: MessageBody, oversize: bool, size: int
    ) -> None:
        """The whole body is in (final dot or BDAT LAST): refuse it, or deliver it and answer."""
        if not oversize:
            body.finish()
        if oversize or body.error is not None:
            body.close()
            for message in messages:
                message.connectionLost()
            self._reset_transaction()
            if oversize:
                self.reply(self._too_big())
            else:
                self._spool_failed(body, size)
            self._stop_if_shutting_down()
            return
        for message in messages:
            message.bodyReceived(body)
        self._reset_transaction()
        self._delivering = (body, messages)
        # A spooled body is read back into memory only when the shared
        # budget has room for it (see smtpproxy.spool.InflightBudget).
        # A queued body is copied to the store as it is, never read back
        # here, so it claims nothing.
        queued = bool(messages) and all(getattr(m, "queued", False) for m in messages)
        waiting = None if queued else body.claim()
        d: object
        if waiting is None:
            d = self._deliver(messages)
        else:
            d = waiting.addCallback(lambda _: self._deliver(messages))

        def answer(result: object) -> None:
            # Delivered, refused or failed: the body (its file, its share
            # of the memory budget) is released here and nowhere later.
            self._delivering = None
            body.close()
            if self._gave_up:
                # The client already heard 421 (or is gone): nothing more to say.
                return
            if isinstance(result, Failure):
                error = result.value
                if isinstance(error, defer.FirstError):
                    error = error.subFailure.value
                assert error is not None
                if isinstance(error, EnqueueWithdrawnError):
                    self._not_accepted()  # withdrawn by force_close, at once
                    return
                self.reply(reply_for_failure(error))
                return
            if self._budget is not None:
                self._budget.delivered()
            ids = result if isinstance(result, list) else [result]
            names = " ".join(str(i) for i in ids if isinstance(i, str))
            verb = "queued" if queued else "delivered"
            self.reply(250, "2.0.0", f"OK: {verb} as {names}" if names else f"OK: {verb}")

        if not isinstance(d, defer.Deferred):
            d = defer.succeed(d)
        self._busy_with(d, answer)

    def _deliver(self, messages: list[Message]) -> object:
        """Ask each message to deliver: a Deferred of the id(s), or a foreign avatar's bare id."""
        if len(messages) == 1:
            # Our own delivery always makes one message per transaction.
            try:
                d: object = messages[0].eomReceived()
            except Exception:
                log.failure("delivery could not start", session=self.id)
                d = defer.fail()
            return d
        results = [defer.maybeDeferred(message.eomReceived) for message in messages]
        return defer.gatherResults(results, consumeErrors=True)

    def _spool_failed(self, body: MessageBody, size: int) -> None:
        """The disk refused the body: the client may retry; nothing was accepted."""
        error = body.error
        log.warn(
            "message body could not be spooled",
            session=self.id,
            client=self._peer,
            size=size,
            reason=(error.strerror or str(error)) if error is not None else None,
        )
        self.reply(SPOOL_FULL)

    def _too_big(self) -> Reply:
        size = self.settings.max_message_size
        return Reply(552, "5.3.4", f"Message too big: this server accepts at most {size} bytes")

    def _read_chunk(self, action: ReadChunk) -> None:
        if not self._nodelay:
            self._no_delay()
        chunk, refusal = action.chunk, action.refusal
        tx = self.session.tx
        if refusal is None and tx.chunks is None:
            failure = self._open_message()
            if failure is not None:
                refusal = Say(failure)
            else:
                tx.chunks = ChunkReader(self.settings.max_message_size, tx.body)
        if refusal is None:
            assert tx.chunks is not None
            reader = tx.chunks
        else:
            # A refused chunk is read and dropped; its own time counts.
            reader = ChunkReader(0)
            self._data_started = self._clock.seconds()
        reader.expect(chunk.size)
        self._chunk, self._chunk_last, self._chunk_refusal = reader, chunk.last, refusal
        if chunk.size == 0:
            self._end_of_chunk()
            return
        self.mode = CHUNK
        self.setTimeout(self.settings.data_timeout)

    def _no_delay(self) -> None:
        """Send small replies at once (no Nagle) from the first BDAT on.

        A chunk's reply is written when its last byte is read, usually in
        another read than the next one's, so a pipelined message's replies
        leave as several small writes.  With Nagle's algorithm each waits
        for the client to acknowledge the one before, and a client that has
        sent everything and only reads acknowledges late (delayed ACK): the
        reply to the message came 20-40 ms late on loopback.  Replies are
        whole lines, so nothing is gained by holding them back.
        """
        self._nodelay = True
        set_no_delay = getattr(self._tcp, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError as e:  # not a TCP socket after all: nothing to gain there
                log.debug("TCP_NODELAY not set", session=self.id, error=repr(e))

    def _feed_chunk(self, data: bytes) -> None:
        reader = self._chunk
        assert reader is not None
        if self._too_slow(reader):
            self._cut_off_slow()
            return
        taken = reader.feed(data)
        if taken < len(data):
            self._input[:0] = data[taken:]
        if reader.remaining == 0:
            self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        """The announced octets are in: answer the chunk, deliver after LAST."""
        reader, last, refusal = self._chunk, self._chunk_last, self._chunk_refusal
        assert reader is not None
        self._chunk = self._chunk_refusal = None
        self.mode = COMMAND
        self.setTimeout(self._limits().command)
        if refusal is not None:
            self._run(self.session.chunk_refused(refusal.reply, last))
            self.reply(refusal)
            if not self._closing:
                self._stop_if_shutting_down()
            return
        tx = self.session.tx
        body = tx.body
        assert body is not None
        if last:
            messages = tx.messages
            tx.chunks, tx.body, tx.messages = None, None, []
            self._complete(messages, body, reader.oversize, reader.size)
            return
        if reader.oversize:
            self.reply(self._too_big())
            self._run(self.session.chunk_refused(self._too_big(), last))
        elif body.error is not None:
            self._spool_failed(body, reader.size)
            self._run(self.session.chunk_refused(SPOOL_FULL, last))
        else:
            self.reply(250, "2.0.0", f"{reader.size} octets received")

    def _abandon_transaction(self, action: Abandon) -> None:
        self._abandon(action.transaction)

    def _abandon(self, tx: Transaction) -> None:
        """Release what a dropped transaction holds: its avatar messages, its body."""
        for message in tx.messages:
            try:
                message.connectionLost()
            except Exception:
                log.failure("message cleanup failed", session=self.id)
        tx.messages = []
        tx.reader = tx.chunks = self._chunk = None
        if tx.body is not None:
            # Connection lost, timed out or cut off at shutdown mid-DATA:
            # the spool file goes now, not when the session is collected.
            tx.body.close()
            tx.body = None

    def _reset_transaction(self) -> None:
        self._run(self.session.reset())

    def _give_up_delivery(self) -> None:
        """The client was told "not accepted", or is gone: a delivery not started stays so.

        A body can wait after its final dot, for room in the memory budget
        or for its turn to be parsed; delivering it after its client heard
        421 (or lost the connection) would make the client's retry a
        duplicate.  One already with the provider is left alone.
        """
        pending, self._delivering = self._delivering, None
        if pending is None:
            return
        self._gave_up = True
        body, messages = pending
        for message in messages:
            abandon = getattr(message, "abandon", None)
            if abandon is not None:
                abandon()
        if body.claim_pending:
            body.close()  # cancels the wait; the delivery's answer then goes nowhere
