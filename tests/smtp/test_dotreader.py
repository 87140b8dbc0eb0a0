"""The DATA reader: end marker, dot-unstuffing and the size bound, chunk by chunk."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.smtp.dotreader import ChunkList, DataReader


def _read(stream: bytes, sizes: list[int], max_size: int = 10**6) -> tuple[bytes | None, bytes]:
    """Feed C{stream} in chunks of the given sizes (cycled); return body and leftover."""
    sink = ChunkList()
    reader = DataReader(max_size, sink)
    position = 0
    step = 0
    while position < len(stream):
        chunk = stream[position : position + sizes[step % len(sizes)]]
        step += 1
        end = reader.feed(chunk)
        if end is not None:
            return b"".join(sink.chunks), stream[position + end :]
        position += len(chunk)
    return None, b""


def _stuff(body: bytes) -> bytes:
    """What a correct client sends for C{body} (which ends in CRLF)."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


class DataReaderTests(SynchronousTestCase):
    def test_empty_message(self) -> None:
        """A lone '.' line ends an empty body; what follows is left for the command loop."""
        self.assertEqual(_read(b".\r\nQUIT\r\n", [100]), (b"", b"QUIT\r\n"))

    def test_unstuffing_at_every_split(self) -> None:
        """Leading dots are removed however the stream is split into chunks."""
        stream = b"a\r\n..b\r\n.c\r\n...\r\n.\r\nNEXT"
        for size in range(1, len(stream) + 1):
            self.assertEqual(_read(stream, [size]), (b"a\r\n.b\r\nc\r\n..\r\n", b"NEXT"), size)

    def test_bare_newlines_never_end_the_body(self) -> None:
        """LF.LF, CR.CR and LF.CRLF are content (SMTP smuggling defence)."""
        stream = b"x\n.\ny\r.\rz\n.\r\nw\r\n.\r\n"
        self.assertEqual(_read(stream, [3]), (b"x\n.\ny\r.\rz\n.\r\nw\r\n", b""))

    def test_oversize_is_counted_not_kept(self) -> None:
        """Past the limit the reader keeps nothing but still finds the end marker."""
        sink = ChunkList()
        reader = DataReader(max_size=10, sink=sink)
        self.assertIsNone(reader.feed(b"0123456789abcdef" * 1000))
        self.assertEqual(reader.feed(b"\r\n.\r\n"), 5)
        self.assertTrue(reader.oversize)
        self.assertEqual(sink.chunks, [])
        self.assertEqual(reader.size, 16002)

    @given(
        lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r\n", b"")), max_size=20),
        sizes=st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=5),
    )
    def test_round_trip(self, lines: list[bytes], sizes: list[int]) -> None:
        """Any body a client stuffs correctly comes back byte for byte, any chunking."""
        body = b"".join(line + b"\r\n" for line in lines)
        stream = _stuff(body) + b".\r\nREST"
        self.assertEqual(_read(stream, sizes), (body, b"REST"))

    @given(
        stream=st.lists(
            st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"..", b"\r\n.\r\n", b"a", b"\r\n."]),
            max_size=40,
        ).map(b"".join),
        sizes=st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=5),
    )
    def test_same_as_two_scans(self, stream: bytes, sizes: list[int]) -> None:
        """Any bytes, correctly stuffed or not, any chunking: what the reader keeps, where
        it ends and the size it counts are those of the plain marker search plus
        unstuffing of every chunk (the reader's one-scan shortcut changes nothing)."""
        self.assertEqual(_read(stream, sizes), _reference_read(stream, sizes))


def _reference_read(stream: bytes, sizes: list[int]) -> tuple[bytes | None, bytes]:
    """L{_read} with the reader's first algorithm: find the marker, unstuff every chunk."""
    marker, stuffed = b"\r\n.\r\n", b"\r\n."
    kept: list[bytes] = []
    tail, started, position, step = b"\r\n", False, 0, 0

    def store(chunk: bytes) -> None:
        nonlocal started
        chunk = chunk.replace(stuffed, b"\r\n")
        if not started:
            if not chunk:
                return
            chunk, started = chunk[2:], True
        kept.append(chunk)

    while position < len(stream):
        data = stream[position : position + sizes[step % len(sizes)]]
        step += 1
        work = tail + data
        end = work.find(marker)
        if end >= 0:
            store(work[: end + 2])
            return b"".join(kept), stream[position + end + len(marker) - len(tail) :]
        keep = next((n for n in range(min(4, len(work)), 0, -1) if work.endswith(marker[:n])), 0)
        store(work[: len(work) - keep])
        tail = work[len(work) - keep :]
        position += len(data)
    return None, b""
