"""Tests for L{smtpproxy.logsummary}: repeats counted per client and interval, in bounded space."""

from __future__ import annotations

from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.logsummary import LogSummary, RepeatCounter


class RepeatCounterTests(SynchronousTestCase):
    def test_first_logged_then_counted(self) -> None:
        """The first event per (event, client) is to be logged; repeats are counted."""
        counter = RepeatCounter()
        self.assertTrue(counter.record("refused", "a"))
        self.assertFalse(counter.record("refused", "a"))
        self.assertTrue(counter.record("refused", "b"))
        self.assertTrue(counter.record("other", "a"))
        self.assertFalse(counter.record("refused", "a"))
        self.assertEqual(sorted(counter.end_interval()), [("refused", "a", 2)])

    def test_continuing_client_stays_quiet_one_forgotten(self) -> None:
        """A client still repeating stays counted; after a quiet interval it is forgotten."""
        counter = RepeatCounter()
        counter.record("e", "a")
        counter.record("e", "a")
        counter.end_interval()
        self.assertFalse(counter.record("e", "a"))  # still in the table: counted
        self.assertEqual(counter.end_interval(), [("e", "a", 1)])
        self.assertEqual(counter.end_interval(), [])
        self.assertEqual(len(counter), 0)
        self.assertFalse(counter)
        self.assertTrue(counter.record("e", "a"))

    def test_bounded_table(self) -> None:
        """Past max_keys, new clients are counted together per event."""
        counter = RepeatCounter(max_keys=2)
        self.assertEqual([counter.record("e", c) for c in "abcd"], [True, True, False, False])
        counter.record("f", "z")
        self.assertEqual(len(counter), 2)
        self.assertEqual(sorted(counter.end_interval(), key=str), [("e", None, 2), ("f", None, 1)])
        self.assertTrue(counter.record("e", "c"))  # room again: a and b were quiet

    def test_max_keys_checked(self) -> None:
        """A table that can hold nothing is a configuration mistake."""
        self.assertRaises(ValueError, RepeatCounter, 0)


class LogSummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        log = Logger(namespace="test", observer=cast(ILogObserver, self.events.append))
        self.summary = LogSummary(log, self.clock, interval=60, max_keys=10)

    def lines(self) -> list[tuple[str, dict[str, object]]]:
        skip = ("log_", "session")
        return [
            (e["log_format"], {k: v for k, v in e.items() if not k.startswith(skip)})
            for e in self.events
        ]

    def test_first_now_rest_summarised(self) -> None:
        """One line at once with its fields, one summary with the count when the interval ends."""
        for n in range(5):
            self.summary.emit(LogLevel.info, "connection refused", "192.0.2.1", session=n)
        self.assertEqual(self.lines(), [("connection refused", {"client": "192.0.2.1"})])
        self.assertEqual(self.events[0]["session"], 0)
        self.clock.advance(60)
        self.assertEqual(
            self.lines()[1],
            ("connection refused (repeated)", {"client": "192.0.2.1", "count": 4, "seconds": 60}),
        )
        self.assertIs(self.events[1]["log_level"], LogLevel.info)

    def test_timer_only_while_counting(self) -> None:
        """No timer while nothing is tracked; it stops once every client was quiet."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.summary.emit(LogLevel.warn, "e", "a")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(60)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.events), 1)

    def test_overflow_line(self) -> None:
        """Clients beyond the table's size are reported together in one line."""
        for n in range(25):
            self.summary.emit(LogLevel.info, "e", f"c{n}")
        self.assertEqual(len(self.events), 10)
        self.clock.advance(60)
        expected = ("e (repeated, other clients)", {"count": 15, "seconds": 60})
        self.assertEqual(self.lines()[-1], expected)

    def test_stop_flushes(self) -> None:
        """Stopping writes what was counted and leaves no timer behind."""
        self.summary.emit(LogLevel.info, "e", "a")
        self.clock.advance(12.5)
        self.summary.emit(LogLevel.info, "e", "a")
        self.summary.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The line says how long the counting really ran, not the full interval.
        self.assertEqual(self.lines()[-1][1], {"client": "a", "count": 1, "seconds": 12.5})
