"""C{QUEUE_URL} read into a backend and its path or DSN, without I/O; queue mode's GIL setting."""

from __future__ import annotations

import sys

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.queue import backend
from smtpproxy.queue.url import parse_queue_url


class ParseQueueURLTests(SynchronousTestCase):
    def test_empty_is_direct_mode(self) -> None:
        """An empty or blank URL means no queue."""
        self.assertEqual(parse_queue_url(""), ("", ""))
        self.assertEqual(parse_queue_url("  "), ("", ""))

    def test_sqlite_absolute(self) -> None:
        """Three slashes introduce an absolute path, as in a file: URL."""
        self.assertEqual(
            parse_queue_url("sqlite:///var/lib/smtpproxy/queue.db"),
            ("sqlite", "/var/lib/smtpproxy/queue.db"),
        )
        self.assertEqual(parse_queue_url("sqlite:/srv/q.db"), ("sqlite", "/srv/q.db"))

    def test_sqlite_relative(self) -> None:
        """Without slashes the path is relative to the working directory, kept as written."""
        self.assertEqual(parse_queue_url("sqlite:queue.db"), ("sqlite", "queue.db"))
        self.assertEqual(parse_queue_url("sqlite:data/q.db"), ("sqlite", "data/q.db"))
        self.assertEqual(parse_queue_url("sqlite:../q%20.db"), ("sqlite", "../q%20.db"))

    def test_scheme_case_and_spaces(self) -> None:
        """Schemes are case-insensitive and surrounding blanks are dropped."""
        self.assertEqual(parse_queue_url(" SQLite:///q.db "), ("sqlite", "/q.db"))

    def test_postgresql_unchanged(self) -> None:
        """Both PostgreSQL spellings name the postgresql backend and keep the URL as given."""
        for url in (
            "postgresql://relay:pw@db.example:5432/queue?sslmode=require",
            "postgres://relay@db/queue",
        ):
            self.assertEqual(parse_queue_url(url), ("postgresql", url))

    def test_refused(self) -> None:
        """Hosts on sqlite, missing file names, NULs and other schemes are refused clearly."""
        for url in (
            "sqlite://host/q.db",
            "sqlite:",
            "sqlite:///",
            "sqlite:dir/",
            "sqlite:q\x00.db",
            "mysql://x/y",
            "postgresql:db",
            "/var/lib/q.db",
            "queue.db",
        ):
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_queue_url(url)
            self.assertTrue(str(caught.exception), url)

    def test_error_names_the_forms(self) -> None:
        """An unknown scheme's message says what would have been accepted."""
        with self.assertRaises(ValueError) as caught:
            parse_queue_url("mysql://x/y")
        self.assertIn("sqlite:relative/path.db", str(caught.exception))
        self.assertIn("postgresql://", str(caught.exception))


class SwitchIntervalTests(SynchronousTestCase):
    def test_queue_mode_shortens_the_gil_switch_interval(self) -> None:
        """share_the_gil() lowers the interpreter's switch interval to SWITCH_INTERVAL (the
        queue's database thread gets the GIL back sooner), and never raises it."""
        before = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, before)
        sys.setswitchinterval(0.005)
        backend.share_the_gil()
        self.assertAlmostEqual(sys.getswitchinterval(), backend.SWITCH_INTERVAL, places=5)
        sys.setswitchinterval(0.0001)
        backend.share_the_gil()
        self.assertLess(sys.getswitchinterval(), 0.0002)
