"""The queue in PostgreSQL, shared by every relay process that names the same database.

Everything lives in the database, bodies included, so any replica on any
machine can deliver any message, and a message is durable exactly when its
transaction has committed (with the server's default C{synchronous_commit =
on}, the commit returns once the WAL is flushed).  The schema and each
transaction's statements are in L{smtpproxy.queue.postgres_sql}; this module
runs them off the reactor and gathers enqueues into group commits.

The SQL runs in C{twisted.enterprise.adbapi}'s threads through psycopg 3: a
plain DB-API 2 driver, kept by the PostgreSQL community, with a binary wheel
(no libpq to build on the relay's image), which adbapi drives unchanged.  No
Twisted-native PostgreSQL driver is kept as well.

Failures the front door must answer with C{451} (server down, connection
lost, a statement over its time limit) come out as L{QueueUnavailableError},
a L{smtpproxy.errors.TransientDeliveryError}; a full disk on the server
(SQLSTATE 53100) as L{smtpproxy.queue.model.QueueFullError} (C{452}).
Nothing waits forever: connecting is bounded by C{connect_timeout}, each
statement by C{statement_timeout} and C{lock_timeout}, and a server that
vanished without a word by TCP keepalives and C{tcp_user_timeout}.
"""

from __future__ import annotations

import builtins
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar, cast

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.python.failure import Failure

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.queue import counters
from smtpproxy.queue import postgres_sql as tx
from smtpproxy.queue.model import (
    Attempt,
    BodySource,
    EnqueueWithdrawnError,
    Entry,
    Envelope,
    QueueFullError,
    Recipients,
    State,
    Stats,
    Writability,
)

#: Enqueues committed together at most; more wait for the next commit.
BATCH_MAX = 256

P = ParamSpec("P")
T = TypeVar("T")


class QueueUnavailableError(TransientDeliveryError):
    """The queue's database cannot be reached or did not answer in time: answer 451.

    The driver's own error is chained (C{__cause__}) for the log; the text
    here is what a client may see, so it names nothing about the server.
    """

    def __init__(self) -> None:
        super().__init__("Queue temporarily unavailable, try again later", "4.3.0")


class CommitUnknownError(QueueUnavailableError):
    """The connection broke during C{COMMIT}: the transaction may have committed or not.

    Answered like any L{QueueUnavailableError} (451), except by the group
    commit, which first looks for its rows (L{tx.stored_ids}): a message
    whose row is there is answered 250, since the client would otherwise
    send it again and it would be delivered twice.
    """


@dataclass
class _Pending:
    """One enqueue waiting for its group commit.

    @ivar withdrawn: L{PostgresStore.withdraw} stopped it; its row, if
        already inserted, is deleted before the commit.
    @ivar sealed: its transaction is about to commit: too late to withdraw.
        Both flags change under the store's C{_seal} lock only.
    """

    id: str
    envelope: Envelope
    body: BodySource
    now: float
    done: Deferred[None] = field(default_factory=Deferred)
    withdrawn: bool = False
    sealed: bool = False
    inserted: bool = False
    """Its row is in the batch's transaction (set in the pool thread before the commit)."""


def _insert_sealed(
    cursor: tx.Cursor, batch: Sequence[_Pending], max_bytes: int, seal: threading.Lock
) -> list[BaseException | None]:
    """Insert a batch, then seal it: what was withdrawn meanwhile is deleted, the rest commits.

    Runs in the pool thread right before L{_in_thread}'s commit, so a
    message is withdrawable for as long as its body streams in and its
    statements wait for the server; after the seal only the COMMIT is left.
    """
    chosen = [p for p in batch if not p.withdrawn]
    inserted = tx.insert_batch(cursor, chosen, max_bytes)
    outcome = {id(p): result for p, result in zip(chosen, inserted, strict=True)}
    with seal:
        for pending in batch:
            if not pending.withdrawn:
                pending.sealed = True
    for pending in batch:
        pending.inserted = not pending.withdrawn and outcome.get(id(pending), KeyError()) is None
    gone = [p.id for p in chosen if p.withdrawn and outcome[id(p)] is None]
    if gone:
        cursor.execute("DELETE FROM queue_messages WHERE id = ANY(%s)", (gone,))
    return [EnqueueWithdrawnError(p.id) if p.withdrawn else outcome[id(p)] for p in batch]


