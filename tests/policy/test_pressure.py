"""Tests for L{smtpproxy.policy.pressure}: the idle limits under stress, and the listen backlog."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.policy.pressure import IdleLimits, idle_limits, stressed, with_backlog


class IdleLimitsTests(SynchronousTestCase):
    """L{idle_limits} and L{stressed} are the documented rule, as plain values."""

    def test_normal(self) -> None:
        """Unstressed: the configured limits; the greeting limit never exceeds the command one."""
        self.assertEqual(idle_limits(30, 300, False), IdleLimits(30, 300))
        self.assertEqual(idle_limits(30, 2, False), IdleLimits(2, 2))

    def test_stressed(self) -> None:
        """Stressed: at most 5 s before the first command and 10 s between commands."""
        self.assertEqual(idle_limits(30, 300, True), IdleLimits(5, 10))
        self.assertEqual(idle_limits(1, 3, True), IdleLimits(1, 3))

    def test_hysteresis(self) -> None:
        """Stress starts at 80% of the cap and ends below 70%; no cap, no stress."""
        self.assertFalse(stressed(79, 100, False))
        self.assertTrue(stressed(80, 100, False))
        self.assertTrue(stressed(70, 100, True))
        self.assertFalse(stressed(69, 100, True))
        self.assertFalse(stressed(10_000, 0, False))
        self.assertFalse(stressed(10_000, 0, True))


class BacklogTests(SynchronousTestCase):
    """L{with_backlog} adds a backlog unless the operator set one."""

    def test_added(self) -> None:
        """Endpoint types that take a backlog get 1024."""
        self.assertEqual(with_backlog("tcp:2525"), "tcp:2525:backlog=1024")
        self.assertEqual(
            with_backlog("tcp:2525:interface=127.0.0.1"),
            "tcp:2525:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(
            with_backlog(r"tcp6:2525:interface=\:\:1"), r"tcp6:2525:interface=\:\:1:backlog=1024"
        )
        self.assertEqual(with_backlog("unix:/run/s.sock"), "unix:/run/s.sock:backlog=1024")

    def test_kept(self) -> None:
        """An explicit backlog stays; systemd and unknown types pass through."""
        self.assertEqual(with_backlog("tcp:2525:backlog=10"), "tcp:2525:backlog=10")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
        # An escaped colon belongs to the path, not a parameter.
        escaped = r"unix:/tmp/a\:backlog=1"
        self.assertEqual(with_backlog(escaped), escaped + ":backlog=1024")
