"""The Host rules of the browser-facing parts (smtpproxy.web.hosts), without sockets."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import config
from smtpproxy.web.hosts import RefusalLog, host_allowed, parse_allowed_hosts, split_host

LISTED = ("mail.dev.test",)


class HostAllowedTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """IP literals (IPv6 only in brackets), localhost and names under .localhost, and
        the listed names in any case and with a trailing dot, each with or without a port;
        and a request without Host at all."""
        for value in (
            b"127.0.0.1",
            b"127.0.0.1:8025",
            b"192.168.1.20:80",
            b"[::1]",
            b"[::1]:8025",
            b"[fe80::1]:8025",
            b"localhost",
            b"LOCALHOST:8025",
            b"mailbox.localhost:8025",
            b"mail.dev.test",
            b"Mail.Dev.Test.:8025",
            b" 127.0.0.1:8025 ",
        ):
            self.assertTrue(host_allowed([value], LISTED), value)
        self.assertTrue(host_allowed(None, LISTED))
        self.assertTrue(host_allowed([], LISTED))

    def test_refused(self) -> None:
        """Any other name (a rebound one, a name that merely ends like a listed one or like
        localhost), an unbracketed IPv6 address, a bad port, an empty value, non-ASCII,
        an overlong value, and two Host headers even if one is fine."""
        for value in (
            b"evil.example",
            b"evil.example:8025",
            b"xmail.dev.test",
            b"mail.dev.test.evil.example",
            b"localhost.evil.example",
            b"evillocalhost",
            b"::1",
            b"127.0.0.1:http",
            b"[::1]x",
            b"[::1",
            b"",
            b":8025",
            "m\u00e4il.dev.test".encode(),
            b"a" * 400,
        ):
            self.assertFalse(host_allowed([value], LISTED), value)
        self.assertFalse(host_allowed([b"127.0.0.1", b"evil.example"], LISTED))
        self.assertFalse(host_allowed([b"127.0.0.1", b"127.0.0.1"], LISTED))
        self.assertFalse(host_allowed([b"mail.dev.test"], ()))

    def test_split_host(self) -> None:
        """The host without its port, lower-cased; None when the port is not a number."""
        self.assertEqual(split_host("Example.COM:80"), "example.com")
        self.assertEqual(split_host("[::1]:80"), "[::1]")
        self.assertIsNone(split_host("example.com:"))
        self.assertIsNone(split_host("[::1]:x"))


class AllowedHostsSettingTests(SynchronousTestCase):
    def test_parsed(self) -> None:
        """HTTP_ALLOWED_HOSTS takes names separated by commas or spaces, lower-cased,
        without a trailing dot or repeats; names with a port, scheme, path or wildcard are
        refused at start-up with the setting's name."""
        self.assertEqual(
            parse_allowed_hosts("Mail.Dev.Test, box.internal. mail.dev.test"),
            ("mail.dev.test", "box.internal"),
        )
        self.assertEqual(parse_allowed_hosts(""), ())
        for bad in ("box:8025", "http://box", "box/", "*.dev.test", "-box", "b_x"):
            with self.assertRaises(ValueError, msg=bad):
                parse_allowed_hosts(bad)
        loaded = config.load({"HTTP_ALLOWED_HOSTS": "mail.dev.test"}, None)
        self.assertEqual(loaded.http_allowed_hosts, ("mail.dev.test",))
        with self.assertRaises(config.ConfigError) as raised:
            config.load({"HTTP_ALLOWED_HOSTS": "box:8025"}, None)
        self.assertIn("HTTP_ALLOWED_HOSTS", str(raised.exception))


class RefusalLogTests(SynchronousTestCase):
    def test_one_line_a_minute(self) -> None:
        """The first refusal is logged, the next ones within a minute are not, and the
        next line a minute later says how many were left out."""
        log = RefusalLog(interval=60)
        self.assertEqual(log.record(1000.0), 0)
        self.assertIsNone(log.record(1001.0))
        self.assertIsNone(log.record(1059.9))
        self.assertEqual(log.record(1060.0), 2)
        self.assertIsNone(log.record(1061.0))
        self.assertEqual(log.record(2000.0), 1)