class _Link:
    """The connection adbapi hands one call: this thread's psycopg connection.

    Installed as the pool's C{connectionFactory}.  adbapi's own wrapper,
    asked to reconnect, logs a traceback for each lost connection; this one
    drops a broken connection quietly, so that the thread's next call
    connects afresh, and lets the driver's error through to become
    L{QueueUnavailableError}.
    """

    def __init__(self, pool: adbapi.ConnectionPool) -> None:
        self._pool = pool
        self.raw: psycopg.Connection[TupleRow] | None = pool.connect()

    def connection(self) -> psycopg.Connection[TupleRow]:
        """This thread's connection, a new one if the last was dropped."""
        if self.raw is None:
            self.raw = self._pool.connect()
        return self.raw

    def drop(self) -> None:
        """Close this thread's connection and forget it."""
        if self.raw is not None:
            raw, self.raw = self.raw, None
            self._pool.disconnect(raw)

    def commit(self) -> None:
        """adbapi's commit after a call: nothing left to do, L{_in_thread} committed."""
        if self.raw is not None and not self.raw.closed:
            self.raw.commit()

    def rollback(self) -> None:
        """Roll back after a failure; a connection that cannot is dropped, not reported."""
        if self.raw is None:
            return
        if self.raw.closed:
            self.drop()
            return
        try:
            self.raw.rollback()
        except psycopg.Error:
            self.drop()


