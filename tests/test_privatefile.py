"""Mail files created private to their owner, existing ones named, never changed."""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.privatefile import create_private
from smtpproxy.providers.mailbox.persist import MailboxFile


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class CreatePrivateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        old = os.umask(0)  # the most permissive umask: the 0600 must come from us
        self.addCleanup(os.umask, old)

    def test_new_file_is_owner_only(self) -> None:
        """A missing file is created empty with mode 0600 even under umask 0, and not reported."""
        self.assertEqual(create_private(self.path), [])
        self.assertEqual((_mode(self.path), os.path.getsize(self.path)), (0o600, 0))

    def test_existing_open_files_are_reported_not_changed(self) -> None:
        """A group- or world-readable database or WAL file is named with its mode, left as is."""
        for name, mode in ((self.path, 0o644), (self.path + "-wal", 0o640)):
            with open(name, "wb") as f:
                f.write(b"keep")
            os.chmod(name, mode)
        with open(self.path + "-shm", "wb"):
            pass
        os.chmod(self.path + "-shm", 0o600)
        self.assertEqual(
            create_private(self.path), [(self.path, 0o644), (self.path + "-wal", 0o640)]
        )
        self.assertEqual((_mode(self.path), _mode(self.path + "-wal")), (0o644, 0o640))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"keep")

    def test_unusable_place_is_left_to_the_opener(self) -> None:
        """A path in a missing directory raises nothing here (SQLite's open reports it)."""
        self.assertEqual(create_private(os.path.join(self.path, "no", "such.db")), [])


class MailboxFileTests(SynchronousTestCase):
    def test_sqlite_files_of_the_mailbox_are_private(self) -> None:
        """Under umask 022 the mailbox's database is 0600 before SQLite opens it, and the
        C{-wal} and C{-shm} files SQLite makes beside it (in WAL mode, as the mailbox
        runs) take that mode: nothing the mailbox writes is readable by other users."""
        path = os.path.abspath(self.mktemp())
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        file = MailboxFile(path)
        self.addCleanup(file.close)
        self.assertEqual(_mode(path), 0o600)
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
        modes = {name: _mode(name) for name in (path, path + "-wal", path + "-shm")}
        self.assertEqual(set(modes.values()), {0o600}, modes)

    def test_an_exposed_existing_file_is_warned_about(self) -> None:
        """An existing 0644 mailbox file logs a warning naming it and its mode."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb"):
            pass
        os.chmod(path, 0o644)
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        file = MailboxFile(path)
        self.addCleanup(file.close)
        warned = [
            e for e in events if e.get("log_format") == "mailbox file readable by other users"
        ]
        self.assertEqual([(e["path"], e["mode"]) for e in warned], [(path, "0644")])
        self.assertEqual(_mode(path), 0o644)
