"""The embedded queue: one SQLite file for envelopes and small bodies, large bodies beside it.

C{queue.db} holds the rows (WAL mode, C{synchronous=FULL}, so a commit is on
disk when it returns).  A body of at most C{inline_max} bytes (64 KiB) is
stored in the database beside its row, so the common small message costs no
file, no rename and no fsync of its own: its batch's one commit makes it
durable.  A larger body gets its own file in C{queue.db.bodies/}, named by a
random token, so it never passes through SQLite's page cache and a 150 MB
message costs the database nothing.

An enqueue of a large body is durable in this order, and only then fires:

  1. the body is copied from C{body.chunks()} into C{<token>.tmp} in a
     thread of the store's body pool, and the file is fsynced;
  2. it is renamed to C{<token>};
  3. the directory is fsynced (one fsync for every body in the batch);
  4. the rows of the batch are inserted in one transaction and committed.

A crash before 4 leaves a temporary or an orphan body file and no row:
L{SQLiteStore.open} deletes both, and the client, which never heard 250,
sends again.  A row is never committed before its body is on disk, so a row
without a body file means the disk lost it; open makes such a row dead with
a reply that says so, rather than dropping it without a trace.

Only the queue's writer tidies, and only while no other process is the
writer: between steps 2 and 4 a live relay's body file has no row yet, so a
second process tidying then would delete the body of a message about to be
acknowledged.  The writer (the relay) holds an exclusive advisory lock on
C{queue.db.lock} (C{flock}) from its open to its close; the kernel drops it
when the process dies, so a crash never leaves it held.  An open that
cannot take it (a second relay on the same file by mistake) logs a warning
and does not tidy; opens that are not the writer (the operator command, the
doctor's check) never take it, never tidy, and never create a queue: they
open an existing file only, so a mistyped path is an error, not an empty queue.

The writer creates C{queue.db} mode 0600 before SQLite opens it (it holds
the small bodies; SQLite gives C{-wal} and C{-shm} the same mode).

Group commit: while one batch commits, bodies that finish are collected and
go together in the next transaction, with the deliveries the worker
finished meanwhile (L{SQLiteStore.delivered}): under load one fsync of the
WAL serves many messages in and many out.  Claims and lease renewals commit
without an fsync (see L{SQLiteStore._run}).  Body files are written in a
pool of their own (several threads, so their fsyncs overlap with each other
and with the commit in progress); the database has one connection in a pool
of one thread.  One connection because SQLite admits one writer at a time anyway:
more connections would only wait on its file lock, polling, where one
thread takes the work in order; and because the commit batches then never
race each other.  C{check_same_thread=False} lets the pool close that
connection from the reactor thread at shutdown.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import heapq
import json
import os
import re
import secrets
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smtpproxy.privatefile import OTHERS, create_private, exposed
from smtpproxy.queue import counters
from smtpproxy.queue.model import (
    Attempt,
    BodyDamagedError,
    BodySource,
    EnqueueWithdrawnError,
    Entry,
    Envelope,
    LeaseLostError,
    Outcome,
    QueueBusyError,
    QueueFullError,
    Recipients,
    State,
    Stats,
    Writability,
    refused_from_json,
    refused_json,
)
from smtpproxy.queue.storage_errors import WRITE_LOCK_WAIT, storage_error

__all__ = ["SCHEMA_VERSION", "WRITE_LOCK_WAIT", "SQLiteStore", "body_directory"]

log = Logger(namespace="smtpproxy.queue")

T = TypeVar("T")

SCHEMA_VERSION = 4
"""Kept in C{PRAGMA user_version}; a newer file is refused rather than misread.

