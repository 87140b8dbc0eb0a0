"""The input loop of an SMTP session: one command at a time, and flow control.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from smtpproxy.errors import Reply
from smtpproxy.smtp.base import AUTH, CHUNK, COMMAND, DATA, PAUSE_INPUT_AT, ShellBase, log
from smtpproxy.smtp.session import ERROR

# RFC 4954 4 allows AUTH lines of 12288 octets (base64 credentials); no
# line is kept past that.
MAX_AUTH_LINE = 12_288


class InputLoop(ShellBase):
    """Buffered input, handled one command at a time; the transport's producer."""

    # -- flow control: IPushProducer for the transport ---------------------

    def pauseProducing(self) -> None:
        """Our replies are not being read: stop reading and handling commands."""
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if not self._closing:
            self._process()

    def stopProducing(self) -> None:
        self._write_blocked = True

    def _update_reading(self) -> None:
        """Pause the socket while replies back up or a waiting command's input piles up."""
        want_pause = self._write_blocked or (self._busy and len(self._input) > PAUSE_INPUT_AT)
        if want_pause and not self._paused:
            self._paused = True
            self._tcp.pauseProducing()
        elif self._paused and not want_pause:
            self._paused = False
            self._tcp.resumeProducing()

    # -- input loop -----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._corked = True
        try:
            ready = not self._input and not self._busy and not self._write_blocked
            if ready and self.mode == DATA:
                # Fast path: body bytes go straight to the reader, no copy.
                self.resetTimeout()
                self._feed_data(data)
            elif ready and self.mode == CHUNK:
                self.resetTimeout()
                self._feed_chunk(data)
            elif (
                ready
                and self.mode == COMMAND
                and not self._discarding_line
                and data.endswith(b"\n")
                and data.find(b"\n") == len(data) - 1
            ):
                # Fast path: exactly one whole command line, as clients that
                # wait for each reply send them; no buffering.
                line = data[:-2] if data.endswith(b"\r\n") else data[:-1]
                self.resetTimeout()
                self._command(line)
            else:
                self._input += data
            if self._input or self._paused or self._write_blocked:
                # Otherwise nothing is buffered and reading needs no change:
                # _process_input would find nothing to do.
                self._process_input()
        finally:
            # What _uncork does, without two calls per read.
            self._corked = False
            if self._pending:
                self._flush()

    def _process(self) -> None:
        """Handle buffered input, sending the replies it produces together."""
        if self._corked:
            self._process_input()
            return
        self._corked = True
        try:
            self._process_input()
        finally:
            self._uncork()

    def _process_input(self) -> None:
        while self._input and not self._busy and not self._write_blocked and not self._closing:
            if self.mode == DATA:
                data = bytes(self._input)
                self._input.clear()
                self.resetTimeout()
                self._feed_data(data)
                continue
            if self.mode == CHUNK:
                assert self._chunk is not None
                take = min(self._chunk.remaining, len(self._input))
                data = bytes(self._input[:take])
                del self._input[:take]
                self.resetTimeout()
                self._feed_chunk(data)
                continue
            end = self._input.find(b"\n")
            if end < 0:
                if len(self._input) > MAX_AUTH_LINE:
                    # Keep nothing of an endless line; answer when it ends.
                    if self.mode != AUTH and looks_like_bdat(self._input):
                        self._refuse_bdat_line(Reply(500, "5.5.2", "Line too long"))
                        break
                    self._input.clear()
                    self._discarding_line = True
                break
            line = bytes(self._input[:end])
            del self._input[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self.resetTimeout()
            if self._discarding_line:
                self._discarding_line = False
                if self.mode == AUTH:
                    self._end_auth()
                self.reply(500, "5.5.2", "Line too long", counts_as=ERROR)
                continue
            if self.mode == AUTH:
                self._auth_step(self.session.auth_response(line))
            else:
                self._command(line)
        if not self._closing:
            self._update_reading()

    def _refuse_bdat_line(self, reply: Reply) -> None:
        """A BDAT line we cannot read: its chunk's end is unknown, so close.

        The octets of the chunk follow the line at once; read as commands
        they would run as commands (the SMTP smuggling shape).  RFC 3030
        leaves the case open; as for a size that cannot be read
        (L{smtpproxy.smtp.chunking.ChunkSizeError}) the only safe answer is
        the reply, then the end of the connection.
        """
        self.reply(Reply(reply.code, reply.status, f"{reply.text}; closing connection"))
        self._close()

    def _busy_with(
        self,
        d: defer.Deferred[Any],
        on_result: Callable[[Any], object] | None = None,
    ) -> None:
        """Hold further input until C{d} fires; C{on_result} then sends the reply.

        C{on_result} gets C{d}'s result, a L{Failure} included.  One
        callback does everything here: on the hot path each extra Deferred
        callback is a measurable share of the cost of a message.
        """
        self._busy = True
        # When d has already fired (most validations do), the input loop that
        # called us carries on by itself; recursing into it here would nest
        # one stack frame per pipelined command.  Only a command that really
        # waits stops the idle timer (a slow backend is not an idle client).
        synchronous = True

        def done(result: object) -> None:
            try:
                if on_result is not None:
                    on_result(result)
                elif isinstance(result, Failure):
                    self._unexpected(result)
            except Exception:
                self._unexpected(Failure())
            self._busy = False
            if self._closing or self._stop_if_shutting_down():
                return
            if not synchronous:
                self.setTimeout(self._limits().command)
                self._process()

        d.addBoth(done)
        synchronous = False
        if self._busy:
            self.setTimeout(None)

    def _unexpected(self, failure: Failure) -> None:
        """Our own bug: log it with its traceback, tell the client to retry."""
        log.failure("unexpected error in session", failure, session=self.id)
        self.reply(451, "4.3.0", "Local error in processing")


def looks_like_bdat(line: bytes | bytearray) -> bool:
    """Does this command line (however malformed) start with the verb BDAT?"""
    return bytes(line[:16]).lstrip(b" \t")[:4].upper() == b"BDAT"
