"""Sans-I/O reader for the DATA phase: finds the end marker and unstuffs dots.

Stock Twisted handles DATA one line at a time in Python, which is both slow
and the source of two defects: an over-long line drops the session back into
command mode (so the rest of the body runs as commands), and a client that
never sends CRLF grows the line buffer without limit.  This reader works on
whole chunks with C{bytes.find} and C{bytes.replace}, holds back at most four
bytes between chunks, and stops storing (but keeps counting) once the
message is larger than allowed, so what a session stores is bounded by the
size limit whatever the client sends.

The reader stores nothing itself: it writes the unstuffed content into a
sink (L{BodySink}), which the session chooses.  The relay's sink is a
L{smtpproxy.spool.MessageBody}, which keeps a small body in memory and
moves a large one to disk; L{ChunkList} keeps everything in memory.

Only C{CRLF . CRLF} ends a message.  A bare LF or CR never does, so the
"SMTP smuggling" trick of hiding a second message behind C{LF . LF} cannot
work here.
"""

from __future__ import annotations

from typing import Protocol

_MARKER = b"\r\n.\r\n"
_STUFFED = b"\r\n."


class BodySink(Protocol):
    """Where the reader puts the message content."""

    def write(self, data: bytes) -> None:
        """Store the next piece of content (never empty)."""

    def discard(self) -> None:
        """The message is over the size limit: forget what was stored."""


class ChunkList:
    """A sink that keeps every chunk in a list."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def discard(self) -> None:
        self.chunks = []


class DataReader:
    """Accumulates one message body from the chunks that follow DATA.

    @ivar size: bytes of message content seen so far, after unstuffing,
        including any that were discarded for being over the limit.
    @ivar oversize: True once C{size} passed C{max_size}; the content is no
        longer kept, and the caller must reject the message.
    @ivar sink: where the content goes (a L{ChunkList} unless given).
    """

    def __init__(self, max_size: int, sink: BodySink | None = None) -> None:
        self.max_size = max_size
        self.size = 0
        self.oversize = False
        self.sink: BodySink = sink if sink is not None else ChunkList()
        # The body starts at the start of a line: pretend a CRLF came first so
        # a leading "." is unstuffed and an immediate ".\r\n" ends the body.
        self._tail = b"\r\n"
        self._started = False

    def feed(self, data: bytes) -> int | None:
        """Consume C{data}.

        @return: None while the message continues; once the end marker is
            seen, the index in C{data} of the first byte after it (the rest
            belongs to the command stream).
        """
        work = self._tail + data if self._tail else data
        # The end marker and a stuffed dot both start with CRLF ".", which
        # ordinary text rarely holds.  When its first occurrence is the
        # marker (or there is none), nothing before the marker is stuffed:
        # one scan of the chunk instead of a search for the marker and a
        # second one for stuffed dots, each slowed down by every line end.
        first = work.find(_STUFFED)
        plain = first < 0 or work.startswith(_MARKER, first)
        end = first if plain else work.find(_MARKER)
        if end >= 0:
            self._store(work[: end + 2], plain)
            self._tail = b""
            return end + len(_MARKER) - (len(work) - len(data))
        keep = _partial_marker(work)
        self._store(work[: len(work) - keep] if keep else work, plain)
        self._tail = work[len(work) - keep :] if keep else b""
        return None

    def _store(self, chunk: bytes, plain: bool = False) -> None:
        """Unstuff C{chunk} (unless C{plain}: it has no CRLF "." at all) and keep it."""
        if not plain:
            chunk = chunk.replace(_STUFFED, b"\r\n")
        if not self._started:
            # Drop the CRLF we pretended to have seen before the body.  A
            # marker prefix never splits it, so a chunk holds all or none of it.
            if not chunk:
                return
            chunk = chunk[2:]
            self._started = True
        self.size += len(chunk)
        if self.oversize:
            return
        if self.size > self.max_size:
            self.oversize = True
            self.sink.discard()
            return
        if chunk:
            self.sink.write(chunk)


def _partial_marker(data: bytes) -> int:
    """Length of the longest suffix of C{data} that could begin the end marker."""
    for length in range(min(len(_MARKER) - 1, len(data)), 0, -1):
        if data.endswith(_MARKER[:length]):
            return length
    return 0