Version 2 added C{inline_bodies}, the bodies of small messages; version 3
the recipients refused by partial deliveries (L{_COLUMNS_3}); version 4 the
index a claim reads each route's oldest messages by (L{_SCHEMA_4}).  Older
files are upgraded in place at open.
"""

_FULL, _NORMAL = "FULL", "NORMAL"

#: Seconds the readiness check waits for the write lock (see L{SQLiteStore.writable}).
LOCK_CHECK_WAIT = 0.25

#: Seconds a claim waits for the write lock held by another process.  Far
#: less than L{WRITE_LOCK_WAIT}: a claim that cannot have the lock costs
#: nothing but a poll (the worker looks again within a second), while the
#: enqueues behind it on the one connection have clients waiting in DATA.
CLAIM_LOCK_WAIT = 0.25

#: Bodies up to this size live in the database (C{inline_bodies}); larger ones in a file.
INLINE_MAX = 64 * 1024

#: C{messages.body} of a message whose body is in C{inline_bodies} (a file's
#: name otherwise, NULL once the body was found lost).
_INLINE = ""

#: How many body files are written at once.  Each mostly waits in fsync, so
#: a few threads let those waits overlap without crowding a small machine.
BODY_THREADS = 4

_BODY_NAME = re.compile(r"[0-9a-f]{32}")
_TMP_SUFFIX = ".tmp"
_LOCK_SUFFIX = ".lock"

LOST_BODY_REPLY = "554 5.3.0 queued body file was missing when the queue was opened"

#: What version 2 added: small bodies, in a table of their own so that the
#: scans of C{messages} (claims, listings) never walk a body's pages.
_SCHEMA_2 = """
CREATE TABLE inline_bodies (
    message INTEGER PRIMARY KEY REFERENCES messages (seq) ON DELETE CASCADE,
    data BLOB NOT NULL
);
"""

_SCHEMA = (
    """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    client TEXT NOT NULL,
    user TEXT,
    route TEXT NOT NULL,
    meta TEXT NOT NULL,
    size INTEGER NOT NULL,
    body TEXT,
    queued_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    lease_owner TEXT,
    lease_until REAL,
    died_at REAL
);
CREATE INDEX messages_order ON messages (state, queued_at, seq);
CREATE INDEX messages_owner ON messages (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE attempts (
    message INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    reply TEXT NOT NULL,
    request_id TEXT,
    worker TEXT NOT NULL
);
CREATE INDEX attempts_message ON attempts (message);
"""
    + _SCHEMA_2
)

#: What version 3 added: per attempt, the recipients refused while others
#: got the message; per message, those refused for good (JSON lists).
_COLUMNS_3 = (
    ("messages", "failed", "TEXT NOT NULL DEFAULT '[]'"),
    ("attempts", "refused", "TEXT NOT NULL DEFAULT '[]'"),
)

#: What version 4 added: each route's queued messages in age order, so that a
#: claim reads only routes with room and only as many rows as they have room
#: for (a backlog behind one full mailbox costs it nothing).
_SCHEMA_4 = "CREATE INDEX IF NOT EXISTS messages_route ON messages (state, route, queued_at, seq)"

#: Spelled out once and put into the SELECTs with an f-string: a constant,
#: never input (values are always bound), hence the S608 exemptions below.
_COLUMNS = (
    "seq, id, sender, recipients, client, user, route, meta, size, queued_at, state,"
    " attempts, next_attempt, last_reply, lease_owner, lease_until, failed"
)


def body_directory(path: str) -> str:
    """Where the bodies of the queue at C{path} live: beside it, named after it."""
    return path + ".bodies"


@dataclass(eq=False)
class _Pending:
    """One enqueue between its 250 being asked for and its commit.

    @ivar name: the body file's name, or C{_INLINE} with the body in C{data}.
    @ivar withdrawn: L{SQLiteStore.withdraw} stopped it: it is never inserted.
    @ivar sealed: its batch holds the write lock and inserts it: too late to
        withdraw.  Both flags change under the store's C{_seal} lock only.
    """

    id: str
    envelope: Envelope
    size: int
    now: float
    name: str
    data: bytes | None = None
    done: Deferred[None] = field(default_factory=Deferred)
    withdrawn: bool = False
    sealed: bool = False


@dataclass(eq=False)
class _Finished:
    """One delivered message waiting for the group commit that removes it."""

    id: str
    owner: str
    done: Deferred[None] = field(default_factory=Deferred)


@dataclass(frozen=True, slots=True)
class _Committed:
    """What one group commit did: ids left out (duplicates, withdrawn), lost leases, bodies gone."""

    duplicates: set[str]
    withdrawn: set[str]
    lost: set[str]
    removed: builtins.list[tuple[int, str | None]]


class SQLiteStore:
    """A L{smtpproxy.queue.store.QueueStore} in one SQLite file and a body directory.

    One process writes the queue (the relay); the operator command may open
    the same file at the same time for reading and small changes, which
    SQLite's locking serialises.  C{timeout} is how long the operator
    command's transactions, and the relay's L{open}, wait for the write
    lock; the writer's other work waits at most L{WRITE_LOCK_WAIT} and then
    fails with L{QueueBusyError} (an enqueue is answered 451 4.3.0), since
    its one connection must not sit behind another process's lock while
    clients wait in DATA.
    Only the writer tidies crash leftovers at open (see the module
    docstring): pass C{writer=False} for any other use.

    @ivar commits: enqueue transactions committed so far; with group commit
        it grows more slowly than the number of messages (tests read it).
    @ivar group_commits: group commit transactions of any kind (enqueues,
        deliveries or both).
    @ivar held: bytes of bodies this store holds, counted against
        C{max_bytes}; loaded at L{open} and kept up to date by this
        process; re-read from the file when it says "full" and another
        process (the operator command) has changed the file since
        (L{_recount}).
    """

    def __init__(
        self,
        path: str,
        max_bytes: int,
        reactor: IReactorTime,
        timeout: float = 30.0,
        inline_max: int = INLINE_MAX,
        *,
        writer: bool = True,
    ) -> None:
        self.path = path
        self.writer = writer
        # The writer lock's file, while this store holds it.
        self._lock: int | None = None
        self.inline_max = inline_max
        self.bodies = body_directory(path)
        self.max_bytes = max_bytes
        self.commits = 0
        self.group_commits = 0
        self.held = 0
        # SQLite's PRAGMA data_version when held was last read from the
        # file (None: not yet); it changes only when another connection
        # commits.
        self._data_version: int | None = None
        self._reactor = reactor
        self._timeout = timeout
        # How long the connection's work waits for the write lock (see open).
        self._wait = min(timeout, WRITE_LOCK_WAIT) if writer else timeout
        self._pool: ConnectionPool | None = None
        self._files: ThreadPool | None = None
        # Enqueues in flight, by id: for duplicates and for withdraw().
        self._ids: dict[str, _Pending] = {}
        # Taken by withdraw() and by the commit thread when it seals a batch.
        self._seal = threading.Lock()
        self._ready: list[_Pending] = []
        self._finished: list[_Finished] = []
        # Small bodies read along with a claim, so the worker's read_body
        # does not wait behind a commit; dropped when read, settled or
        # released, so at most the worker's concurrency of them.
        self._claimed: dict[str, bytes] = {}
        self._committing = False
        # Set by close(): deliveries of a batch that found the lock busy are
        # no longer kept for another try (the stop must not wait for ever).
        self._closing = False
        self._level = _FULL
        self._inflight: set[Deferred[None]] = set()

    # Opening and closing.

    def open(self) -> Deferred[None]:
        """Create or check the schema, tidy what a crash left, count the bytes held."""
        # adbapi's constructor has no annotations; calling it through a typed
        # name keeps the rest of this module under mypy's strict checks.
        make_pool: Callable[..., ConnectionPool] = ConnectionPool
        self._pool = make_pool(
            "sqlite3",
            # Only the writer may create the file; anyone else opens an
            # existing one (mode=rw), so a mistyped QUEUE_URL is an error,
            # never a new empty queue.
            self.path if self.writer else _existing(self.path),
            uri=not self.writer,
            timeout=self._wait,
            isolation_level=None,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure,
            cp_reactor=self._reactor,
            cp_name="smtpproxy-queue-db",
        )
        _untyped(self._pool.start)
        self._files = ThreadPool(0, BODY_THREADS, "smtpproxy-queue-bodies")
        _untyped(self._files.start)
        now = self._reactor.seconds()

        def opened(result: tuple[int, int, int, int]) -> None:
            held, temporary, orphans, lost = result
            self.held = held
            log.info(
                "queue opened",
                path=self.path,
                held=held,
                partial=temporary,
                orphans=orphans,
                lost=lost,
                tidied=self._lock is not None,
            )

        def failed(failure: Failure) -> Failure:
            # The threads too: a process whose open failed must be able to exit.
            self._stop()
            return failure

        def loose(found: builtins.list[tuple[str, int]]) -> None:
            for name, mode in found:
                log.warn("queue file readable by other users", path=name, mode=f"{mode:04o}")

        return (
            self._in_files(lambda: _prepare_database(self.path, self.writer))
            .addCallback(loose)
            .addCallback(lambda _: self._run(lambda cursor: self._open_in_thread(cursor, now)))
            .addCallback(opened)
            .addErrback(failed)
        )

    def close(self) -> Deferred[None]:
        """Let enqueues in progress commit, then stop the threads and close the file."""
        self._closing = True
        waiting = list(self._inflight)

        return (
            defer.DeferredList(waiting, consumeErrors=True)
            .addCallback(lambda _: self._stop())
            .addCallback(lambda _: None)
        )

    def _stop(self) -> None:
        """Stop the threads, close the file, give up the writer lock."""
        if self._pool is not None:
            _untyped(self._pool.close)
            self._pool = None
        if self._files is not None:
            _untyped(self._files.stop)
            self._files = None
        self._release()

    # The front door.

    def enqueue(
        self, id: str, envelope: Envelope, body: BodySource, now: float, *, recounted: bool = False
    ) -> Deferred[None]:
        """Store a message; fire after its body and its row are both on disk.

        @param recounted: C{held} was just re-read (L{_recount}); refuse if
            still full.
        """
        size = body.size
        if id in self._ids:
            return defer.fail(KeyError(id))
        if self.held + size > self.max_bytes:
            if not recounted:
                return self._recount().addCallback(
                    lambda _: self.enqueue(id, envelope, body, now, recounted=True)
                )
            return defer.fail(QueueFullError(f"queue holds {self.held} of {self.max_bytes} bytes"))
        self.held += size
        if size <= self.inline_max:
            item = _Pending(id, envelope, size, now, _INLINE)
            self._ids[id] = item
            self._inflight.add(item.done)
            try:
                # At most inline_max bytes, from memory (or a spool file the
                # page cache still holds): cheaper here than a thread hop.
                item.data = _read_small(body, size)
            except BaseException as e:
                item.done.errback(storage_error(e, self._wait))
            else:
                self._ready_to_commit(item)
        else:
            item = _Pending(id, envelope, size, now, secrets.token_hex(16))
            self._ids[id] = item
            written = self._in_files(lambda: self._write_body(item.name, body, size))
            written.addCallbacks(lambda _: self._ready_to_commit(item), item.done.errback)
            self._inflight.add(item.done)

        def finished(result: object) -> object:
            self._inflight.discard(item.done)
            self._ids.pop(id, None)
            if isinstance(result, Failure):
                self.held -= size
            return result

        item.done.addBoth(finished)
        # The caller gets its own Deferred, so one caller's callbacks cannot
        # change what close() waits on.
        answer: Deferred[None] = Deferred()
        item.done.chainDeferred(answer)
        return answer

    def _recount(self) -> Deferred[None]:
        """Re-read C{held} from the file if another process changed it since the last read.

        The operator's C{smtpproxy queue delete} (or a purge it allows) runs
        in another process: the bytes it frees never pass through this
        store's count, so without this a relay told "full" stays full until
        restarted.  Only when the count says full, and only when SQLite's
        C{data_version} says another connection committed since: this
        process's own commits are counted already.  Exact, because the
        read runs on the database thread after every commit before it, and
        its answer reaches the reactor after theirs: the rows it sums and
        the enqueues still in C{_ids} (not yet answered) never overlap.
        """

        def work(cursor: sqlite3.Cursor) -> tuple[int, int] | None:
            version = int(cursor.execute("PRAGMA data_version").fetchone()[0])
            if version == self._data_version:
                return None
            return version, _held(cursor)

        def counted(found: tuple[int, int] | None) -> None:
            if found is None:
                return
            self._data_version, stored = found
            held = stored + sum(item.size for item in self._ids.values())
            if held != self.held:
                log.info("queue size re-read", held=held, was=self.held, path=self.path)
            self.held = held

        return self._run(work, synced=False).addCallback(counted)

    def withdraw(self, id: str) -> bool:
        """Stop the enqueue of C{id} unless its batch already holds the write lock.

        Withdrawn while its body is being written, it is dropped when the
        write ends; waiting for the next batch, at once; in a batch still
        waiting for SQLite's write lock (another process holds it), the
        batch skips it.  Its Deferred fails with L{EnqueueWithdrawnError}
        when its body file (if any) is gone, and its bytes are given back.
        """
        item = self._ids.get(id)
        if item is None:
            return False
        with self._seal:
            if item.sealed:
                return False
            item.withdrawn = True
        if item in self._ready:
            self._ready.remove(item)
            self._drop([item], EnqueueWithdrawnError)
        return True

    def _drop(self, items: builtins.list[_Pending], error: Callable[[str], Exception]) -> None:
        """Fail enqueues that were not inserted, once their body files are deleted."""
        if not items:
            return
        names = [item.name for item in items if item.name != _INLINE]

        def refuse(_: object) -> None:
            for item in items:
                item.done.errback(error(item.id))

        self._in_files(lambda: _unlink_all(self.bodies, names)).addBoth(refuse)

    # The delivery workers.

    def claim(
        self, owner: str, now: float, lease: float, limit: int, per_route: int
    ) -> Deferred[list[Entry]]:
        """Lease up to C{limit} due messages, oldest first, no route past C{per_route}."""

        def work(cursor: sqlite3.Cursor) -> builtins.list[tuple[Entry, bytes | None]]:
            _begin_briefly(cursor, CLAIM_LOCK_WAIT, self._wait)
            cursor.execute(
                "SELECT route, COUNT(*) FROM messages"
                " WHERE state = 'delivering' AND lease_until > ? GROUP BY route",
                (now,),
            )
            busy: dict[str, int] = {route: count for route, count in cursor.fetchall()}
            # Expired leases (a few rows at most: what a dead process held),
            # and the oldest due messages of each route with room, no more
            # than it has room for (_due_by_route); merged oldest first.
            cursor.execute(
                f"SELECT {_COLUMNS}, body FROM messages"  # noqa: S608
                " WHERE state = 'delivering' AND lease_until <= ? ORDER BY queued_at, seq",
                (now,),
            )
            expired = cursor.fetchall()
            due = _due_by_route(cursor, now, limit, per_route, busy)
            chosen: list[tuple[object, ...]] = []
            for row in heapq.merge(expired, *due, key=_age):
                route = row[6]
                if busy.get(route, 0) >= per_route:
                    continue
                busy[route] = busy.get(route, 0) + 1
                chosen.append(row)
                if len(chosen) == limit:
                    break
            until = now + lease
            cursor.executemany(
                "UPDATE messages SET state = 'delivering', lease_owner = ?, lease_until = ?"
                " WHERE seq = ?",
                [(owner, until, row[0]) for row in chosen],
            )
            small = [cast(int, row[0]) for row in chosen if row[-1] == _INLINE]
            bodies: dict[int, bytes] = {}
            if small:
                cursor.execute(
                    "SELECT message, data FROM inline_bodies"  # noqa: S608
                    f" WHERE message IN ({', '.join('?' * len(small))})",
                    small,
                )
                bodies = dict(cursor.fetchall())
            return [
                (
                    _entry(row[:-1], state=State.DELIVERING, lease_owner=owner, lease_until=until),
                    bodies.get(cast(int, row[0])),
                )
                for row in chosen
            ]

        def keep(claimed: builtins.list[tuple[Entry, bytes | None]]) -> builtins.list[Entry]:
            for entry, data in claimed:
                # A body of the wrong length is left to read_body, which says so.
                if data is not None and len(data) == entry.size:
                    self._claimed[entry.id] = data
            return [entry for entry, _ in claimed]

        if limit <= 0 or per_route <= 0:
            return defer.succeed([])
        return self._run(work, synced=False).addCallback(keep)

    def renew(self, id: str, owner: str, until: float) -> Deferred[None]:
        """Move C{owner}'s lease on to C{until}; L{LeaseLostError} if it is not theirs now."""

        changed = self._change(
            "UPDATE messages SET lease_until = ?"
            " WHERE id = ? AND state = 'delivering' AND lease_owner = ?",
            (until, id, owner),
            synced=False,
        )

        def check(count: int) -> None:
            if count != 1:
                raise LeaseLostError(id)

        return changed.addCallback(check)

    def read_body(self, id: str) -> Deferred[bytes]:
        """The body as accepted; C{KeyError} for no such message, C{OSError} if unreadable.

        C{FileNotFoundError} when the body is gone, L{BodyDamagedError} when
        its length is not the size acknowledged (a truncated file): never a
        body other than the one accepted.  A small body this process just
        claimed comes from the claim's own read (checked there), without
        waiting for the database thread.
        """
        claimed = self._claimed.pop(id, None)
        if claimed is not None:
            return defer.succeed(claimed)

        def find(cursor: sqlite3.Cursor) -> tuple[str, int] | bytes:
            cursor.execute("SELECT seq, body, size FROM messages WHERE id = ?", (id,))
            row = cursor.fetchone()
            if row is None:
                raise KeyError(id)
            if row[1] is None:
                raise FileNotFoundError(errno.ENOENT, f"the body of {id} was lost")
            if row[1] == _INLINE:
                return _whole(id, _inline_body(cursor, row[0]), int(row[2]))
            return str(row[1]), int(row[2])

        def read(found: tuple[str, int] | bytes) -> bytes | Deferred[bytes]:
            if isinstance(found, bytes):
                return found
            name, size = found
            return self._in_files(lambda: _whole(id, self._read_file(name, size), size))

        return self._run(find).addCallback(read)

    def delivered(self, id: str, owner: str, attempt: Attempt) -> Deferred[None]:
        """Remove the message (its history goes with it; the log keeps the story).

        The removal joins the next group commit, with the enqueues and the
        other deliveries of that moment, and fires once it is committed.
        """
        self._claimed.pop(id, None)
        item = _Finished(id, owner)
        self._inflight.add(item.done)

        def settled(result: object) -> object:
            self._inflight.discard(item.done)
            return result

        item.done.addBoth(settled)
        self._finished.append(item)
        if not self._committing:
            self._commit_next()
        answer: Deferred[None] = Deferred()
        item.done.chainDeferred(answer)
        return answer

    def deferred(
        self,
        id: str,
        owner: str,
        attempt: Attempt,
        next_attempt: float,
        recipients: Recipients | None = None,
    ) -> Deferred[None]:
        """Record a temporary failure and put the message back, due at C{next_attempt}."""
        self._claimed.pop(id, None)
        state = "state = 'queued', next_attempt = ?"
        return self._settle(id, owner, attempt, state, next_attempt, recipients)

    def dead(
        self, id: str, owner: str, attempt: Attempt, recipients: Recipients | None = None
    ) -> Deferred[None]:
        """Record the last attempt and keep the message, dead, with its history."""
        self._claimed.pop(id, None)
        state = "state = 'dead', died_at = ?"
        return self._settle(id, owner, attempt, state, attempt.at, recipients)

    def release(self, owner: str, keep: Sequence[str] = ()) -> Deferred[int]:
        """Put back every message C{owner} holds but those of C{keep}, due as before."""
        self._claimed.clear()
        return self._change(
            "UPDATE messages SET state = 'queued', lease_owner = NULL, lease_until = NULL"
            " WHERE state = 'delivering' AND lease_owner = ?"
            " AND id NOT IN (SELECT value FROM json_each(?))",
            (owner, json.dumps(list(keep))),
        )

    # The operator.

    def list(self, state: State | None, limit: int) -> Deferred[list[Entry]]:
        """Up to C{limit} messages, oldest first, all or in one state."""

        def work(cursor: sqlite3.Cursor) -> list[Entry]:
            if state is None:
                cursor.execute(
                    f"SELECT {_COLUMNS} FROM messages ORDER BY queued_at, seq LIMIT ?",  # noqa: S608
                    (limit,),
                )
            else:
                cursor.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE state = ?"  # noqa: S608
                    " ORDER BY queued_at, seq LIMIT ?",
                    (state.value, limit),
                )
            return [_entry(row) for row in cursor.fetchall()]

        return self._run(work)

    def show(self, id: str) -> Deferred[Entry | None]:
        """One message and its attempts, oldest first; None if absent."""

        def work(cursor: sqlite3.Cursor) -> Entry | None:
            cursor.execute("BEGIN")
            cursor.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (id,))  # noqa: S608
            row = cursor.fetchone()
            if row is None:
                return None
            cursor.execute(
                "SELECT at, outcome, reply, request_id, worker, refused FROM attempts"
                " WHERE message = ? ORDER BY at, rowid",
                (row[0],),
            )
            history = tuple(
                Attempt(at, Outcome(outcome), reply, request_id, worker, refused_from_json(refused))
                for at, outcome, reply, request_id, worker, refused in cursor.fetchall()
            )
            return _entry(row, history=history)

        return self._run(work)

    def retry(self, id: str, now: float) -> Deferred[bool]:
        """Make a queued or dead message due at C{now}; a dead one starts its age again.

        False when there is no such message, when a worker's lease on it
        is still running, or when its body was lost (nothing to send).
        """

        changed = self._change(
            "UPDATE messages SET state = 'queued', next_attempt = ?, died_at = NULL,"
            " queued_at = CASE WHEN state = 'dead' THEN ? ELSE queued_at END,"
            " lease_owner = NULL, lease_until = NULL"
            " WHERE id = ? AND body IS NOT NULL"
            " AND (state != 'delivering' OR lease_until <= ?)",
            (now, now, id, now),
        )
        return changed.addCallback(lambda count: count == 1)

    def retry_dead(self, now: float) -> Deferred[int]:
        """Queue every dead message whose body is still there, due at C{now}, its age restarted."""

        return self._change(
            "UPDATE messages SET state = 'queued', next_attempt = ?, died_at = NULL, queued_at = ?"
            " WHERE state = 'dead' AND body IS NOT NULL",
            (now, now),
        )

    def delete(self, id: str) -> Deferred[bool]:
        """Remove a message and its body unless a worker's lease on it is still running."""
        now = self._reactor.seconds()

        def work(cursor: sqlite3.Cursor) -> tuple[int, str | None] | None:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(
                "DELETE FROM messages WHERE id = ? AND (state != 'delivering' OR lease_until <= ?)"
                " RETURNING size, body",
                (id, now),
            )
            row = cursor.fetchone()
            return None if row is None else (int(row[0]), row[1])

        def done(removed: tuple[int, str | None] | None) -> Deferred[bool]:
            if removed is None:
                return defer.succeed(False)
            return self._forget_bodies([removed]).addCallback(lambda _: True)

        return self._run(work).addCallback(done)

    def stats(self, now: float) -> Deferred[Stats]:
        """Counts by state, bytes of bodies on disk, the oldest live message's time.

        A lease that ran out before C{now} (its holder died or stalled)
        counts as queued, as L{State.DELIVERING} says and as L{claim}
        treats it.
        """

        def work(cursor: sqlite3.Cursor) -> Stats:
            cursor.execute(
                "SELECT"
                " COUNT(*) FILTER (WHERE state = 'queued'"
                " OR (state = 'delivering' AND lease_until <= ?)),"
                " COUNT(*) FILTER (WHERE state = 'delivering' AND lease_until > ?),"
                " COUNT(*) FILTER (WHERE state = 'dead'),"
                " COALESCE(SUM(size) FILTER (WHERE body IS NOT NULL), 0),"
                " MIN(queued_at) FILTER (WHERE state != 'dead')"
                " FROM messages",
                (now, now),
            )
            queued, delivering, dead, held, oldest = cursor.fetchone()
            return Stats(queued, delivering, dead, held, oldest)

        return self._run(work)

    def purge_dead(self, before: float) -> Deferred[int]:
        """Remove the messages that died before C{before}, and their bodies."""

        def work(cursor: sqlite3.Cursor) -> list[tuple[int, str | None]]:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(
                "DELETE FROM messages WHERE state = 'dead' AND died_at < ? RETURNING size, body",
                (before,),
            )
            return [(int(size), name) for size, name in cursor.fetchall()]

        def done(removed: list[tuple[int, str | None]]) -> Deferred[int]:
            return self._forget_bodies(removed).addCallback(lambda _: len(removed))

        return self._run(work).addCallback(done)

    # The readiness probe.

    def writable(self) -> Deferred[Writability]:
        """Take the write lock and give it back; look at the filesystems under the queue.

        Runs on the database thread, in turn with the commits, so it never
        races them; it waits at most L{LOCK_CHECK_WAIT} for the lock (not the
        store's own C{timeout}), so a lock held elsewhere delays this
        process's deliveries by no more than that.  C{BEGIN IMMEDIATE} fails
        at once on a database SQLite opened read-only; a filesystem
        remounted read-only under an open database still grants the lock,
        which is why the directories are looked at as well.
        """
        directories = (os.path.dirname(os.path.abspath(self.path)), self.bodies)
        wait_ms = round(LOCK_CHECK_WAIT * 1000)
        usual_ms = round(self._wait * 1000)

        def work(cursor: sqlite3.Cursor) -> Writability:
            problem, free = _filesystem_problem(self.path, directories)
            if problem is None:
                problem = _lock_problem(cursor, wait_ms, usual_ms)
            return Writability(problem, free)

        return self._run(work)

    # Group commit.

    def _ready_to_commit(self, item: _Pending) -> None:
        if item.withdrawn:  # while its body was being written
            self._drop([item], EnqueueWithdrawnError)
            return
        self._ready.append(item)
        if not self._committing:
            self._commit_next()

    def _commit_next(self) -> None:
        batch, self._ready = self._ready, []
        finished, self._finished = self._finished, []
        self._committing = True

        def committed(result: _Committed) -> None:
            self.group_commits += 1
            if batch:
                self.commits += 1
            self._settle_finished(finished, result)
            duplicates, withdrawn = result.duplicates, result.withdrawn
            self._drop([item for item in batch if item.id in duplicates], KeyError)
            self._drop([item for item in batch if item.id in withdrawn], EnqueueWithdrawnError)
            kept = [item for item in batch if item.id not in duplicates | withdrawn]
            for item in kept:
                item.done.callback(None)

        def failed(reason: Failure) -> None:
            # Nothing of the batch is committed: take its bodies back too, so
            # the bytes and the files go together.
            error: BaseException = reason.value or RuntimeError("commit failed")
            names = [item.name for item in batch if item.name != _INLINE]
            if isinstance(error, QueueBusyError) and not self._closing:
                # The write lock is held elsewhere: the enqueues' clients are
                # told to retry, but deliveries already made must not be
                # forgotten (their messages would be sent again once the
                # leases ran out): they go in the next batch, which tries
                # again at once (each try waits WRITE_LOCK_WAIT for the lock).
                self._finished[:0] = finished
            else:
                for one in finished:
                    one.done.errback(reason)

            def answer(_: object) -> None:
                for item in batch:
                    item.done.errback(EnqueueWithdrawnError(item.id) if item.withdrawn else error)

            self._in_files(lambda: _unlink_all(self.bodies, names)).addBoth(answer)

        def next_batch(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("queue commit bookkeeping failed", result)
            self._committing = False
            if self._ready or self._finished:
                self._commit_next()

        self._run(lambda cursor: self._commit_in_thread(cursor, batch, finished)).addCallbacks(
            committed, failed
        ).addBoth(next_batch)

    def _settle_finished(self, finished: builtins.list[_Finished], result: _Committed) -> None:
        """Answer the deliveries of a committed batch once their body files are gone.

        A crash before the unlinks leaves orphans, which the next open removes.
        """

        def answer(outcome: object) -> None:
            if isinstance(outcome, Failure):
                log.failure("could not delete delivered bodies", outcome)
            for one in finished:
                if one.id in result.lost:
                    one.done.errback(LeaseLostError(one.id))
                else:
                    one.done.callback(None)

        self._forget_bodies(result.removed).addBoth(answer)

    def _commit_in_thread(
        self,
        cursor: sqlite3.Cursor,
        batch: builtins.list[_Pending],
        finished: builtins.list[_Finished],
    ) -> _Committed:
        # One directory fsync makes every rename of the batch durable; the
        # renames all happened before the batch was handed over.
        if any(item.name != _INLINE for item in batch):
            _fsync_directory(self.bodies)
        cursor.execute("BEGIN IMMEDIATE")
        # The write lock is ours: from here the batch commits in moments,
        # so what was not withdrawn while it waited for the lock no longer
        # can be (see withdraw).
        withdrawn: set[str] = set()
        with self._seal:
            for item in batch:
                if item.withdrawn:
                    withdrawn.add(item.id)
                else:
                    item.sealed = True
        duplicates: set[str] = set()
        for item in batch:
            if item.withdrawn:
                continue
            envelope = item.envelope
            cursor.execute(
                "INSERT INTO messages (id, sender, recipients, client, user, route, meta,"
                " size, body, queued_at, state, next_attempt)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)"
                " ON CONFLICT (id) DO NOTHING",
                (
                    item.id,
                    envelope.sender,
                    json.dumps(list(envelope.recipients)),
                    envelope.client,
                    envelope.user,
                    envelope.route,
                    envelope.meta,
                    item.size,
                    item.name,
                    item.now,
                    item.now,
                ),
            )
            if cursor.rowcount != 1:
                duplicates.add(item.id)
            elif item.data is not None:
                cursor.execute(
                    "INSERT INTO inline_bodies (message, data) VALUES (?, ?)",
                    (cursor.lastrowid, item.data),
                )
        lost: set[str] = set()
        removed: builtins.list[tuple[int, str | None]] = []
        for one in finished:
            try:
                seq, size, name = _held_by(cursor, one.id, one.owner)
            except LeaseLostError:
                lost.add(one.id)
                continue
            cursor.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            removed.append((size, name))
        return _Committed(duplicates, withdrawn, lost, removed)

    # Work in the threads.

    def _write_body(self, name: str, body: BodySource, size: int) -> None:
        """Copy the body into its file and make it durable (not yet the directory)."""
        temporary = os.path.join(self.bodies, name + _TMP_SUFFIX)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            mapped = storage_error(e, self._wait)
            if mapped is not e:
                raise mapped from e
            raise
        try:
            written = 0
            try:
                for chunk in body.chunks():
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    written += len(chunk)
                if written != size:
                    raise ValueError(f"the body source gave {written} bytes of {size}")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, os.path.join(self.bodies, name))
        except BaseException as e:
            _unlink_all(self.bodies, [name + _TMP_SUFFIX])
            mapped = storage_error(e, self._wait)
            if mapped is not e:
                raise mapped from e
            raise

    def _read_file(self, name: str, size: int) -> bytes:
        """The file's bytes, at most one past C{size}: enough to see it grew, never more."""
        with open(os.path.join(self.bodies, name), "rb") as f:
            return f.read(size + 1)

    def _take_lock(self) -> None:
        """Become the queue's writer: take C{queue.db.lock}, or warn that another process has it."""
        descriptor = os.open(self.path + _LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            # Another relay on this file by mistake (see the module docstring).
            log.warn("queue writer lock held by another process", lock=self.path + _LOCK_SUFFIX)
            return
        except BaseException:
            os.close(descriptor)
            raise
        self._lock = descriptor

    def _release(self) -> None:
        """Give up the writer lock (closing its file releases it)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _open_in_thread(self, cursor: sqlite3.Cursor, now: float) -> tuple[int, int, int, int]:
        if self.writer and not os.path.isdir(self.bodies):
            os.makedirs(self.bodies, mode=0o700, exist_ok=True)
            _fsync_directory(os.path.dirname(os.path.abspath(self.bodies)))
        if self.writer and self._lock is None:
            self._take_lock()
        # Opening may wait the whole timeout for the lock (nothing is being
        # answered yet); the connection's work from then on waits less.
        cursor.execute(f"PRAGMA busy_timeout = {round(self._timeout * 1000)}")
        try:
            cursor.execute("BEGIN IMMEDIATE")
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {round(self._wait * 1000)}")
        version = cursor.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not self.writer:
            raise RuntimeError(f"{self.path} holds no queue (the relay creates it at its start)")
        if version == 0:
            # executescript() would commit the BEGIN above; one statement at
            # a time keeps the schema and its version in one transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cursor.execute(statement)
        elif version == 1:
            cursor.execute(_SCHEMA_2)
        elif version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has queue schema {version}; this smtpproxy knows {SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:
            for table, column, kind in _COLUMNS_3:
                columns = {row[1] for row in cursor.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    cursor.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            cursor.execute(_SCHEMA_4)
            cursor.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        cursor.execute(counters.TABLE)
        cursor.execute("SELECT seq, body FROM messages WHERE body IS NOT NULL AND body != ''")
        rows: dict[str, int] = {str(name): int(seq) for seq, name in cursor.fetchall()}
        present: set[str] = set()
        temporary = orphans = 0
        if self._lock is None:
            # Not the writer: a body without a row may be a live relay's
            # enqueue waiting for its commit.  Leave every file alone.
            return _held(cursor), 0, 0, 0
        for name in os.listdir(self.bodies):
            if name.endswith(_TMP_SUFFIX) and _BODY_NAME.fullmatch(name[: -len(_TMP_SUFFIX)]):
                _unlink_all(self.bodies, [name])
                temporary += 1
            elif _BODY_NAME.fullmatch(name):
                if name in rows:
                    present.add(name)
                else:
                    _unlink_all(self.bodies, [name])
                    orphans += 1
        lost = [seq for name, seq in rows.items() if name not in present]
        cursor.executemany(
            "UPDATE messages SET state = 'dead', body = NULL, last_reply = ?, died_at = ?,"
            " lease_owner = NULL, lease_until = NULL WHERE seq = ?",
            [(LOST_BODY_REPLY, now, seq) for seq in lost],
        )
        return _held(cursor), temporary, orphans, len(lost)

    # Counters (the Graph sending budgets): see smtpproxy.queue.counters.

    def add_counts(
        self, counts: Sequence[tuple[str, int, int]], forget_before: Mapping[str, int]
    ) -> Deferred[None]:
        """Add to counters in one transaction; see L{smtpproxy.queue.store.CounterStore}."""

        def work(cursor: sqlite3.Cursor) -> None:
            cursor.execute("BEGIN IMMEDIATE")
            counters.add(cursor, "?", counts, forget_before)

        return self._run(work)

    def read_counts(
        self, since: Mapping[str, int]
    ) -> Deferred[builtins.list[tuple[str, int, int]]]:
        """Counter rows; see L{smtpproxy.queue.store.CounterStore}."""
        return self._run(lambda cursor: counters.read(cursor, "?", since))

    # Plumbing.

    def _run(self, work: Callable[[sqlite3.Cursor], T], synced: bool = True) -> Deferred[T]:
        """Run C{work} on the database thread; its transaction commits if it returns.

        adbapi hands C{work} a C{Transaction}, which passes every call on to
        an C{sqlite3.Cursor}; the cast says so, since adbapi is unannotated.

        @param synced: False for a transaction whose loss in a power cut is
            harmless (a claim, a lease renewal: the message is simply
            queued again, as it would be once the lease ran out).  Its
            commit then skips the WAL fsync (C{synchronous=NORMAL}); it is
            still in the WAL, safe from a process crash, and the next synced
            commit makes it durable too, since the WAL is written in order.
        """
        if self._pool is None:
            return defer.fail(RuntimeError("the queue store is not open"))
        run = cast(
            "Callable[[Callable[[sqlite3.Cursor], T]], Deferred[T]]", self._pool.runInteraction
        )
        level = _FULL if synced else _NORMAL

        def at_level(cursor: sqlite3.Cursor) -> T:
            # Only the database thread reads or sets _level.  A connection
            # that adbapi replaced starts at FULL: the stale value can then
            # only cause a needless PRAGMA or a synced claim, never the reverse.
            if self._level != level:
                cursor.execute(f"PRAGMA synchronous = {level}")
                self._level = level
            return work(cursor)

        def mapped(failure: Failure) -> Failure:
            # A full, read-only or busy store as its own error (storage_errors).
            error = failure.value
            found = storage_error(error, self._wait) if error is not None else error
            if found is error or found is None:
                return failure
            raise found from error

        return run(at_level).addErrback(mapped)

    def _settle(
        self,
        id: str,
        owner: str,
        attempt: Attempt,
        state: str,
        value: float,
        recipients: Recipients | None,
    ) -> Deferred[None]:
        """Record C{attempt} and end C{owner}'s lease, setting C{state} (a constant).

        C{state} is "state = '...', <column> = ?" and C{value} fills its
        placeholder; both outcomes that keep the message differ only there.
        C{recipients}, if given, replace the envelope's and the failed ones.
        """

        def work(cursor: sqlite3.Cursor) -> None:
            cursor.execute("BEGIN IMMEDIATE")
            seq, _, _ = _held_by(cursor, id, owner)
            _record(cursor, seq, attempt)
            cursor.execute(
                f"UPDATE messages SET {state}, attempts = attempts + 1, last_reply = ?,"  # noqa: S608
                " lease_owner = NULL, lease_until = NULL WHERE seq = ?",
                (value, attempt.reply, seq),
            )
            if recipients is not None:
                cursor.execute(
                    "UPDATE messages SET recipients = ?, failed = ? WHERE seq = ?",
                    (json.dumps(list(recipients.owed)), json.dumps(list(recipients.failed)), seq),
                )

        return self._run(work)

    def _change(
        self, statement: str, parameters: tuple[object, ...], synced: bool = True
    ) -> Deferred[int]:
        """Run one writing statement in its own transaction; how many rows it changed."""

        def work(cursor: sqlite3.Cursor) -> int:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(statement, parameters)
            return cursor.rowcount

        return self._run(work, synced)

    def _in_files(self, work: Callable[[], T]) -> Deferred[T]:
        if self._files is None:
            return defer.fail(RuntimeError("the queue store is not open"))
        return deferToThreadPool(cast(IReactorThreads, self._reactor), self._files, work)

    def _forget_bodies(self, removed: builtins.list[tuple[int, str | None]]) -> Deferred[None]:
        """After the rows' deletion committed: give back their bytes, delete their files.

        A crash before the files go leaves orphans, which the next open removes.
        """
        self.held -= sum(size for size, name in removed if name is not None)
        names = [name for _, name in removed if name]
        if not names:
            return defer.succeed(None)
        return self._in_files(lambda: _unlink_all(self.bodies, names))


def _untyped(method: object) -> None:
    """Call a Twisted method that has no annotations yet (pool start and stop)."""
    cast("Callable[[], None]", method)()


def _existing(path: str) -> str:
    """An SQLite URI that opens C{path} for reading and writing only if it already exists."""
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"


def _prepare_database(path: str, writer: bool) -> builtins.list[tuple[str, int]]:
    """Make sure the database file can be opened as C{writer} wants; its loose files.

    The writer creates C{queue.db} 0600 before SQLite opens it: small
    bodies live in it, and SQLite gives its C{-wal} and C{-shm} files the
    main file's mode.  An existing file keeps its mode (an operator may
    have let a backup group read it); those any user can read are
    returned, for a warning.  Anyone else needs the file to exist.
    """
    if writer:
        # Only created, never opened for writing: SQLite still opens a file
        # it may not write read-only (the readiness check says so).
        return create_private(path, reported=OTHERS)
    if not os.path.exists(path):
        why = "no queue there (check QUEUE_URL; the relay creates it at its start)"
        raise FileNotFoundError(errno.ENOENT, why, path)
    if os.path.getsize(path) == 0:
        # SQLite would write a header into it on the way to reading nothing.
        raise RuntimeError(f"{path} holds no queue (the relay creates it at its start)")
    return exposed(path, reported=OTHERS)


def _configure(connection: sqlite3.Connection) -> None:
    """Every connection: WAL, commits synced to disk, cascades on."""
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")


def _held_by(cursor: sqlite3.Cursor, id: str, owner: str) -> tuple[int, int, str | None]:
    """The message's seq, size and body if C{owner} holds its lease, else L{LeaseLostError}.

    Holding means being the recorded owner of a message still delivering:
    a lease that ran out but that nobody else has claimed is still the
    caller's, since no one else can have started a delivery, and accepting
    its outcome is what keeps a message from being sent twice.
    """
    cursor.execute(
        "SELECT seq, size, body FROM messages"
        " WHERE id = ? AND state = 'delivering' AND lease_owner = ?",
        (id, owner),
    )
    row = cursor.fetchone()
    if row is None:
        raise LeaseLostError(id)
    return int(row[0]), int(row[1]), row[2]


def _due_by_route(
    cursor: sqlite3.Cursor, now: float, limit: int, per_route: int, busy: Mapping[str, int]
) -> builtins.list[builtins.list[tuple[object, ...]]]:
    """Per route with room, its oldest due queued rows (with C{body}), oldest first.

    A claim's cost must not grow with the mail of routes already at their
    cap: while a backlog drains through one mailbox's cap, that route is
    full at nearly every claim, and reading its backlog to skip it row by
    row (inside C{BEGIN IMMEDIATE}) cost 3 ms per 1,000 queued messages per
    claim.  The routes are found by seeking C{messages_route} from one to
    the next (one index seek each, however many messages each has); a full
    route's rows are never read, and a route with room gives at most the
    room it has.  A route's messages not yet due are still stepped over
    (as by the oldest-first scan before this).
    """
    found: builtins.list[builtins.list[tuple[object, ...]]] = []
    route: str | None = None
    while True:
        if route is None:
            cursor.execute(
                "SELECT route FROM messages WHERE state = 'queued' ORDER BY route LIMIT 1"
            )
        else:
            cursor.execute(
                "SELECT route FROM messages WHERE state = 'queued' AND route > ?"
                " ORDER BY route LIMIT 1",
                (route,),
            )
        row = cursor.fetchone()
        if row is None:
            return found
        route = cast(str, row[0])
        room = min(limit, per_route - busy.get(route, 0))
        if room <= 0:
            continue
        cursor.execute(
            f"SELECT {_COLUMNS}, body FROM messages"  # noqa: S608
            " WHERE state = 'queued' AND route = ? AND next_attempt <= ?"
            " ORDER BY queued_at, seq LIMIT ?",
            (route, now, room),
        )
        found.append(cursor.fetchall())


def _age(row: tuple[object, ...]) -> tuple[float, int]:
    """A row's place in the queue: C{queued_at}, then C{seq} (both in L{_COLUMNS})."""
    return cast(float, row[9]), cast(int, row[0])


