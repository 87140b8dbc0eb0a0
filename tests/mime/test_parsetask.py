"""The parse scheduler: what runs at once, what waits for the cooperator."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import Email
from smtpproxy.mime.parsetask import SYNC_BYTES, MessageParser

LINE = b"y" * 998 + b"\r\n"


def plain(size: int) -> bytes:
    return b"Subject: s\r\n\r\n" + LINE * (size // len(LINE) + 1)


class SchedulingTests(SynchronousTestCase):
    def test_everyday_message_parsed_at_once(self) -> None:
        """A small message is parsed in the caller's turn: no Deferred, no reactor turn."""
        parser = MessageParser(Clock())
        result = parser.parse("a@example.com", ["b@example.com"], plain(10_000))
        self.assertIsInstance(result, Email)

    def test_large_body_waits_for_the_cooperator(self) -> None:
        """A body over SYNC_BYTES is not decoded in the turn its final dot arrived in.

        Twenty large messages ending in one reactor turn once decoded their
        bodies back to back there (0.7 s without a greeting for anyone);
        now each decode is a cooperator step of its own turn.
        """
        clock = Clock()
        parser = MessageParser(clock)
        results = [
            parser.parse("a@example.com", ["b@example.com"], plain(SYNC_BYTES * 2))
            for _ in range(3)
        ]
        for result in results:
            assert isinstance(result, Deferred)
            self.assertNoResult(result)
        for _ in range(20):
            clock.advance(0)
        for result in results:
            assert isinstance(result, Deferred)
            email = self.successResultOf(result)
            self.assertFalse(email.abandoned)
            assert email.text is not None
            self.assertEqual(len(email.text), len(LINE) * (SYNC_BYTES * 2 // len(LINE) + 1))

    def test_large_bodies_read_back_one_at_a_time(self) -> None:
        """The second large body is not read into memory before the first is parsed.

        Twenty 24 MB deliveries side by side once held every body at once
        while the cooperator shared its turns; one at a time, memory holds
        one body and its parse.
        """
        clock = Clock()
        parser = MessageParser(clock)
        body = plain(SYNC_BYTES * 2)
        reads: list[int] = []

        def reader(n: int) -> Callable[[], bytes]:
            def read() -> bytes:
                reads.append(n)
                return body

            return read

        first = parser.parse_body("a@example.com", ["b@example.com"], len(body), reader(1))
        second = parser.parse_body("a@example.com", ["b@example.com"], len(body), reader(2))
        self.assertEqual(reads, [1])
        assert isinstance(first, Deferred) and isinstance(second, Deferred)
        for _ in range(20):
            clock.advance(0)
        self.assertEqual(reads, [1, 2])
        self.assertFalse(self.successResultOf(first).abandoned)
        self.assertFalse(self.successResultOf(second).abandoned)

    def test_failed_read_back_lets_the_next_through(self) -> None:
        """A body that cannot be read back fails its own delivery only."""
        clock = Clock()
        parser = MessageParser(clock)

        def broken() -> bytes:
            raise OSError(5, "Input/output error")

        failed = parser.parse_body("a@example.com", ["b@example.com"], SYNC_BYTES + 1, broken)
        assert isinstance(failed, Deferred)
        self.failureResultOf(failed, OSError)
        after = parser.parse_body("a@example.com", ["b@example.com"], 10, lambda: plain(10))
        self.assertIsInstance(after, Email)
        later = parser.parse_body(
            "a@example.com", ["b@example.com"], SYNC_BYTES + 1, lambda: plain(SYNC_BYTES + 1)
        )
        assert isinstance(later, Deferred)
        for _ in range(20):
            clock.advance(0)
        self.assertFalse(self.successResultOf(later).abandoned)
