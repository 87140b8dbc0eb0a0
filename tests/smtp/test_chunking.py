"""CHUNKING and BINARYMIME (RFC 3030): BDAT parsing, its reader, and the session's rules.

The pure pieces (L{parse_bdat}, L{ChunkReader}) are tested directly; the
session's rules on an in-memory session driven by a L{Clock}; the wire with
a raw socket client (neither smtplib nor the packaged swaks speak BDAT) and,
for BINARYMIME through Graph's MIME mode, the fake Graph.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.graph.retry import Tuning
from smtpproxy.smtp.chunking import Chunk, ChunkReader, ChunkSizeError, parse_bdat
from smtpproxy.smtp.dotreader import ChunkList
from smtpproxy.spool import Spool, open_spool_file
from tests.fakegraph import FakeGraph
from tests.smtp.test_protocol_edges import Harness, reply_codes, reply_lines
from tests.support import TIMEOUT, RecordingProvider, in_thread, read_replies, start_relay

reactor: Any = _reactor

START = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
# Bytes DATA could never carry as they are: a dot line, a bare LF and a
# bare CR, NUL, 8-bit bytes, and a fake end of data.
BINARY = b"Subject: bin\r\n\r\n.\r\n..\r\nbare\nlf\rcr\x00\xff\xfe\r\n.\r\nend"


def bdat(data: bytes, last: bool = False) -> bytes:
    """One BDAT command and its chunk, as a client writes them."""
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def chunked(message: bytes, sizes: list[int]) -> bytes:
    """C{message} as BDAT chunks of the given sizes (the rest in the LAST chunk)."""
    out, position = [], 0
    for size in sizes:
        out.append(bdat(message[position : position + size]))
        position += size
    out.append(bdat(message[position:], last=True))
    return b"".join(out)


class ParseBdatTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """A size, optionally LAST in any case; zero is a valid size."""
        self.assertEqual(parse_bdat("10"), Chunk(10, False))
        self.assertEqual(parse_bdat("10 last"), Chunk(10, True))
        self.assertEqual(parse_bdat("0 LAST"), Chunk(0, True))
        self.assertEqual(parse_bdat("007  LAST"), Chunk(7, True))

    def test_unreadable_size(self) -> None:
        """No size, a sign, letters or an absurd number of digits: the stream is lost."""
        for argument in ("", "x", "-1", "+1", "1e3", "LAST", "1" * 20, "\u0663"):
            with self.assertRaises(ChunkSizeError, msg=argument) as caught:
                parse_bdat(argument)
            self.assertEqual(caught.exception.reply.code, 501)

    def test_bad_marker_keeps_the_size(self) -> None:
        """C{BDAT 4 LATER}: the size is known (the chunk can be skipped), the command is 501."""
        chunk = parse_bdat("4 LATER")
        self.assertEqual((chunk.size, chunk.last), (4, False))
        assert chunk.problem is not None
        self.assertEqual((chunk.problem.code, chunk.problem.status), (501, "5.5.4"))
        self.assertIsNotNone(parse_bdat("4 LAST LAST").problem)


class ChunkReaderTests(SynchronousTestCase):
    def test_takes_only_the_announced_octets(self) -> None:
        """feed returns how much belonged to the chunk; the rest is left for commands."""
        sink = ChunkList()
        reader = ChunkReader(100, sink)
        reader.expect(5)
        self.assertEqual(reader.feed(b"abc"), 3)
        self.assertEqual(reader.feed(b"deNOOP\r\n"), 2)
        self.assertEqual((reader.remaining, reader.size), (0, 5))
        self.assertEqual(reader.feed(b"more"), 0)
        reader.expect(2)
        self.assertEqual(reader.feed(b"fg"), 2)
        self.assertEqual(b"".join(sink.chunks), b"abcdefg")

    def test_over_the_limit_discards_and_counts(self) -> None:
        """Past the size limit the sink is emptied; later octets are counted, never stored."""
        sink = ChunkList()
        reader = ChunkReader(4, sink)
        reader.expect(3)
        reader.feed(b"abc")
        reader.expect(3)
        self.assertEqual(reader.feed(b"def"), 3)
        self.assertTrue(reader.oversize)
        self.assertEqual(sink.chunks, [])
        reader.expect(1000)
        reader.feed(b"x" * 1000)
        self.assertEqual((sink.chunks, reader.size), ([], 1006))

    def test_without_sink_only_counts(self) -> None:
        """A refused chunk is read through a reader that stores nothing."""
        reader = ChunkReader(0)
        reader.expect(3)
        self.assertEqual(reader.feed(b"abcdef"), 3)
        self.assertFalse(reader.oversize)


class SessionTests(SynchronousTestCase):
    """The RFC 3030 rules, on an in-memory session."""

    def session(self, **settings: Any) -> tuple[Harness, Any, Any]:
        settings.setdefault("binarymime", True)
        harness = Harness(**settings)
        protocol, transport = harness.connect()
        return harness, protocol, transport

    def test_ehlo_advertises(self) -> None:
        """CHUNKING and DSN always; BINARYMIME only when the provider carries binary."""
        for binary in (True, False):
            _, protocol, transport = self.session(binarymime=binary)
            protocol.dataReceived(b"EHLO c\r\n")
            text = transport.value()
            self.assertIn(b"250-CHUNKING\r\n", text)
            self.assertIn(b"DSN\r\n", text)
            self.assertEqual(b"BINARYMIME" in text, binary)

    def test_pipelined_chunks_in_one_write(self) -> None:
        """Several BDATs and their data in one write: one reply per chunk, in order, and
        the provider gets the bytes as sent (no dot-unstuffing, binary kept)."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(
            START.replace(
                b"MAIL FROM:<a@example.com>", b"MAIL FROM:<a@example.com> BODY=BINARYMIME"
            )
            + chunked(BINARY, [5, 1, 20])
            + b"NOOP\r\n"
        )
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 250, 250, 250, 250, 250])
        self.assertIn("250 2.0.0 26 octets received", reply_lines(transport))
        (email,) = harness.provider.emails
        self.assertEqual(email.raw, BINARY)

    def test_bdat_zero_last(self) -> None:
        """C{BDAT 0 LAST} ends a message; alone it delivers an empty one."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(START + bdat(b"Subject: x\r\n\r\nhi") + b"BDAT 0 LAST\r\n")
        protocol.dataReceived(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\n")
        protocol.dataReceived(b"BDAT 0 LAST\r\n")
        self.assertEqual(reply_codes(transport)[-6:], [250, 250, 250, 250, 250, 250])
        self.assertEqual([e.raw for e in harness.provider.emails], [b"Subject: x\r\n\r\nhi", b""])

    def test_unreadable_size_closes(self) -> None:
        """A size that is not a number: 501, then the connection closes, and nothing
        after it runs as a command (it may be message content)."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(START + b"BDAT ten LAST\r\nRSET\r\nQUIT\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 501])
        self.assertIn("closing connection", reply_lines(transport)[-1])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(harness.provider.emails, [])

    def test_bad_marker_consumes_chunk_and_fails_transaction(self) -> None:
        """C{BDAT 6 LATER}: the chunk is skipped (its "RSET" bytes are not a command),
        501; the pipelined chunks behind it get 501 too, LAST ends the transaction."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(
            START + b"BDAT 6 LATER\r\nRSET\r\n" + bdat(b"abc") + bdat(b"d", last=True) + b"NOOP\r\n"
        )
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 501, 501, 501, 250])
        protocol.dataReceived(b"RCPT TO:<b@example.org>\r\n")
        self.assertEqual(reply_codes(transport)[-1], 503)  # LAST ended the transaction
        self.assertEqual(harness.provider.emails, [])

    def test_without_mail_or_recipients(self) -> None:
        """No MAIL: 503; MAIL but no recipient: 554; either way the chunk is consumed."""
        _, protocol, transport = self.session()
        protocol.dataReceived(b"EHLO c\r\n" + bdat(b"QUIT\r\n") + b"NOOP\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 503, 250])
        protocol.dataReceived(b"MAIL FROM:<a@example.com>\r\n" + bdat(b"QUIT\r\n", last=True))
        protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(reply_codes(transport)[-3:], [250, 554, 250])
        self.assertFalse(transport.disconnecting)

    def test_data_and_rcpt_after_bdat(self) -> None:
        """RFC 3030: a transaction uses DATA or BDAT; RCPT after BDAT is refused too."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(START + bdat(b"abc") + b"DATA\r\nRCPT TO:<c@example.org>\r\n")
        self.assertEqual(reply_codes(transport)[-3:], [250, 503, 503])
        protocol.dataReceived(bdat(b"def", last=True))
        self.assertEqual([e.raw for e in harness.provider.emails], [b"abcdef"])

    def test_bdat_inside_data_is_content(self) -> None:
        """After DATA's 354 a BDAT line is message text, as any other line."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(START + b"DATA\r\nSubject: s\r\n\r\nBDAT 5 LAST\r\n.\r\n")
        self.assertEqual(reply_codes(transport)[-2:], [354, 250])
        self.assertEqual(harness.provider.emails[0].raw, b"Subject: s\r\n\r\nBDAT 5 LAST\r\n")

    def test_binarymime_needs_bdat(self) -> None:
        """BODY=BINARYMIME then DATA: 503 5.5.1; not offered: BODY=BINARYMIME is 501."""
        _, protocol, transport = self.session()
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@example.com> BODY=BINARYMIME\r\n"
            b"RCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        self.assertEqual(reply_lines(transport)[-1][:9], "503 5.5.1")
        _, protocol, transport = self.session(binarymime=False)
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com> BODY=BINARYMIME\r\n")
        self.assertEqual(reply_lines(transport)[-1][:9], "501 5.5.4")

    def test_size_limit(self) -> None:
        """The chunk that takes the total past the limit: 552 5.3.4 once read; the chunks
        behind it are read and refused alike; nothing is kept or delivered."""
        harness, protocol, transport = self.session(max_message_size=100)
        budget = harness.factory.spool.budget
        protocol.dataReceived(START + bdat(b"a" * 60))
        self.assertEqual(budget.held, 60)
        protocol.dataReceived(bdat(b"b" * 60) + bdat(b"c" * 5000) + bdat(b"d", last=True))
        protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(reply_codes(transport)[-5:], [250, 552, 552, 552, 250])
        self.assertIn("5.3.4", reply_lines(transport)[-2])
        self.assertEqual(budget.held, 0)
        self.assertEqual(harness.provider.emails, [])
        # One huge announced chunk is read through, and the stream stays in step.
        protocol.dataReceived(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        protocol.dataReceived(b"BDAT 120000 LAST\r\n")
        for _ in range(100):
            protocol.dataReceived(b"RSET\r\n" * 200)  # 1,200 octets of content per read
        protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(reply_codes(transport)[-4:], [250, 250, 552, 250])

    def test_rset_discards_chunks(self) -> None:
        """RSET between chunks: what was collected is released and never delivered."""
        harness, protocol, _ = self.session()
        protocol.dataReceived(START + bdat(b"hello"))
        self.assertEqual(harness.factory.spool.budget.held, 5)
        protocol.dataReceived(b"RSET\r\n" + START[8:] + bdat(b"abc", last=True))
        self.assertEqual(harness.factory.spool.budget.held, 0)
        self.assertEqual([e.raw for e in harness.provider.emails], [b"abc"])

    def test_chunks_are_spooled(self) -> None:
        """Chunks go into the same spool as DATA: past the threshold to a file, and a
        disk that refuses them gets 452 4.3.1 (for that chunk and the ones behind it)."""

        def refuse(directory: str | None) -> Any:
            raise OSError(28, "No space left on device")

        harness, protocol, transport = self.session(spool_threshold=10)
        harness.factory.spool = Spool(10, None, harness.factory.spool.budget, open_file=refuse)
        protocol.dataReceived(START + bdat(b"x" * 50) + bdat(b"y", last=True))
        self.assertEqual(reply_codes(transport)[-2:], [452, 452])
        self.assertIn("4.3.1", reply_lines(transport)[-1])
        opened: list[str | None] = []

        def record(directory: str | None) -> Any:
            opened.append(directory)
            return open_spool_file(directory)

        harness.factory.spool = Spool(10, None, harness.factory.spool.budget, open_file=record)
        message = b"Subject: big\r\n\r\n" + b"z" * 200
        protocol.dataReceived(START[8:] + chunked(message, [7, 50]))
        self.assertEqual(len(opened), 1)
        self.assertEqual(harness.provider.emails[-1].raw, message)

    def test_idle_inside_a_chunk(self) -> None:
        """A client that stops in the middle of a chunk is cut off by the DATA timeout."""
        harness, protocol, transport = self.session(data_timeout=30.0)
        protocol.dataReceived(START + b"BDAT 100\r\nabc")
        harness.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        harness.clock.advance(2)
        self.assertEqual(reply_codes(transport)[-1], 421)

    def test_minimum_rate_across_chunks(self) -> None:
        """Many small chunks, each on time, still have to keep the DATA rate overall."""
        harness, protocol, transport = self.session(data_timeout=10.0)
        protocol.dataReceived(START)
        for _ in range(5):
            protocol.dataReceived(bdat(b"x"))
            harness.clock.advance(4)
        self.assertEqual(reply_codes(transport)[-1], 421)
        self.assertIn("too slowly", reply_lines(transport)[-1])
        self.assertTrue(transport.disconnecting)

    def test_delivery_failure_ends_the_transaction(self) -> None:
        """A provider failure after LAST is the chunk's reply; a BDAT after it is 503."""
        provider = RecordingProvider(outcomes=[TransientDeliveryError("down", "4.3.0")])
        _, protocol, transport = self.session(provider=provider)
        protocol.dataReceived(START + bdat(b"abc", last=True) + bdat(b"more"))
        self.assertEqual(reply_codes(transport)[-2:], [451, 503])

    def test_shutdown_waits_for_the_chunks(self) -> None:
        """Between chunks the session holds a message: shutdown lets it finish, then 421."""
        harness, protocol, transport = self.session()
        protocol.dataReceived(START + bdat(b"abc"))
        harness.factory.shutdown(60)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(bdat(b"def", last=True))
        self.assertEqual(reply_codes(transport)[-2:], [250, 421])
        self.assertEqual(harness.provider.emails[0].raw, b"abcdef")


