"""Sans-I/O pieces of CHUNKING (RFC 3030): the BDAT command and its chunk reader.

With BDAT the client announces how many octets follow (C{BDAT <size>
[LAST]}) and sends them straight after the command line: no end marker, no
dot-stuffing, any octet allowed (C{BODY=BINARYMIME}).  The server has to
read exactly that many octets whatever it thinks of the command, because
the next command starts right after them; so every BDAT whose size could be
read consumes its chunk, and is refused only once the chunk is consumed.

A BDAT whose size cannot be read leaves the server no way to find the next
command: the rest of the stream may be message content, and running it as
commands would be the same mistake as SMTP smuggling.  L{parse_bdat}
raises L{ChunkSizeError} for it and the session answers C{501} and closes.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpproxy.errors import Reply
from smtpproxy.smtp.commands import CommandError
from smtpproxy.smtp.dotreader import BodySink

# A chunk size of more than this many digits is not a size anyone sends
# (10^19 octets); like SIZE, it is refused rather than converted.
MAX_SIZE_DIGITS = 19


class ChunkSizeError(CommandError):
    """The BDAT size is missing or not a number: the stream cannot be followed."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A parsed BDAT command.

    @ivar size: octets of content that follow the command line.
    @ivar last: the command said LAST.
    @ivar problem: the reply for a command whose size could be read but
        whose rest is malformed (C{BDAT 10 LATER}); its chunk is still read.
    """

    size: int
    last: bool
    problem: Reply | None = None


def parse_bdat(argument: str) -> Chunk:
    """Parse C{<size> [LAST]} (RFC 3030 2: C{chunk-size ::= 1*DIGIT}, C{LAST} any case).

    @raise ChunkSizeError: the size is missing or not a decimal number.
    """
    size_text, _, rest = argument.partition(" ")
    if not size_text.isdigit() or not size_text.isascii() or len(size_text) > MAX_SIZE_DIGITS:
        raise ChunkSizeError(501, "5.5.4", "Syntax: BDAT <size> [LAST]; closing connection")
    size = int(size_text)
    marker = rest.strip(" ")
    if not marker:
        return Chunk(size, False)
    if marker.upper() == "LAST":
        return Chunk(size, True)
    return Chunk(size, False, Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]"))


class ChunkReader:
    """Collects the chunks of one transaction into a sink, within the size limit.

    L{expect} announces a chunk; L{feed} takes what belongs to it from the
    data at hand and says how much it took.  Past C{max_size} octets in
    total the sink is told to discard what it holds and the reader keeps
    only counting, so a session stores at most the size limit whatever the
    client announces.  A reader without a sink only counts: it reads a
    refused chunk out of the stream.

    @ivar size: octets of all chunks so far, including discarded ones.
    @ivar remaining: octets of the current chunk not yet read.
    @ivar oversize: True once C{size} passed C{max_size}.
    """

    def __init__(self, max_size: int, sink: BodySink | None = None) -> None:
        self.max_size = max_size
        self.sink = sink
        self.size = 0
        self.remaining = 0
        self.oversize = False

    def expect(self, size: int) -> None:
        """The next C{size} octets of input are a chunk."""
        self.remaining = size

    def feed(self, data: bytes) -> int:
        """Take the start of C{data} that belongs to the current chunk; return its length.

        The chunk is complete when L{remaining} is 0; the rest of C{data}
        (from the returned index on) belongs to the command stream.
        """
        take = min(self.remaining, len(data))
        if take == 0:
            return 0
        self.remaining -= take
        self.size += take
        if self.sink is None or self.oversize:
            return take
        if self.size > self.max_size:
            self.oversize = True
            self.sink.discard()
            return take
        self.sink.write(data if take == len(data) else data[:take])
        return take
