"""Message bodies that stay small in memory: spooled to disk past a threshold.

Without this, every session inside DATA holds its whole body in memory until
the final dot, so the process's memory grows with the size and the number of
messages in flight (20 sessions of 24 MB took the relay to 551 MB, and the
defaults allow 1,000 sessions of 25 MiB).  A L{MessageBody} keeps a small
body as a list of chunks, as before, so the common 10 KB message never
touches the file system; past C{threshold} bytes, or when the process as a
whole already holds too much (L{InflightBudget}), it moves what it has to an
unlinked temporary file and writes the rest there as it arrives.  The bytes
come back into memory once, when the message is delivered, and even that
waits its turn in the same budget, so twenty 24 MB deliveries do not all sit
in memory at once.

A failing disk (full, quota, I/O error) never loses anything silently: the
body remembers the error, keeps counting what arrives so the DATA phase can
run to its final dot, and the protocol answers C{452 4.3.1}.

This module does no I/O of its own except through the file object it is
given by C{open_file}, so tests can inject one that fails.
"""

from __future__ import annotations

import collections
import contextlib
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

from twisted.internet import defer

__all__ = ["InflightBudget", "MessageBody", "Spool", "open_spool_file"]


def open_spool_file(directory: str | None) -> IO[bytes]:
    """An anonymous file in C{directory} (None: the system's temp directory).

    C{TemporaryFile} unlinks the file at once (on Linux it is created with
    C{O_TMPFILE} and never has a name), so nothing is left behind if the
    process dies, and the space is freed as soon as the file is closed.
    """
    return tempfile.TemporaryFile(dir=directory or None)