class AnySplitTests(SynchronousTestCase):
    @given(
        message=st.binary(max_size=400),
        cuts=st.lists(st.integers(0, 400), max_size=6),
        reads=st.lists(st.integers(1, 600), max_size=12),
    )
    def test_any_split_is_byte_identical(
        self, message: bytes, cuts: list[int], reads: list[int]
    ) -> None:
        """However a message is cut into BDAT chunks, and however the stream is cut into
        reads, the provider receives exactly the bytes sent."""
        sizes, position = [], 0
        for cut in sorted(cuts):
            cut = min(cut, len(message))
            sizes.append(cut - position)
            position = cut
        harness = Harness(binarymime=True)
        protocol, transport = harness.connect()
        stream = START + chunked(message, sizes) + b"QUIT\r\n"
        position = 0
        for size in [*reads, len(stream)]:
            if position < len(stream):
                protocol.dataReceived(stream[position : position + size])
                position += size
        (email,) = harness.provider.emails
        self.assertEqual(email.raw, message)
        self.assertEqual(reply_codes(transport)[-1], 221)


def _raw_client(port: int, stream: bytes, replies: int) -> list[str]:
    """Send a pipelined stream at once on a plain socket; read that many replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        greeting = read_replies(sock, 1)
        sock.sendall(stream)
        return greeting + read_replies(sock, replies)


def _ehlo_lines(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\n")
        data = b""
        while b"\r\n250 " not in data:
            data += sock.recv(4096)
        return data


class WireTests(TestCase):
    """A raw-socket client speaking CHUNKING to a relay on loopback."""

    async def test_pipelined_binary_over_tcp(self) -> None:
        """EHLO offers CHUNKING; a 3 MB binary message in pipelined chunks of 64 KiB, all
        written at once, arrives byte-identical, with one 250 per chunk."""
        relay = start_relay(self, tls_enabled=False, binarymime=True)
        self.assertIn(b"250-CHUNKING", await in_thread(_ehlo_lines, relay.port))
        payload = bytes(range(256)) * (3 * 4096)
        message = b"Subject: wire\r\nContent-Transfer-Encoding: binary\r\n\r\n" + payload
        sizes = [65536] * (len(message) // 65536)
        stream = START + chunked(message, sizes) + b"QUIT\r\n"
        replies = await in_thread(_raw_client, relay.port, stream, 3 + len(sizes) + 2)
        self.assertEqual(
            [int(r[:3]) for r in replies], [220, 250, 250, 250] + [250] * len(sizes) + [250, 221]
        )
        (email,) = relay.provider.emails
        self.assertEqual(email.raw, message)

    async def test_bdat_turns_off_nagle(self) -> None:
        """From the first BDAT on, replies leave without waiting for the client's ACK of
        the one before (TCP_NODELAY), so the last chunk's reply is not held ~40 ms."""
        relay = start_relay(self, tls_enabled=False)

        def greet(port: int) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sock.sendall(b"EHLO c\r\n")
            read_replies(sock, 2)
            return sock

        def chunk(sock: socket.socket) -> list[str]:
            sock.sendall(bdat(b"x"))
            return read_replies(sock, 1)

        sock = await in_thread(greet, relay.port)
        self.addCleanup(sock.close)
        (session,) = relay.factory.sessions
        self.assertFalse(session._tcp.getTcpNoDelay())
        self.assertEqual(await in_thread(chunk, sock), ["503 5.5.1 Send MAIL first"])
        self.assertTrue(session._tcp.getTcpNoDelay())