def _inline_body(cursor: sqlite3.Cursor, seq: int) -> bytes:
    """The body of message C{seq}, kept in C{inline_bodies}."""
    row = cursor.execute("SELECT data FROM inline_bodies WHERE message = ?", (seq,)).fetchone()
    if row is None:
        raise FileNotFoundError(errno.ENOENT, f"the body of message {seq} was lost")
    return bytes(row[0])


def _whole(id: str, data: bytes, size: int) -> bytes:
    """C{data}, if it is as long as the body acknowledged; else L{BodyDamagedError}."""
    if len(data) != size:
        raise BodyDamagedError(id, len(data), size)
    return data


def _record(cursor: sqlite3.Cursor, seq: int, attempt: Attempt) -> None:
    cursor.execute(
        "INSERT INTO attempts (message, at, outcome, reply, request_id, worker, refused)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            seq,
            attempt.at,
            attempt.outcome.value,
            attempt.reply,
            attempt.request_id,
            attempt.worker,
            refused_json(attempt.refused),
        ),
    )


def _entry(
    row: tuple[object, ...],
    *,
    state: State | None = None,
    lease_owner: str | None = None,
    lease_until: float | None = None,
    history: tuple[Attempt, ...] = (),
) -> Entry:
    (
        _seq,
        id,
        sender,
        recipients,
        client,
        user,
        route,
        meta,
        size,
        queued_at,
        stored_state,
        attempts,
        next_attempt,
        last_reply,
        stored_owner,
        stored_until,
        failed,
    ) = cast(
        "tuple[int, str, str, str, str, str | None, str, str, int, float, str, int, float,"
        " str, str | None, float | None, str]",
        row,
    )
    return Entry(
        id=id,
        envelope=Envelope(
            sender=sender,
            recipients=tuple(json.loads(recipients)),
            client=client,
            user=user,
            route=route,
            meta=meta,
        ),
        size=size,
        queued_at=queued_at,
        state=state if state is not None else State(stored_state),
        attempts=attempts,
        next_attempt=next_attempt,
        last_reply=last_reply,
        lease_owner=lease_owner if state is not None else stored_owner,
        lease_until=lease_until if state is not None else stored_until,
        history=history,
        failed=tuple(json.loads(failed)),
    )


