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

Where a write's time goes, and so how this is arranged (issue 16; measured
in docs/performance.md):

 - A batch is one transaction whatever its size, and few calls into SQLite:
   one C{DELETE ... IN} for every id evicted or deleted meanwhile and one
   C{executemany} for the rows.  Each call gives the GIL up and takes it
   back, and taking it back can wait for the reactor thread, busy with
   SMTP, up to the interpreter's switch interval: two calls a row before,
   two a batch now (C{executemany} still steps once a row, inside C).
 - Checkpoints (copying the WAL into the database, with the only fsyncs
   C{synchronous=NORMAL} does) are not run by the commit a client waits for.
   SQLite's own would run inside the commit that crosses 1,000 pages (every
   few hundred 10 KB messages), and every client in that batch would wait
   for two fsyncs.  A second connection in a thread of its own runs a
   passive checkpoint once about L{CHECKPOINT_BYTES} have been written;
   SQLite lets it copy while the writer goes on appending.  The writer's
   own automatic checkpoint stays as a backstop at L{BACKSTOP_PAGES}, so the
   WAL stays bounded if the checkpointer falls behind: a passive checkpoint
   racing a steady stream of commits never lets the WAL start over, the
   writer's own one does.
 - Durability is unchanged by either: a row is in the WAL, written (not
   fsynced) before its C{250}, as before.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.logsafe import MAX_REASON, clip
from smtpproxy.privatefile import create_private

T = TypeVar("T")

log = Logger(namespace="smtpproxy.mailbox")

SCHEMA_VERSION = 1