class InflightBudget:
    """Bytes of message bodies held in memory by every session together.

    Receiving sessions ask with L{reserve}, which never waits: a refusal
    means "spill to disk now".  A spooled body that is about to be read back
    for delivery asks with L{acquire}, which waits (first come, first
    served) until enough is free; while anyone waits, L{reserve} refuses, so
    new DATA goes to disk instead of starving the waiter.  A body larger
    than the whole limit is let through when nothing else is held, so it
    can never wait for ever.

    One instance lives on the L{smtpproxy.smtp.protocol.RelayFactory}; there is no
    module-level state.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: collections.deque[tuple[int, defer.Deferred[None]]] = collections.deque()
        self._granting = False

    def reserve(self, size: int) -> bool:
        """Take C{size} bytes if they fit now and nobody is waiting; never waits."""
        if self.held + size > self.limit or self._waiting:
            return False
        self.held += size
        return True

    def acquire(self, size: int) -> defer.Deferred[None] | None:
        """Take C{size} bytes: None if granted at once, else a Deferred that fires when granted."""
        if not self._waiting and self._fits(size):
            self.held += size
            return None
        waiting: defer.Deferred[None] = defer.Deferred(lambda d: self._forget(d))
        self._waiting.append((size, waiting))
        return waiting

    def release(self, size: int) -> None:
        """Give back C{size} bytes and let waiters in, in order, while they fit."""
        self.held -= size
        # A granted waiter usually delivers and releases within the same
        # call; the flag turns that recursion into iterations of this loop.
        if self._granting:
            return
        self._granting = True
        try:
            while self._waiting and self._fits(self._waiting[0][0]):
                size, waiting = self._waiting.popleft()
                self.held += size
                waiting.callback(None)
        finally:
            self._granting = False

    @property
    def waiting(self) -> int:
        """How many read-backs are queued."""
        return len(self._waiting)

    def _fits(self, size: int) -> bool:
        return self.held + size <= self.limit or self.held == 0

    def _forget(self, cancelled: defer.Deferred[None]) -> None:
        self._waiting = collections.deque(w for w in self._waiting if w[1] is not cancelled)


class MessageBody:
    """One message's body: chunks in memory, or an unlinked file once large.

    The writer (the DATA reader) calls L{write} and, when the message turns
    out too big, L{discard}; the protocol calls L{finish} at the final dot,
    L{claim} before delivery, and L{close} when the transaction is over,
    whatever its outcome.  The delivery code calls L{read} for the bytes.

    @ivar size: bytes written so far (including any that could not be
        stored because of an error).
    @ivar error: the C{OSError} that stopped the spooling, if any; the
        body's content is then incomplete and must not be delivered.
    """

    size = 0
    error: OSError | None = None
    _file: IO[bytes] | None = None
    _held = 0
    _closed = False
    _waiting: defer.Deferred[None] | None = None

    def __init__(
        self,
        threshold: int = 1 << 62,
        budget: InflightBudget | None = None,
        directory: str | None = None,
        open_file: Callable[[str | None], IO[bytes]] = open_spool_file,
    ) -> None:
        self._threshold = threshold
        # Without a shared budget (a body built outside a session), this
        # body only answers to its own threshold.
        self._budget = budget if budget is not None else InflightBudget(1 << 62)
        self._directory = directory
        self._open_file = open_file
        self._chunks: list[bytes] = []

    @property
    def spooled(self) -> bool:
        """True once the body lives in a file rather than in memory."""
        return self._file is not None

    @property
    def stored(self) -> int:
        """Bytes of content kept, in memory or on disk; 0 once discarded, failed or closed."""
        return 0 if self._closed or self.error is not None else self.size

    @property
    def held(self) -> int:
        """Bytes of this body counted against the budget (in memory now or being delivered)."""
        return self._held

    def write(self, data: bytes) -> None:
        """Store the next chunk, spilling to disk when it no longer belongs in memory."""
        size = len(data)
        self.size += size
        if self._file is None:
            # Once closed or failed the threshold is -1: this test fails
            # and the one below ends the call, keeping this path short.
            if self.size <= self._threshold and self._budget.reserve(size):
                self._chunks.append(data)
                self._held += size
                return
            if self._closed or self.error is not None:
                return
            self._spill()
            if self._file is None:
                return
        try:
            self._file.write(data)
        except OSError as e:
            self._fail(e)

    def discard(self) -> None:
        """Forget the content (the message is too big); later writes are only counted."""
        self._release_file()
        self._chunks = []
        self._release_memory()
        self._closed = True
        self._threshold = -1

    def finish(self) -> None:
        """The final dot arrived: push buffered bytes to the file, so a late error shows now."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self._fail(e)

    def claim(self) -> defer.Deferred[None] | None:
        """Reserve memory for reading a spooled body back: None when L{read} may go at once.

        A body in memory already holds its reservation.  A spooled one waits
        in the budget's queue until its size fits.
        """
        if self._file is None or self._held:
            return None
        size = self.size
        waiting = self._budget.acquire(size)
        if waiting is None:
            self._held = size
            return None

        def granted(_: None) -> None:
            self._waiting = None
            self._held = size

        self._waiting = waiting
        waiting.addCallback(granted)
        return waiting

    @property
    def claim_pending(self) -> bool:
        """Is a L{claim} still waiting for room in the budget (nothing read back yet)?"""
        return self._waiting is not None

    def read(self) -> bytes:
        """The whole body as bytes; a spooled body's file is closed (its space freed).

        @raise OSError: the file could not be read back.
        """
        if self._file is None:
            chunks = self._chunks
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        spool = self._file
        try:
            spool.seek(0)
            data = spool.read()
        finally:
            self._release_file()
        self._chunks = [data]
        return data

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The body from its start in pieces of at most C{size} bytes, leaving it stored.

        This is how a durable queue copies a body without a second whole
        copy in memory (L{smtpproxy.queue.model.BodySource}).  It may run in
        a worker thread: nothing else touches the body until the copy's
        Deferred has fired, and the caller closes it only after that.

        @raise OSError: the spool file could not be read back.
        """
        if self._file is None:
            for chunk in self._chunks:
                for start in range(0, len(chunk), size):
                    yield chunk[start : start + size] if len(chunk) > size else chunk
            return
        spool = self._file
        spool.seek(0)
        while piece := spool.read(size):
            yield piece

    def close(self) -> None:
        """Release everything: the file, the memory reservation, a queued claim."""
        self._closed = True
        self._threshold = -1
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._file is not None:
            self._release_file()
        self._chunks = []
        if self._held:
            self._release_memory()

    def _spill(self) -> None:
        try:
            spool = self._open_file(self._directory)
        except OSError as e:
            self._fail(e)
            return
        self._file = spool
        try:
            for chunk in self._chunks:
                spool.write(chunk)
        except OSError as e:
            self._fail(e)
            return
        self._chunks = []
        self._release_memory()

    def _fail(self, error: OSError) -> None:
        self.error = error
        self._threshold = -1
        self._release_file()
        self._chunks = []
        self._release_memory()

    def _release_file(self) -> None:
        spool, self._file = self._file, None
        if spool is not None:
            # Closing flushes; on a full disk that fails too, but the
            # descriptor is released all the same.
            with contextlib.suppress(OSError):
                spool.close()

    def _release_memory(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self._budget.release(held)


class Spool:
    """How one listener stores bodies: the threshold, the directory, the shared budget.

    The factory holds one and every session asks it for a L{MessageBody}
    per transaction; tests swap in one whose C{open_file} fails.
    """

    def __init__(
        self,
        threshold: int,
        directory: str | None = None,
        budget: InflightBudget | None = None,
        open_file: Callable[[str | None], IO[bytes]] = open_spool_file,
    ) -> None:
        self.threshold = threshold
        self.directory = directory
        self.budget = budget if budget is not None else InflightBudget(1 << 62)
        self.open_file = open_file

    def body(self) -> MessageBody:
        """A new, empty body for one transaction."""
        return MessageBody(self.threshold, self.budget, self.directory, self.open_file)