def _filesystem_problem(path: str, directories: Sequence[str]) -> tuple[str | None, int]:
    """Whether the queue's files and directories take writes; the least free space among them.

    C{os.access} asks the kernel as the relay's own user, so it sees a
    read-only mount, and an immutable file (C{chattr +i}), even as root,
    where permissions alone would not stop root.  The database and its WAL
    are looked at too: SQLite grants the write lock on a file it can no
    longer write, and fails only at the commit.
    """
    free: int | None = None
    problem: str | None = None
    for directory in directories:
        found = os.statvfs(directory)
        room = found.f_bavail * found.f_frsize
        free = room if free is None else min(free, room)
        if problem is not None:
            continue
        if found.f_flag & os.ST_RDONLY:
            problem = f"read-only filesystem at {directory}"
        elif not os.access(directory, os.W_OK):
            problem = f"cannot write in {directory}"
    for name in (path, path + "-wal"):
        if problem is None and os.path.exists(name) and not os.access(name, os.W_OK):
            problem = f"read-only database: cannot write {name}"
    return problem, free or 0


def _begin_briefly(cursor: sqlite3.Cursor, wait: float, usual: float) -> None:
    """C{BEGIN IMMEDIATE}, waiting at most C{wait} s for the lock; else L{QueueBusyError}."""
    cursor.execute(f"PRAGMA busy_timeout = {round(wait * 1000)}")
    try:
        cursor.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as error:
        raise storage_error(error, wait) from error
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {round(usual * 1000)}")