#: Bytes of raw messages written between two background checkpoints (SQLite's
#: own default is 1,000 pages, 4 MiB).
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: WAL pages past which the writer checkpoints itself (the WAL's bound, 64 MiB
#: with 4 KiB pages), should the background checkpointer fall behind.
BACKSTOP_PAGES = 16_384
#: Ids per C{DELETE ... IN (...)}: well under SQLite's limit on parameters.
DELETE_CHUNK = 500

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


@dataclass(slots=True)
class _Waiting:
    """One call waiting for the next batch: a row to add, ids to forget, flags to set."""

    row: Row | None
    gone: list[str]
    #: (read, id) pairs, in the order they were asked for.
    marks: list[tuple[int, str]] = field(default_factory=list)
    done: Deferred[None] = field(default_factory=Deferred)


class MailboxFile:
    """The SQLite copy of the mailbox; every method returns a Deferred."""

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        if path != ":memory:":
            # Captured mail is private: the file is made 0600 before SQLite
            # opens it (its WAL files then get the same mode); one that
            # already exists is left alone but named.
            for name, mode in create_private(path):
                log.warn("mailbox file readable by other users", path=name, mode=f"{mode:04o}")
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
        # Its own connection and thread: a checkpoint runs beside the writes.
        self._checkpointer = ConnectionPool(
            "sqlite3", path, **{**kwargs, "cp_openfun": _configure_checkpointer}
        )
        self._waiting: list[_Waiting] = []
        self._writing = False
        self._unchecked = 0
        self._checkpointing = False

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
        return self._queue(_Waiting(row, list(evicted)))

    def _queue(self, waiting: _Waiting) -> Deferred[None]:
        self._waiting.append(waiting)
        done = waiting.done
        if not self._writing:
            self._write_next()
        return done

    def _write_next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._writing = False
            return
        self._writing = True
        rows = [waiting.row for waiting in batch if waiting.row is not None]
        gone = [message_id for waiting in batch for message_id in waiting.gone]
        marks = [mark for waiting in batch for mark in waiting.marks]
        writing = self._pool.runInteraction(_write, rows, gone, marks)

        def finished(result: object) -> None:
            self._write_next()
            if not isinstance(result, Failure):
                self._written(sum(len(row.raw) for row in rows))
            for waiting in batch:
                if isinstance(result, Failure):
                    waiting.done.errback(result)
                else:
                    waiting.done.callback(None)

        writing.addBoth(finished)

    def _written(self, size: int) -> None:
        """Count what went into the WAL; past L{CHECKPOINT_BYTES}, checkpoint beside."""
        self._unchecked += size
        if self._checkpointing or self._unchecked < CHECKPOINT_BYTES:
            return
        self._checkpointing = True
        self._unchecked = 0

        def failed(failure: Failure) -> None:
            # The writer's own checkpoint at BACKSTOP_PAGES still bounds the WAL.
            log.warn(
                "mailbox file checkpoint failed",
                path=self.path,
                reason=clip(str(failure.value), MAX_REASON),
            )

        def over(_: object) -> None:
            self._checkpointing = False

        checkpoint = self._checkpointer.runInteraction(_checkpoint)
        checkpoint.addErrback(failed).addBoth(over)

    def delete(self, ids: Sequence[str]) -> Deferred[None]:
        """Forget these ids, in order with the writes queued before (group commit too)."""
        return self._queue(_Waiting(None, list(ids)))

    def set_read(self, message_id: str, read: bool) -> Deferred[None]:
        """Set one row's read flag, in order with the writes queued before.

        Through the write queue, not straight to the pool: a message marked
        read while its row still waits for its batch would otherwise be
        updated before it is inserted (no row yet), then inserted unread.
        """
        return self.set_read_many([message_id], read)

    def set_read_many(self, ids: Sequence[str], read: bool) -> Deferred[None]:
        """Set the read flag of these rows, in order with the writes queued before.

        One request of the API marks many messages: it is one entry in the
        queue, so it lands whole in one transaction (shared with whatever
        else waited), and fires once that is committed; a write each would
        queue as many jobs, without bound.
        """
        return self._queue(_Waiting(None, [], [(int(read), i) for i in ids]))

    def size(self) -> int:
        """The file's size in bytes (for C{/api/v1/info}); 0 if it cannot be read."""
        import os

        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def close(self) -> None:
        self._pool.close()
        self._checkpointer.close()


def _configure(connection: sqlite3.Connection) -> None:
    """Run once per connection: WAL, the schema, and a refusal of newer files."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"mailbox file has schema version {version}; this smtpproxy reads {SCHEMA_VERSION}"
        )
    connection.execute(_SCHEMA)
    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    connection.commit()


def _configure_checkpointer(connection: sqlite3.Connection) -> None:
    """The checkpointer's connection: it only checkpoints, so nothing to set up.

    It opens only after the first write was committed, so the writer has
    made the file (and WAL mode is a property of the file).
    """


def _checkpoint(cursor: sqlite3.Cursor) -> None:
    # PASSIVE: copy what it can without waiting for the writer, which goes on.
    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


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


def _write(
    cursor: sqlite3.Cursor, rows: list[Row], gone: list[str], marks: list[tuple[int, str]]
) -> None:
    """One batch: forget C{gone}, add C{rows}, then set the read flags, in one transaction.

    Ids are unique, so a row also named in C{gone} (evicted or deleted
    before its batch was written) is simply left out: the same end state as
    writing it and deleting it again, in fewer calls.  The flags go last, in
    the order asked: a message is marked only once it was stored, so its
    row, in this batch or an earlier one, is there to update (or was
    deleted, and the update finds nothing, as it should).
    """
    forgotten = set(gone)
    _delete(cursor, gone)
    cursor.executemany(
        "INSERT INTO messages (id, created, envelope_from, envelope_to, raw, read) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (
                row.id,
                row.created,
                row.envelope_from,
                json.dumps(list(row.envelope_to)),
                row.raw,
                int(row.read),
            )
            for row in rows
            if row.id not in forgotten
        ],
    )
    if marks:
        cursor.executemany("UPDATE messages SET read = ? WHERE id = ?", marks)


def _delete(cursor: sqlite3.Cursor, ids: list[str]) -> None:
    for start in range(0, len(ids), DELETE_CHUNK):
        chunk = ids[start : start + DELETE_CHUNK]
        # Only "?" placeholders are built into the text; the ids are parameters.
        marks = ", ".join("?" * len(chunk))
        cursor.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)  # noqa: S608
