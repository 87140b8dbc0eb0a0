"""Message bodies in memory or spooled to disk, and the shared memory budget.

The body and the budget are tested directly, with injected files (a real
anonymous temp file, or one that fails like a full disk); the protocol tests
drive a session over a StringTransport with a Clock, so every path that must
release a spooled body (delivered, refused, oversize, abandoned, timed out,
cut off at shutdown) is checked without sockets.
"""

from __future__ import annotations

import errno
import io
import os
from typing import IO

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import config, tap
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.smtp.protocol import session_settings
from smtpproxy.spool import InflightBudget, MessageBody, open_spool_file
from tests.smtp.test_protocol_edges import SHORT_ENVELOPE, Harness, reply_codes, reply_lines
from tests.support import message, open_files_under


class FileLog:
    """An C{open_file} that hands out real anonymous files and remembers them."""

    def __init__(self) -> None:
        self.files: list[IO[bytes]] = []

    def __call__(self, directory: str | None) -> IO[bytes]:
        spool = open_spool_file(directory)
        self.files.append(spool)
        return spool

    @property
    def open(self) -> int:
        return sum(1 for f in self.files if not f.closed)


class FullDisk(io.BytesIO):
    """A file that takes C{room} bytes and then fails like a full disk."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def no_files(directory: str | None) -> IO[bytes]:
    raise AssertionError("a small body must not touch the file system")


class MessageBodyTests(SynchronousTestCase):
    def test_small_body_stays_in_memory(self) -> None:
        """Below the threshold nothing is opened; read returns the chunks joined."""
        budget = InflightBudget(1000)
        body = MessageBody(100, budget, None, no_files)
        body.write(b"abc")
        body.write(b"def")
        self.assertFalse(body.spooled)
        self.assertEqual((body.read(), body.size, budget.held), (b"abcdef", 6, 6))
        body.close()
        self.assertEqual(budget.held, 0)

    def test_chunks_are_bounded_and_leave_the_body_stored(self) -> None:
        """chunks() gives the bytes back in pieces no larger than asked, in memory and
        spooled alike, and the body can still be read (or copied again) afterwards."""
        for threshold in (1000, 4):
            body = MessageBody(threshold, InflightBudget(1000), None, FileLog())
            body.write(b"0123456")
            body.write(b"789ab")
            body.finish()
            pieces = list(body.chunks(5))
            self.assertEqual(b"".join(pieces), b"0123456789ab", threshold)
            self.assertLessEqual(max(map(len, pieces)), 5)
            self.assertEqual(b"".join(body.chunks(100)), b"0123456789ab")
            self.assertEqual(body.read(), b"0123456789ab")
            body.close()

    def test_large_body_spills_and_reads_back(self) -> None:
        """Past the threshold the body moves to one file; memory is given back; bytes intact."""
        files = FileLog()
        budget = InflightBudget(1000)
        body = MessageBody(10, budget, None, files)
        body.write(b"0123456")
        self.assertEqual(budget.held, 7)
        body.write(b"789abc")
        body.write(b"def")
        self.assertTrue(body.spooled)
        self.assertEqual((len(files.files), files.open, budget.held), (1, 1, 0))
        body.finish()
        self.assertIsNone(body.claim())
        self.assertEqual(budget.held, 16)
        self.assertEqual(body.read(), b"0123456789abcdef")
        self.assertEqual(files.open, 0, "the file is closed as soon as it was read back")
        body.close()
        self.assertEqual(budget.held, 0)

    def test_budget_exhausted_spills_at_once(self) -> None:
        """A body under the threshold still goes to disk when the process holds too much."""
        files = FileLog()
        budget = InflightBudget(10)
        first = MessageBody(100, budget, None, files)
        first.write(b"x" * 8)
        second = MessageBody(100, budget, None, files)
        second.write(b"y" * 5)
        self.assertEqual((first.spooled, second.spooled, budget.held), (False, True, 8))
        first.close()
        second.close()
        self.assertEqual((budget.held, files.open), (0, 0))

    def test_write_error_is_kept_and_counting_goes_on(self) -> None:
        """ENOSPC while spooling: the error is kept, the file closed, later writes only counted."""
        disk = FullDisk(room=12)
        budget = InflightBudget(1000)
        body = MessageBody(4, budget, None, lambda directory: disk)
        for _ in range(5):
            body.write(b"abcde")
        self.assertIsInstance(body.error, OSError)
        assert body.error is not None
        self.assertEqual(body.error.errno, errno.ENOSPC)
        self.assertTrue(disk.closed)
        self.assertEqual((body.size, body.stored, budget.held), (25, 0, 0))

    def test_open_error_is_kept(self) -> None:
        """A spool directory that cannot take files is an error of this body, not a crash."""

        def refuse(directory: str | None) -> IO[bytes]:
            raise PermissionError(errno.EACCES, "Permission denied")

        body = MessageBody(2, None, None, refuse)
        body.write(b"abc")
        body.write(b"def")
        self.assertIsInstance(body.error, PermissionError)
        self.assertEqual(body.size, 6)

    def test_flush_error_shows_at_finish(self) -> None:
        """Buffered bytes that cannot be written make finish() record the error."""

        class FailingFlush(io.BytesIO):
            def flush(self) -> None:
                raise OSError(errno.EIO, "I/O error")

        body = MessageBody(1, None, None, lambda directory: FailingFlush())
        body.write(b"abc")
        self.assertIsNone(body.error)
        body.finish()
        self.assertIsInstance(body.error, OSError)

    def test_discard_frees_the_file(self) -> None:
        """An oversize message gives its file back at once; later writes are only counted."""
        files = FileLog()
        body = MessageBody(2, None, None, files)
        body.write(b"abcdef")
        body.discard()
        body.write(b"more")
        self.assertEqual((files.open, len(files.files), body.stored, body.size), (0, 1, 0, 10))

    def test_real_spool_file_is_unlinked(self) -> None:
        """The spool file never has a name in the spool directory; /proc shows it deleted."""
        directory = self.mktemp()
        os.makedirs(directory)
        body = MessageBody(1, None, directory)
        body.write(b"secret body")
        self.assertTrue(body.spooled)
        self.assertEqual(os.listdir(directory), [])
        mine = open_files_under(directory)
        self.assertEqual(len(mine), 1)
        self.assertTrue(mine[0].endswith("(deleted)"), mine)
        body.close()
        self.assertEqual(open_files_under(directory), [])


class InflightBudgetTests(SynchronousTestCase):
    def test_reserve_never_waits(self) -> None:
        """reserve() answers at once: yes while it fits, no past the limit."""
        budget = InflightBudget(10)
        self.assertTrue(budget.reserve(6))
        self.assertFalse(budget.reserve(5))
        self.assertTrue(budget.reserve(4))
        self.assertEqual(budget.held, 10)

    def test_acquire_waits_in_order_and_blocks_reserve(self) -> None:
        """Waiters are served first come first served; while one waits, reserve() says no."""
        budget = InflightBudget(10)
        self.assertIsNone(budget.acquire(8))
        first, second = budget.acquire(5), budget.acquire(2)
        assert first is not None and second is not None
        self.assertFalse(budget.reserve(1))
        budget.release(8)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual((budget.held, budget.waiting), (7, 0))

    def test_larger_than_limit_goes_when_empty(self) -> None:
        """A body larger than the whole budget is let through once nothing else is held."""
        budget = InflightBudget(10)
        self.assertIsNone(budget.acquire(50))
        budget.release(50)
        self.assertTrue(budget.reserve(3))
        waiting = budget.acquire(50)
        assert waiting is not None
        self.assertNoResult(waiting)
        budget.release(3)
        self.successResultOf(waiting)

    def test_chained_releases_do_not_recurse(self) -> None:
        """A thousand waiters that each release when granted are served without deep recursion."""
        budget = InflightBudget(10)
        self.assertIsNone(budget.acquire(10))
        served: list[int] = []
        for i in range(1000):
            waiting = budget.acquire(10)
            assert waiting is not None

            def deliver(_: None, i: int = i) -> None:
                served.append(i)
                budget.release(10)

            waiting.addCallback(deliver)
        budget.release(10)
        self.assertEqual(served, list(range(1000)))
        self.assertEqual(budget.held, 0)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """Closing a body whose read-back still waits removes it from the queue."""
        budget = InflightBudget(10)
        holder = MessageBody(100, budget, None, no_files)
        holder.write(b"x" * 10)
        files = FileLog()
        big = MessageBody(1, budget, None, files)
        big.write(b"y" * 5)
        waiting = big.claim()
        assert waiting is not None
        self.assertEqual(budget.waiting, 1)
        big.close()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual((budget.waiting, files.open), (0, 0))
        holder.close()
        self.assertEqual(budget.held, 0)


class SpooledSessionTests(SynchronousTestCase):
    """A session over a StringTransport whose spooled bodies are real anonymous files."""

    def setUp(self) -> None:
        self.harness = Harness(
            max_message_size=200_000, spool_threshold=1000, max_inflight_bytes=100_000
        )
        self.clock, self.provider, self.factory = (
            self.harness.clock,
            self.harness.provider,
            self.harness.factory,
        )
        self.files = FileLog()
        self.factory.spool.open_file = self.files
        self.connect = self.harness.connect

    def big(self, size: int = 50_000) -> bytes:
        return message(body=("z" * 98 + "\r\n") * (size // 100))

    def test_spooled_message_delivered_and_released(self) -> None:
        """A body over the threshold goes through one file, arrives intact, and is released."""
        protocol, transport = self.connect()
        text = self.big()
        protocol.dataReceived(SHORT_ENVELOPE + text[:20_000])
        protocol.dataReceived(text[20_000:] + b".\r\n")
        self.assertEqual(reply_codes(transport), [220, 250, 250, 250, 354, 250])
        self.assertEqual(self.provider.emails[0].raw, text)
        self.assertEqual((len(self.files.files), self.files.open), (1, 0))
        self.assertEqual(self.factory.spool.budget.held, 0)

    def test_small_message_never_touches_the_disk(self) -> None:
        """A body under the threshold is delivered without a file being opened."""
        protocol, transport = self.connect()
        protocol.dataReceived(SHORT_ENVELOPE + message() + b".\r\n")
        self.assertEqual(reply_codes(transport)[-1], 250)
        self.assertEqual(self.files.files, [])
        self.assertEqual(self.factory.spool.budget.held, 0)

    def test_refused_message_releases_its_file(self) -> None:
        """A provider that refuses: the client hears 5xx and the file is closed."""
        self.provider.outcomes.append(PermanentDeliveryError("no", "5.7.1", 550))
        protocol, transport = self.connect()
        protocol.dataReceived(SHORT_ENVELOPE + self.big() + b".\r\n")
        self.assertEqual(reply_codes(transport)[-1], 550)
        self.assertEqual((len(self.files.files), self.files.open), (1, 0))
        self.assertEqual(self.factory.spool.budget.held, 0)

    def test_oversize_message_releases_its_file_at_once(self) -> None:
        """Past the size limit the file is closed while the rest is still arriving."""
        protocol, transport = self.connect()
        protocol.dataReceived(SHORT_ENVELOPE + self.big(150_000))
        self.assertEqual(self.files.open, 1)
        protocol.dataReceived(self.big(100_000))
        self.assertEqual(self.files.open, 0)
        protocol.dataReceived(b".\r\nNOOP\r\n")
        self.assertEqual(reply_codes(transport)[-2:], [552, 250])

    def test_abandoned_paths_release_the_file(self) -> None:
        """Connection lost, DATA timeout and forced shutdown mid-DATA each close the file."""
        lost, _ = self.connect()
        lost.dataReceived(SHORT_ENVELOPE + self.big())
        timed_out, timed_transport = self.connect()
        timed_out.dataReceived(SHORT_ENVELOPE + self.big())
        stuck, stuck_transport = self.connect()
        stuck.dataReceived(SHORT_ENVELOPE + self.big())
        self.assertEqual(self.files.open, 3)

        lost.connectionLost(None)
        self.assertEqual(self.files.open, 2)

        self.clock.advance(601)  # past the DATA timeout: 421 and close
        self.assertTrue(timed_transport.disconnecting)
        timed_out.connectionLost(None)

        self.factory.shutdown(timeout=5)
        self.clock.advance(6)  # the shutdown timeout forces the stuck one closed
        self.assertTrue(stuck_transport.disconnecting)
        stuck.connectionLost(None)
        self.assertEqual(self.files.open, 0)
        self.assertEqual(self.factory.spool.budget.held, 0)

    def test_disk_full_452_then_session_usable(self) -> None:
        """ENOSPC mid-DATA: the body is read to its dot, 452 4.3.1, and the next message goes."""
        self.factory.spool.open_file = lambda directory: FullDisk(room=10_000)
        protocol, transport = self.connect()
        protocol.dataReceived(SHORT_ENVELOPE + self.big())
        protocol.dataReceived(self.big() + b".\r\n")
        self.assertEqual(reply_lines(transport)[-1][:9], "452 4.3.1")
        self.assertEqual(self.provider.emails, [])
        protocol.dataReceived(SHORT_ENVELOPE[8:] + message() + b".\r\n")
        self.assertEqual(reply_codes(transport)[-4:], [250, 250, 354, 250])
        self.assertEqual(len(self.provider.emails), 1)
        self.assertEqual(self.factory.spool.budget.held, 0)


class StartupCheckTests(SynchronousTestCase):
    def options(self, spool_dir: str) -> tap.Options:
        options = tap.Options(
            environ={"SMTP_HOSTNAME": "relay.test", "HTTP_LISTEN": "", "SMTP_SPOOL_DIR": spool_dir}
        )
        options.parseOptions([])
        return options

    def test_unusable_spool_dir_stops_startup(self) -> None:
        """A spool directory that cannot take files stops the relay with one line naming it."""
        missing = os.path.abspath(self.mktemp())
        with self.assertRaises(SystemExit) as caught:
            self.options(missing)
        self.assertEqual(
            str(caught.exception),
            f"smtpproxy: SMTP_SPOOL_DIR: cannot create files in {missing}: "
            "no such file or directory",
        )

    def test_spool_settings_reach_the_factory(self) -> None:
        """The three settings end up in the listener's spool and its shared budget."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        settings = session_settings(
            config.load(
                {
                    "SMTP_SPOOL_DIR": directory,
                    "SMTP_SPOOL_THRESHOLD": "4096",
                    "SMTP_MAX_INFLIGHT_BYTES": "65536",
                },
                fqdn=lambda: "relay.test",
            )
        )
        self.options(directory)  # the directory passes the startup check
        spool = Harness(
            spool_threshold=settings.spool_threshold,
            spool_dir=settings.spool_dir,
            max_inflight_bytes=settings.max_inflight_bytes,
        ).factory.spool
        self.assertEqual(
            (spool.threshold, spool.directory, spool.budget.limit), (4096, directory, 65536)
        )