def _lock_problem(cursor: sqlite3.Cursor, wait_ms: int, usual_ms: int) -> str | None:
    """Take SQLite's write lock within C{wait_ms} and roll back at once; None if it worked."""
    cursor.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        cursor.execute("BEGIN IMMEDIATE")
        cursor.execute("ROLLBACK")
    except sqlite3.Error as error:
        # The primary code: the low byte of an extended one (SQLITE_READONLY_DBMOVED...).
        code = int(getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF
        if code == sqlite3.SQLITE_READONLY:
            return "read-only database"
        if code == sqlite3.SQLITE_BUSY:
            return f"write lock busy: another process held it over {wait_ms} ms"
        return f"database refused a write transaction: {error}"
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {int(usual_ms)}")
    return None


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _held(cursor: sqlite3.Cursor) -> int:
    """Bytes of the bodies the queue holds (counted against its size limit)."""
    cursor.execute("SELECT COALESCE(SUM(size), 0) FROM messages WHERE body IS NOT NULL")
    return int(cursor.fetchone()[0])


def _unlink_all(directory: str, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


def _read_small(body: BodySource, size: int) -> bytes:
    """A small body's bytes, checked against the size it announced."""
    data = b"".join(body.chunks())
    if len(data) != size:
        raise ValueError(f"the body source gave {len(data)} bytes of {size}")
    return data