class GraphBinaryTests(TestCase):
    """BINARYMIME through the Graph provider in MIME mode: the binary part is not altered."""

    timeout = 30

    async def test_binary_part_reaches_graph_unchanged(self) -> None:
        """A binary attachment (NUL, bare CR/LF, 8-bit) sent with BDAT reaches the fake
        Graph's sendMail byte for byte."""
        fake = FakeGraph(reactor)
        port = fake.listen(reactor)
        self.addCleanup(port.stopListening)
        mailbox = "relay@contoso.example"
        config = Config.build(
            graph_tenant_id=fake.tenant,
            graph_client_id=fake.client_id,
            graph_client_secret=fake.client_secret,
            graph_sender=(mailbox,),
            graph_authority_host=fake.endpoint,
            graph_endpoint=fake.endpoint,
        )
        provider = GraphProvider(config, reactor, tuning=Tuning(backoff_base=0.02))
        self.addCleanup(provider.close)
        self.assertTrue(provider.binary_mime)
        relay = start_relay(self, provider=cast(Any, provider), tls_enabled=False, binarymime=True)
        blob = bytes(range(256)) * 8 + b"\r\n.\r\n\n\r"
        body = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XyZ\r\n\r\n"
            b"--XyZ\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--XyZ\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=blob.bin\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n" + blob + b"\r\n--XyZ--\r\n"
        )
        message = f"From: {mailbox}\r\nTo: a@x.example\r\nSubject: binary\r\n".encode() + body
        stream = (
            b"EHLO c\r\nMAIL FROM:<app@example.org> BODY=BINARYMIME\r\n"
            b"RCPT TO:<a@x.example>\r\n" + chunked(message, [100]) + b"QUIT\r\n"
        )
        replies = await in_thread(_raw_client, relay.port, stream, 6)
        self.assertEqual([int(r[:3]) for r in replies], [220, 250, 250, 250, 250, 250, 221])
        (delivery,) = fake.deliveries
        self.assertEqual(delivery.method, "mime")
        assert delivery.mime is not None
        self.assertIn(blob, delivery.mime)
        self.assertEqual(delivery.attachments, [("blob.bin", blob)])
