"""Memory across sessions is bounded: large bodies are spooled to disk (issue 9, L1).

Before, every session inside DATA held its body in memory until the final
dot: 20 sessions each holding 24 MB of unfinished DATA took the relay to
551 MB.  These tests run the relay for real (a twistd process, or the
in-process relay on loopback sockets) and look at what the process holds:
its RSS in /proc/PID/status, its open files in /proc/PID/fd, and a real
one-megabyte tmpfs as the full disk.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from bench.memory import unread_bytes
from bench.run import memory_kb
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from smtpproxy.spool import open_spool_file
from tests.smtp.test_protocol_edges import SHORT_ENVELOPE, Harness, reply_codes
from tests.support import (
    ENVELOPE,
    TIMEOUT,
    RecordingProvider,
    async_test,
    codes,
    in_thread,
    message,
    open_files_under,
    read_replies,
    sendmail,
    start_relay,
    wait_until,
)
from tests.test_twistd import Relay

MB = 1024 * 1024


def text_lines(size: int) -> bytes:
    """C{size} bytes of 80-byte lines: body content with no end marker in it."""
    line = b"The quick brown fox jumps over the lazy dog; spooled, never held in memory....\r\n"
    assert len(line) == 80
    return line * (size // 80)


def data_sessions(port: int, count: int, stack: ExitStack) -> Iterator[socket.socket]:
    """Open C{count} sessions and take each to the 354 of DATA."""
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=60))
        sock.sendall(ENVELOPE)
        replies = read_replies(sock, 5)
        assert codes(replies) == [220, 250, 250, 250, 354], replies
        yield sock


class MemoryBoundTests(TestCase):
    SESSIONS = 20
    BODY = 24 * MB

    @async_test
    async def test_SEC_040_unfinished_bodies_do_not_grow_memory(self) -> None:
        """20 sessions each holding 24 MB of unfinished DATA: the relay's RSS grows <= 64 MB.

        The real twistd process, default settings apart from the spool
        directory.  Before spooling it grew by about 500 MB.  The bodies are
        all on disk (the spooled files add up to what was sent), and closing
        the connections frees every spooled file.
        """
        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool)
        relay = Relay(self, SMTP_SPOOL_DIR=spool, LOG_LEVEL="warn")
        pid = relay.process.pid
        chunk = text_lines(MB)

        def scenario() -> dict[str, int]:
            relay.wait_listening()
            # One complete message first, so imports and caches are warm.
            with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30) as sock:
                sock.sendall(ENVELOPE + message() + b".\r\nQUIT\r\n")
                assert codes(read_replies(sock, 7))[-2:] == [250, 221]
            before = memory_kb(pid, "VmRSS")
            # Start the peak from here (Linux: "5" resets VmHWM to VmRSS).
            with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            with ExitStack() as stack:
                socks = list(data_sessions(relay.smtp_port, self.SESSIONS, stack))

                def send(sock: socket.socket) -> None:
                    sock.sendall(b"Subject: big\r\n\r\n")
                    for _ in range(self.BODY // MB):
                        sock.sendall(chunk)

                with concurrent.futures.ThreadPoolExecutor(self.SESSIONS) as pool:
                    list(pool.map(send, socks))
                # sendall returns once the kernel holds the bytes; wait until
                # the relay has read every one of them.
                wait_until(lambda: unread_bytes(relay.smtp_port) == 0, "the relay to read")
                time.sleep(0.5)
                figures = {
                    "before": before,
                    "during": memory_kb(pid, "VmRSS"),
                    "peak": memory_kb(pid, "VmHWM"),
                    "named": len(os.listdir(spool)),
                    "spooled": sum(
                        os.stat(f"/proc/{pid}/fd/{fd}").st_size
                        for fd in os.listdir(f"/proc/{pid}/fd")
                        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(spool + os.sep)
                    ),
                }
            wait_until(lambda: not open_files_under(spool, pid), "the spool files to close")
            return figures

        figures = await in_thread(scenario)
        growth_mb = (figures["peak"] - figures["before"]) / 1024
        self.assertLessEqual(growth_mb, 64, figures)
        self.assertEqual(figures["named"], 0, "spool files must have no name")
        self.assertGreaterEqual(figures["spooled"], self.SESSIONS * (self.BODY - MB), figures)


class SpoolFileTests(TestCase):
    """Spooled bodies on the in-process relay, over real loopback sockets."""

    def spool_dir(self) -> str:
        directory = os.path.abspath(str(self.mktemp()))
        os.makedirs(directory)
        return directory

    @async_test
    async def test_SEC_041_spool_files_unlinked_and_always_released(self) -> None:
        """A spooled body has no name in SMTP_SPOOL_DIR, and its file is closed when the
        message is delivered, refused as oversize, or abandoned by a lost connection."""
        spool = self.spool_dir()
        relay = start_relay(
            self, spool_threshold=64 * 1024, spool_dir=spool, max_message_size=4 * MB
        )
        body = text_lines(2 * MB)

        def scenario() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with ExitStack() as stack:
                [sock] = data_sessions(relay.port, 1, stack)
                sock.sendall(b"Subject: big\r\n\r\n" + body)
                wait_until(lambda: bool(open_files_under(spool)), "a spool file")
                seen["while receiving"] = (os.listdir(spool), open_files_under(spool))
                sock.sendall(b".\r\n")
                seen["delivered"] = codes(read_replies(sock, 1))
                seen["after delivery"] = open_files_under(spool)
                sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
                read_replies(sock, 3)
                sock.sendall(body * 3)
                wait_until(lambda: not open_files_under(spool), "the oversize body's file to go")
                sock.sendall(b".\r\n")
                seen["oversize"] = codes(read_replies(sock, 1))
            with ExitStack() as stack:
                [sock] = data_sessions(relay.port, 1, stack)
                sock.sendall(body)
                wait_until(lambda: bool(open_files_under(spool)), "a spool file")
            # The client went away mid-DATA.
            wait_until(lambda: not open_files_under(spool), "the abandoned body's file to go")
            seen["held"] = relay.factory.spool.budget.held
            return seen

        seen = await in_thread(scenario)
        names, files = seen["while receiving"]
        self.assertEqual(names, [])
        self.assertEqual(len(files), 1)
        self.assertTrue(files[0].endswith("(deleted)"), files)
        self.assertEqual(seen["delivered"], [250])
        self.assertEqual(seen["after delivery"], [])
        self.assertEqual(seen["oversize"], [552])
        self.assertEqual(seen["held"], 0)
        self.assertEqual(len(relay.provider.emails), 1)

    @async_test
    async def test_SEC_042_disk_full_is_452_and_session_goes_on(self) -> None:
        """A full spool disk (a real 1 MB tmpfs): the body is read to its final dot, the
        client gets 452 4.3.1, nothing is delivered, and the session then sends normally."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("mounting a 1 MB tmpfs as the full disk needs root and mount(8)")
        spool = self.spool_dir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", spool],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", spool], check=False)
        relay = start_relay(self, spool_threshold=64 * 1024, spool_dir=spool)
        too_big = message("too big", text_lines(3 * MB).decode())
        fits = message("fits", text_lines(512 * 1024).decode())

        def scenario() -> list[str]:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
                replies = read_replies(sock, 1)
                sock.sendall(ENVELOPE)
                replies += read_replies(sock, 4)
                sock.sendall(too_big + b".\r\n")
                replies += read_replies(sock, 1)
                for text in (message(), fits):
                    sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
                    sock.sendall(b"DATA\r\n")
                    replies += read_replies(sock, 3)
                    sock.sendall(text + b".\r\n")
                    replies += read_replies(sock, 1)
                sock.sendall(b"QUIT\r\n")
                replies += read_replies(sock, 1)
            return replies

        replies = await in_thread(scenario)
        self.assertEqual(
            codes(replies),
            [220, 250, 250, 250, 354, 452, 250, 250, 354, 250, 250, 250, 354, 250, 221],
        )
        self.assertTrue(replies[5].startswith("452 4.3.1"), replies[5])
        self.assertEqual([e.raw for e in relay.provider.emails], [message(), fits])
        usage = os.statvfs(spool)
        self.assertEqual(usage.f_bfree, usage.f_blocks, "the tmpfs is empty again")

    @async_test
    async def test_SEC_043_spooled_message_delivered_byte_identical(self) -> None:
        """A 5 MB message that went through the spool file reaches the provider byte for
        byte, dot-stuffed lines and 8-bit bytes included."""
        spool = self.spool_dir()
        relay = start_relay(self, spool_threshold=64 * 1024, spool_dir=spool)
        opened: list[str | None] = []

        def counting(directory: str | None) -> Any:
            opened.append(directory)
            return open_spool_file(directory)

        relay.factory.spool.open_file = counting
        lines = [b".leading dot", b"..two dots", b"caf\xc3\xa9 8-bit", b".", b"x" * 998]
        body = b"\r\n".join(lines[i % len(lines)] for i in range(30_000)) + b"\r\n"
        text = b"Subject: spooled\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
        self.assertGreater(len(text), 5 * MB)

        await in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], text)
        self.assertEqual(opened, [spool])
        [email] = relay.provider.emails
        self.assertEqual(email.raw, text)
        self.assertEqual(open_files_under(spool), [])