def _in_thread(
    link: _Link,
    work: Callable[Concatenate[tx.Cursor, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run C{work} as one transaction on this thread's connection, and commit it.

    A connection that broke while idle (the server restarted, a proxy cut
    it) fails at its first statement.  Nothing of the transaction can have
    committed then, so the work runs once more on a new connection.  A
    failure at C{COMMIT} is never repeated: that commit may have happened
    (L{CommitUnknownError}).
    """
    for last in (False, True):
        raw = link.connection()
        try:
            with raw.cursor() as cursor:
                result = work(cursor, *args, **kwargs)
        except psycopg.OperationalError:
            if last or not raw.closed:
                raise
            link.drop()
            continue
        try:
            raw.commit()
        except psycopg.OperationalError as error:
            raise CommitUnknownError() from error
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _translate(failure: Failure) -> Failure:
    """Driver errors become the queue's: a full server disk 452, the rest 451."""
    error = failure.value
    if isinstance(error, psycopg.errors.DiskFull):
        full = QueueFullError("the queue database's disk is full")
        full.__cause__ = error
        return Failure(full)
    if isinstance(error, psycopg.Error):
        down = QueueUnavailableError()
        down.__cause__ = error
        return Failure(down)
    return failure


class PostgresStore:
    """A L{smtpproxy.queue.store.QueueStore} in a PostgreSQL database.

    @param dsn: a libpq connection string or C{postgresql://} URI; any libpq
        parameter it names (C{connect_timeout}, C{sslmode}, ...) wins over
        the defaults set here.
    @param max_bytes: the sum of stored sizes past which enqueues fail with
        L{QueueFullError}; replicas committing at the same moment may
        overshoot it by one batch each (see L{tx.insert_batch}).
    @param pool_size: connections (and threads) this process uses at most;
        one of them commits enqueues, the others serve the workers.
    @param statement_timeout: seconds one statement may run, waiting for
        locks included, before it fails and the caller answers 451.
    @ivar commits: enqueue transactions committed so far; with group commit
        it grows more slowly than the number of messages.
    """

    def __init__(
        self,
        dsn: str,
        max_bytes: int,
        reactor: IReactorCore,
        *,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
    ) -> None:
        self._clock = cast(IReactorTime, reactor)
        self._max_bytes = max_bytes
        self._statement_ms = max(1, round(statement_timeout * 1000))
        defaults: dict[str, str | int] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            # A server that vanished mid-statement (a dead host, a cut
            # network) is given up on after about this many milliseconds.
            "tcp_user_timeout": max(1000, self._statement_ms),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "smtpproxy-queue",
        }
        given = conninfo_to_dict(dsn)
        extra = {key: value for key, value in defaults.items() if key not in given}
        self._conninfo = make_conninfo(dsn, **extra)
        self._reactor = reactor
        self._pool_size = pool_size
        self._pool = self._new_pool()
        self.commits = 0
        self._pending: list[_Pending] = []
        # Enqueues in flight by id, for withdraw(); the lock guards the
        # withdrawn and sealed flags, which the commit thread reads too.
        self._inflight: dict[str, _Pending] = {}
        self._seal = threading.Lock()
        self._committing = False
        self._closing = False
        self._closed = False
        self._busy = 0
        self._idle: list[Deferred[None]] = []

    def _new_pool(self) -> adbapi.ConnectionPool:
        """A pool of at most C{pool_size} connections, each in a thread of its own."""
        pool = adbapi.ConnectionPool(
            "psycopg",
            conninfo=self._conninfo,
            cp_min=1,
            cp_max=self._pool_size,
            cp_openfun=self._configure,
            cp_reactor=self._reactor,
            cp_noisy=False,
        )
        # adbapi documents connectionFactory as "any callable" taking the pool.
        pool.connectionFactory = cast("type[adbapi.Connection]", _Link)
        return pool

    def _configure(self, connection: psycopg.Connection[TupleRow]) -> None:
        """Session limits for every new connection (in a pool thread).

        Set here rather than in the DSN's C{options}, so that a connection
        pooler that refuses startup options still passes them on.
        """
        limit = f"{self._statement_ms}ms"
        try:
            connection.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                (limit, limit, f"{2 * self._statement_ms}ms"),
            )
            connection.commit()
        except BaseException:
            connection.close()
            raise

    def _run(
        self,
        work: Callable[Concatenate[tx.Cursor, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run C{work(cursor, ...)} as one transaction in the pool; driver errors translated."""
        if self._closed:
            return fail(QueueUnavailableError())
        self._busy += 1
        done = cast("Deferred[T]", self._pool.runWithConnection(_in_thread, work, *args, **kwargs))
        done.addErrback(_translate)
        done.addBoth(self._finished)
        return done

    def _finished(self, result: T) -> T:
        """One call fewer in flight."""
        self._busy -= 1
        self._wake_closer()
        return result

    def _wake_closer(self) -> None:
        """Let a waiting L{close} go on once no call or commit is left."""
        if self._busy == 0 and not self._committing and not self._pending:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def open(self) -> Deferred[None]:
        """Create or check the schema; two processes opening at once take turns.

        Bodies are written in their message's transaction, so a crash never
        leaves a partial body behind: there is nothing to tidy.  A closed
        store may be opened again.
        """
        if self._closed:
            self._pool = self._new_pool()
            self._closed = self._closing = False
        return self._run(tx.open_schema)

    def close(self) -> Deferred[None]:
        """Refuse new enqueues, let pending commits and calls finish, close the connections."""
        if self._closed:
            return succeed(None)
        self._closing = True
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        self._wake_closer()
        waiter.addCallback(self._close_pool)
        return waiter

    def _close_pool(self, _: None) -> None:
        """Stop the pool's threads (idle by now) and close its connections."""
        if not self._closed:
            self._closed = True
            self._pool.close()

    # The front door: group commit.

    def enqueue(self, id: str, envelope: Envelope, body: BodySource, now: float) -> Deferred[None]:
        """Store a message; fires after the commit that holds it, maybe shared with others.

        One transaction commits at a time; enqueues arriving meanwhile wait
        and go together into the next one, so under load one commit (one WAL
        flush) serves many messages, and none is answered before its own.
        """
        pending = _Pending(id, envelope, body, now)
        if self._closing:
            pending.done.errback(QueueUnavailableError())
            return pending.done
        if id not in self._inflight:
            self._inflight[id] = pending
            pending.done.addBoth(self._settled, pending)
        self._pending.append(pending)
        if not self._committing:
            self._commit_pending()
        return pending.done

    def _settled(self, result: T, pending: _Pending) -> T:
        if self._inflight.get(pending.id) is pending:
            del self._inflight[pending.id]
        return result

    def withdraw(self, id: str) -> bool:
        """Stop the enqueue of C{id} unless its transaction is about to commit.

        Waiting for its batch, it is answered at once; in a batch under
        way (its body streaming, a statement waiting for a lock), its row
        is deleted again before that batch commits, and it is answered
        with the batch.
        """
        pending = self._inflight.get(id)
        if pending is None:
            return False
        with self._seal:
            if pending.sealed:
                return False
            pending.withdrawn = True
        if pending in self._pending:
            self._pending.remove(pending)
            pending.done.errback(EnqueueWithdrawnError(id))
            self._wake_closer()
        return True

    def _commit_pending(self) -> None:
        """Commit what waits (up to L{BATCH_MAX} messages) in one transaction."""
        batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
        self._committing = True
        done = self._run(_insert_sealed, batch, self._max_bytes, self._seal)
        done.addBoth(self._committed, batch)

    def _committed(
        self, outcome: list[BaseException | None] | Failure, batch: list[_Pending]
    ) -> None:
        """Answer each enqueue of a finished commit, then start the next commit."""
        if isinstance(outcome, Failure) and outcome.check(CommitUnknownError):
            candidates = [p.id for p in batch if p.inserted]
            if candidates:
                # Still committing: the next batch waits for this answer.
                looked = self._run(tx.stored_ids, candidates)
                looked.addBoth(self._looked_up, batch, outcome)
                return
        self._answer(outcome, batch)

    def _looked_up(self, stored: set[str] | Failure, batch: list[_Pending], lost: Failure) -> None:
        """After a commit whose answer was lost: 250 for the rows that are there, 451 else."""
        if isinstance(stored, Failure):
            self._answer(lost, batch)
            return
        self.commits += 1 if stored else 0
        for pending in batch:
            if pending.inserted and pending.id in stored:
                pending.done.callback(None)
            else:
                pending.done.errback(lost)
        self._next_commit()

    def _answer(self, outcome: list[BaseException | None] | Failure, batch: list[_Pending]) -> None:
        """Answer each enqueue of a finished commit."""
        if not isinstance(outcome, Failure):
            self.commits += 1
        for index, pending in enumerate(batch):
            if isinstance(outcome, Failure):
                pending.done.errback(outcome)
            elif (error := outcome[index]) is not None:
                pending.done.errback(error)
            else:
                pending.done.callback(None)
        self._next_commit()

    def _next_commit(self) -> None:
        """Start the next group commit, or let a waiting close go on."""
        self._committing = False
        if self._pending:
            self._commit_pending()
        else:
            self._wake_closer()

    # The delivery workers.

    def claim(
        self, owner: str, now: float, lease: float, limit: int, per_route: int
    ) -> Deferred[list[Entry]]:
        """Lease up to C{limit} due messages to C{owner}; see L{tx.claim} for how."""
        if limit <= 0 or per_route <= 0:
            return succeed([])
        return self._run(tx.claim, owner, now, lease, limit, per_route)

    def renew(self, id: str, owner: str, until: float) -> Deferred[None]:
        """Extend C{owner}'s lease on C{id}; L{LeaseLostError} if it is no longer C{owner}'s."""
        return self._run(tx.renew, id, owner, until)

    def read_body(self, id: str) -> Deferred[bytes]:
        """The stored body; KeyError if there is no such message."""
        return self._run(tx.read_body, id)

    def delivered(self, id: str, owner: str, attempt: Attempt) -> Deferred[None]:
        """Remove the message, its body and its history, if C{owner} still holds it."""
        return self._run(tx.delivered, id, owner)

    def deferred(
        self,
        id: str,
        owner: str,
        attempt: Attempt,
        next_attempt: float,
        recipients: Recipients | None = None,
    ) -> Deferred[None]:
        """Record a temporary failure and put the message back until C{next_attempt}."""
        return self._run(tx.record, id, owner, attempt, next_attempt, recipients)

    def dead(
        self, id: str, owner: str, attempt: Attempt, recipients: Recipients | None = None
    ) -> Deferred[None]:
        """Record the last attempt and keep the message, dead, with its history."""
        return self._run(tx.record, id, owner, attempt, None, recipients)

    def release(self, owner: str, keep: Sequence[str] = ()) -> Deferred[int]:
        """Give back every lease C{owner} holds but those of C{keep}; how many."""
        return self._run(tx.release, owner, builtins.list(keep))

    # Counters (the Graph sending budgets): see smtpproxy.queue.counters.

    def add_counts(
        self, counts: Sequence[tuple[str, int, int]], forget_before: Mapping[str, int]
    ) -> Deferred[None]:
        """Add to counters in one transaction, atomically per row (C{n = n + amount})."""
        return self._run(counters.add, "%s", counts, forget_before)

    def read_counts(
        self, since: Mapping[str, int]
    ) -> Deferred[builtins.list[tuple[str, int, int]]]:
        """Counter rows; see L{smtpproxy.queue.store.CounterStore}."""
        return self._run(counters.read, "%s", since)

    # The operator.

    def list(self, state: State | None, limit: int) -> Deferred[list[Entry]]:
        """Messages oldest first, all or in one state."""
        return self._run(tx.entries, state, limit)

    def show(self, id: str) -> Deferred[Entry | None]:
        """One message with its attempts; None if there is none."""
        return self._run(tx.show, id)

    def retry(self, id: str, now: float) -> Deferred[bool]:
        """Make a queued or dead message due now; False if there is none or a lease holds it."""
        return self._run(tx.retry, id, now).addCallback(bool)

    def retry_dead(self, now: float) -> Deferred[int]:
        """Make every dead message queued and due now; how many."""
        return self._run(tx.retry, None, now)

    def delete(self, id: str) -> Deferred[bool]:
        """Remove a message no live lease holds; False if absent or held."""
        return self._run(tx.delete, id, self._clock.seconds()).addCallback(bool)

    def stats(self, now: float) -> Deferred[Stats]:
        """Counts by state (a lease expired at C{now} as queued), bytes, the oldest arrival."""
        return self._run(tx.stats, now)

    def purge_dead(self, before: float) -> Deferred[int]:
        """Remove messages that died before C{before}; how many."""
        return self._run(tx.purge_dead, before)

    # The readiness probe.

    def writable(self) -> Deferred[Writability]:
        """Whether this relay's session may write (see L{tx.writable}); no disk figure.

        Bounded by the session's C{statement_timeout} like every call; the
        server's free space is the server's to watch (a full disk there
        fails enqueues with 452, SQLSTATE 53100).
        """
        return self._run(tx.writable)
