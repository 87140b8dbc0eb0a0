"""Keeping the mailbox in a SQLite file (C{MAILBOX_PATH}), so it survives a restart.

The memory store stays the one the page and the API read; the file is its
copy on disk, written as messages arrive and are evicted or deleted, and
read back once at start.  Only what cannot be derived is written: the id,
the arrival time, the envelope and the raw bytes.  The parse is redone on
load with the relay's own parser, so a stored message always reads as a new
one would.

The SQL runs in C{twisted.enterprise.adbapi}'s thread pool with one
connection, not in the reactor thread: a commit waits for the disk
(C{synchronous=NORMAL} under WAL), and the reactor serves SMTP sessions
meanwhile.  adbapi rather than a bare C{deferToThread} because it owns the
connection per thread and wraps each call in a transaction (commit, or
rollback on error), and because one connection in a pool of one thread
orders the writes without a lock of ours: SQLite admits one writer anyway.
C{check_same_thread=False} lets the pool close the connection from the
reactor thread at shutdown.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT NOT NULL,
    raw BLOB NOT NULL,
    read INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True, slots=True)
class Row:
    """What the file keeps of one message."""

    id: str
    created: float
    envelope_from: str
    envelope_to: tuple[str, ...]
    raw: bytes
    read: bool = False


class MailboxFile:
    """The SQLite copy of the mailbox; every method returns a Deferred."""

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        kwargs: dict[str, Any] = {
            "check_same_thread": False,
            "cp_min": 1,
            "cp_max": 1,
            "cp_openfun": _configure,
            "cp_noisy": False,
        }
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._pool = ConnectionPool("sqlite3", path, **kwargs)
        self._waiting: list[tuple[Row, list[str], Deferred[None]]] = []
        self._writing = False

    def load(self, limit: int, prepare: Callable[[Row], T]) -> Deferred[list[T]]:
        """The newest C{limit} rows, oldest first (the order they are put back in).

        @param prepare: applied to each row in the pool's thread (the parse,
            which would otherwise hold the reactor up at start).
        """
        loading = self._pool.runInteraction(_load, limit, prepare)
        return cast("Deferred[list[T]]", loading)

    def insert(self, row: Row, evicted: Sequence[str]) -> Deferred[None]:
        """Write C{row} and forget C{evicted}; fire once that is committed.

        Group commit: while one transaction runs, the rows that arrive wait
        and go together in the next, so a burst of mail costs a few
        transactions, not one each (and the order of rows is the order of
        calls).
        """
        done: Deferred[None] = Deferred()
        self._waiting.append((row, list(evicted), done))
        if not self._writing:
            self._write_next()
        return done

    def _write_next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._writing = False
            return
        self._writing = True
        writes = [(row, evicted) for row, evicted, _ in batch]
        writing = self._pool.runInteraction(_insert_all, writes)

        def finished(result: object) -> None:
            self._write_next()
            for _, _, done in batch:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)

        writing.addBoth(finished)

    def delete(self, ids: Sequence[str]) -> Deferred[None]:
        return cast("Deferred[None]", self._pool.runInteraction(_delete, list(ids)))

    def set_read(self, message_id: str, read: bool) -> Deferred[None]:
        update = "UPDATE messages SET read = ? WHERE id = ?"
        return cast("Deferred[None]", self._pool.runOperation(update, (int(read), message_id)))

    def set_read_many(self, ids: Sequence[str], read: bool) -> Deferred[None]:
        """Set the read flag of these rows: one transaction, one statement for them all.

        One request of the API marks many messages; a write each would queue
        as many jobs in the pool, without bound.
        """
        return cast("Deferred[None]", self._pool.runInteraction(_set_read, list(ids), read))

    def size(self) -> int:
        """The file's size in bytes (for C{/api/v1/info}); 0 if it cannot be read."""
        import os

        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def close(self) -> None:
        self._pool.close()


def _configure(connection: sqlite3.Connection) -> None:
    """Run once per connection: WAL, the schema, and a refusal of newer files."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"mailbox file has schema version {version}; this smtpproxy reads {SCHEMA_VERSION}"
        )
    connection.execute(_SCHEMA)
    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    connection.commit()


def _load(cursor: sqlite3.Cursor, limit: int, prepare: Callable[[Row], T]) -> list[T]:
    cursor.execute(
        "SELECT seq, id, created, envelope_from, envelope_to, raw, read FROM messages "
        "ORDER BY seq DESC LIMIT ?",
        (limit,),
    )
    found = cursor.fetchall()
    if found:
        # A smaller MAILBOX_MAX_MESSAGES than last time: the rest is gone for good.
        cursor.execute("DELETE FROM messages WHERE seq < ?", (found[-1][0],))
    rows = [
        Row(str(i), float(c), str(f), tuple(json.loads(t)), bytes(r), bool(read))
        for _, i, c, f, t, r, read in found
    ]
    rows.reverse()
    return [prepare(row) for row in rows]


def _insert_all(cursor: sqlite3.Cursor, writes: list[tuple[Row, list[str]]]) -> None:
    for row, evicted in writes:
        _insert(cursor, row, evicted)


def _insert(cursor: sqlite3.Cursor, row: Row, evicted: list[str]) -> None:
    _delete(cursor, evicted)
    cursor.execute(
        "INSERT INTO messages (id, created, envelope_from, envelope_to, raw, read) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            row.id,
            row.created,
            row.envelope_from,
            json.dumps(list(row.envelope_to)),
            sqlite3.Binary(row.raw),
            int(row.read),
        ),
    )


def _delete(cursor: sqlite3.Cursor, ids: list[str]) -> None:
    if ids:
        cursor.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])


def _set_read(cursor: sqlite3.Cursor, ids: list[str], read: bool) -> None:
    cursor.executemany("UPDATE messages SET read = ? WHERE id = ?", [(int(read), i) for i in ids])