def settle(clock: Clock) -> None:
    """Run the calls due now on C{clock} until none is left (at most 10,000 turns).

    The parser measures its slices in real CPU time and hands what is left of
    a parse to a later reactor turn (C{callLater(0)}) once a slice is used
    up; on a loaded machine that happens even to a small message, so a test
    on a Clock must run those turns to see what a quiet machine does at once.
    """
    for _ in range(10_000):
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
        clock.advance(0)


class InflightBudgetTests(SynchronousTestCase):
    """SMTP_MAX_INFLIGHT_BYTES over all sessions, driven on a Clock."""

    def test_SEC_044_budget_spills_new_data_and_queues_read_backs(self) -> None:
        """Past the in-memory budget new DATA goes to disk at once, however small, and
        spooled bodies are read back for delivery one budget's worth at a time."""
        slow: defer.Deferred[None] = defer.Deferred()
        harness = Harness(
            provider=RecordingProvider(outcomes=[slow]),
            spool_threshold=40_000,
            max_inflight_bytes=100_000,
        )
        budget = harness.factory.spool.budget
        body = message(body=text_lines(30_000).decode())
        sessions = [harness.connect() for _ in range(5)]
        for protocol, _ in sessions:
            protocol.dataReceived(SHORT_ENVELOPE + body)
        spooled = [
            protocol.session.tx.body.spooled for protocol, _ in sessions if protocol.session.tx.body
        ]
        # Three bodies of 30 KB fit in 100 KB; the fourth and fifth spill.
        self.assertEqual(spooled, [False, False, False, True, True])
        self.assertLessEqual(budget.held, 100_000)
        big = message(body=text_lines(60_000).decode())
        # Finish every message; the first delivery is held by the provider.
        for protocol, _ in sessions:
            protocol.dataReceived(big + b".\r\n")
        settle(harness.clock)
        self.assertEqual(len(harness.provider.emails), 1)
        self.assertGreater(budget.waiting, 0)
        self.assertLessEqual(budget.held, 100_000)
        slow.callback(None)
        settle(harness.clock)
        self.assertEqual(len(harness.provider.emails), 5)
        self.assertEqual([reply_codes(t)[-1] for _, t in sessions], [250] * 5)
        self.assertEqual((budget.held, budget.waiting), (0, 0))
