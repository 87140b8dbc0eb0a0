"""The PostgreSQL queue's schema and transactions, as plain DB-API code.

Each function here is one transaction's work: it takes a psycopg cursor,
runs its statements and returns a value; L{smtpproxy.queue.postgres} runs it
in a pool thread and commits it.  Nothing here knows about Twisted, so every
rule of the store (leases, route caps, capacity) reads top to bottom.

Tables:

  - C{queue_schema}: the schema's version (L{SCHEMA_VERSION});
  - C{queue_messages}: one row per message, envelope, state and lease;
  - C{queue_body_chunks}: the body in pieces of at most 1 MiB, keyed by
    (message id, sequence number), inserted in the message's own
    transaction straight from L{smtpproxy.queue.model.BodySource.chunks};
  - C{queue_attempts}: every recorded delivery attempt, for C{queue show}.

Times are the callers' POSIX seconds (C{reactor.seconds()}), so replicas
sharing a database must keep their clocks in step (NTP); a lease is judged
by the clock of whoever looks at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from smtpproxy.queue import counters
from smtpproxy.queue.model import (
    Attempt,
    BodyDamagedError,
    BodySource,
    Entry,
    Envelope,
    LeaseLostError,
    Outcome,
    QueueFullError,
    Recipients,
    State,
    Stats,
    Writability,
    refused_from_json,
    refused_json,
)

SCHEMA_VERSION = 2
"""Version 2 added the recipients refused by partial deliveries (L{SCHEMA_2})."""

#: The first key of each advisory lock taken here, keeping them apart from
#: other applications' locks in the same database ("QUEU", "QUEV").
LOCK_SPACE_SCHEMA = 0x51554555
LOCK_SPACE_ROUTE = 0x51554556

#: Pages of due candidates one claim looks through at most.
CLAIM_PAGES = 20
_CLAIM_PAGE_MIN = 16

Cursor = psycopg.Cursor[TupleRow]

SCHEMA = """
CREATE TABLE queue_messages (
    id text PRIMARY KEY,
    sender text NOT NULL,
    recipients text[] NOT NULL,
    client text NOT NULL,
    auth_user text,
    route text NOT NULL,
    meta text NOT NULL,
    size bigint NOT NULL,
    queued_at double precision NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'delivering', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,
    last_reply text NOT NULL DEFAULT '',
    lease_owner text,
    lease_until double precision,
    died_at double precision
);
CREATE INDEX queue_messages_age ON queue_messages (queued_at, id) WHERE state <> 'dead';
CREATE INDEX queue_messages_leases ON queue_messages (route, lease_until)
    WHERE state = 'delivering';
CREATE INDEX queue_messages_owner ON queue_messages (lease_owner) WHERE state = 'delivering';
CREATE INDEX queue_messages_dead ON queue_messages (died_at) WHERE state = 'dead';
CREATE TABLE queue_body_chunks (
    id text NOT NULL REFERENCES queue_messages (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (id, seq)
);
CREATE TABLE queue_attempts (
    n bigserial PRIMARY KEY,
    id text NOT NULL REFERENCES queue_messages (id) ON DELETE CASCADE,
    at double precision NOT NULL,
    outcome text NOT NULL,
    reply text NOT NULL,
    request_id text,
    worker text NOT NULL
);
CREATE INDEX queue_attempts_message ON queue_attempts (id, n);
"""

#: Per attempt, the recipients refused while others got the message (JSON,
#: L{refused_json}); per message, those refused for good.
SCHEMA_2 = """
ALTER TABLE queue_messages ADD COLUMN IF NOT EXISTS failed text[] NOT NULL DEFAULT '{}';
ALTER TABLE queue_attempts ADD COLUMN IF NOT EXISTS refused text NOT NULL DEFAULT '[]';
"""

_COLUMNS = sql.SQL(
    "id, sender, recipients, client, auth_user, route, meta, size, queued_at,"
    " state, attempts, next_attempt, last_reply, lease_owner, lease_until, failed"
)


class SchemaTooNewError(Exception):
    """The database holds a queue schema newer than this relay understands."""


class Pending(Protocol):
    """What L{insert_batch} needs of one waiting enqueue."""

    @property
    def id(self) -> str: ...
    @property
    def envelope(self) -> Envelope: ...
    @property
    def body(self) -> BodySource: ...
    @property
    def now(self) -> float: ...


def entry(row: TupleRow, history: tuple[Attempt, ...] = ()) -> Entry:
    """An L{Entry} from a row of C{_COLUMNS}."""
    (id, sender, recipients, client, user, route, meta, size, queued_at) = row[:9]
    (state, attempts, next_attempt, last_reply, lease_owner, lease_until, failed) = row[9:]
    return Entry(
        id=id,
        envelope=Envelope(sender, tuple(recipients), client, user, route, meta),
        size=size,
        queued_at=queued_at,
        state=State(state),
        attempts=attempts,
        next_attempt=next_attempt,
        last_reply=last_reply,
        lease_owner=lease_owner,
        lease_until=lease_until,
        history=history,
        failed=tuple(failed),
    )


def _scalar(cursor: Cursor) -> int:
    """The first column of the one row a query returned, as an int."""
    row = cursor.fetchone()
    assert row is not None  # every caller's query returns exactly one row
    return int(row[0])


def open_schema(cursor: Cursor) -> None:
    """Create the schema, or check its version.

    A transaction-level advisory lock makes two processes opening a new
    database at once take turns (C{CREATE TABLE IF NOT EXISTS} alone can
    still collide in the catalog).
    """
    cursor.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SPACE_SCHEMA,))
    cursor.execute("CREATE TABLE IF NOT EXISTS queue_schema (version integer NOT NULL)")
    row = cursor.execute("SELECT max(version) FROM queue_schema").fetchone()
    version = row[0] if row is not None else None
    if version is None:
        cursor.execute(SCHEMA.encode())
    elif version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the queue's schema is version {version}; this relay knows {SCHEMA_VERSION}"
        )
    if version is None or version < SCHEMA_VERSION:
        cursor.execute(SCHEMA_2.encode())
        cursor.execute("INSERT INTO queue_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
    # Added after schema 1 was released: created where it is missing.
    cursor.execute(counters.TABLE)


def insert_batch(
    cursor: Cursor, batch: Sequence[Pending], max_bytes: int
) -> list[BaseException | None]:
    """Insert a group commit's messages; one outcome each, None for stored.

    A message refused (a duplicate id, over capacity, an unreadable body)
    leaves no row behind and does not spoil the others.  Capacity is the sum
    of sizes at the start of this transaction plus what it adds: replicas
    committing at the same moment may overshoot it by one batch each.
    """
    cursor.execute("SELECT coalesce(sum(size), 0) FROM queue_messages")
    used = _scalar(cursor)
    outcomes: list[BaseException | None] = []
    for pending in batch:
        size = pending.body.size
        if used + size > max_bytes:
            outcomes.append(QueueFullError(f"the queue holds {used} of {max_bytes} bytes"))
            continue
        envelope = pending.envelope
        cursor.execute(
            "INSERT INTO queue_messages (id, sender, recipients, client, auth_user, route,"
            " meta, size, queued_at, state, next_attempt)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'queued', %s)"
            " ON CONFLICT (id) DO NOTHING",
            (
                pending.id,
                envelope.sender,
                list(envelope.recipients),
                envelope.client,
                envelope.user,
                envelope.route,
                envelope.meta,
                size,
                pending.now,
                pending.now,
            ),
        )
        if cursor.rowcount != 1:
            outcomes.append(KeyError(pending.id))
            continue
        try:
            for seq, chunk in enumerate(pending.body.chunks()):
                cursor.execute(
                    "INSERT INTO queue_body_chunks (id, seq, data) VALUES (%s, %s, %s)",
                    (pending.id, seq, chunk),
                )
        except OSError as error:
            cursor.execute("DELETE FROM queue_messages WHERE id = %s", (pending.id,))
            outcomes.append(error)
            continue
        used += size
        outcomes.append(None)
    return outcomes


def stored_ids(cursor: Cursor, ids: Sequence[str]) -> set[str]:
    """Which of C{ids} are committed messages, once no open transaction holds one of them.

    After a connection broke during C{COMMIT}, the server may still be
    finishing that transaction.  A plain SELECT could miss rows it is about
    to commit; an insert of the same keys with C{ON CONFLICT DO NOTHING}
    waits for any transaction that inserted them and is still open
    (bounded by C{lock_timeout}), then conflicts exactly with the rows that
    exist.  The probe rows are rolled back, never kept.
    """
    cursor.execute(
        "INSERT INTO queue_messages (id, sender, recipients, client, route, meta, size,"
        " queued_at, state, next_attempt)"
        " SELECT id, '', '{}', '', '', '{}', 0, 0, 'dead', 0 FROM unnest(%s::text[]) AS id"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        (list(ids),),
    )
    absent = {str(row[0]) for row in cursor.fetchall()}
    cursor.connection.rollback()
    return set(ids) - absent


def claim(
    cursor: Cursor, owner: str, now: float, lease: float, limit: int, per_route: int
) -> list[Entry]:
    """Lease up to C{limit} due messages, oldest first, within each route's cap.

    Due candidates are read oldest first with C{FOR UPDATE SKIP LOCKED}, so
    two processes claiming at once never see the same row.  A route's cap
    must count the leases other processes are granting at this very moment,
    so the count is taken under a transaction-level advisory lock on the
    route: its holder counts the live leases and adds its own before it
    commits, and the commit releases the lock.  A claim waits for the first
    route lock it needs (so replicas sharing one mailbox take turns instead
    of coming back empty) and only tries the others
    (C{pg_try_advisory_xact_lock}), leaving a route that another process is
    claiming right now to that process: a claim that holds a lock never
    waits, so two claims cannot deadlock over the order in which they meet
    routes.  Advisory locks need no routes table kept in step with the
    messages and vanish with a dead connection; two routes whose hashes
    collide merely take turns.

    A route that is full (or busy) is excluded from the following pages, so
    a backlog for one mailbox does not hide due mail for the others.
    """
    chosen: list[str] = []
    room: dict[str, int] = {}
    closed: list[str] = []
    after: tuple[float, str] = (float("-inf"), "")
    for _ in range(CLAIM_PAGES):
        page = max(limit - len(chosen), _CLAIM_PAGE_MIN)
        rows = cursor.execute(
            "SELECT id, route, queued_at FROM queue_messages"
            " WHERE ((state = 'queued' AND next_attempt <= %(now)s)"
            " OR (state = 'delivering' AND lease_until <= %(now)s))"
            " AND (queued_at, id) > (%(at)s, %(id)s) AND route <> ALL(%(closed)s)"
            " ORDER BY queued_at, id LIMIT %(page)s FOR UPDATE SKIP LOCKED",
            {"now": now, "at": after[0], "id": after[1], "closed": closed, "page": page},
        ).fetchall()
        for id, route, queued_at in rows:
            after = (queued_at, id)
            if route in closed:
                continue
            if route not in room:
                room[route] = _route_room(cursor, route, now, per_route, wait=not room)
            if room[route] > 0:
                chosen.append(id)
                room[route] -= 1
            if room[route] <= 0:
                closed.append(route)
            if len(chosen) == limit:
                break
        if len(chosen) == limit or len(rows) < page:
            break
    if not chosen:
        return []
    cursor.execute(
        sql.SQL(
            "UPDATE queue_messages SET state = 'delivering', lease_owner = %s, lease_until = %s"
            " WHERE id = ANY(%s) RETURNING {}"
        ).format(_COLUMNS),
        (owner, now + lease, chosen),
    )
    return sorted((entry(row) for row in cursor.fetchall()), key=lambda e: (e.queued_at, e.id))


def _route_room(cursor: Cursor, route: str, now: float, per_route: int, wait: bool) -> int:
    """How many more leases C{route} may take, under its lock (waited for or only tried).

    0 when the lock was only tried and another process holds it.
    """
    if wait:
        cursor.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE_ROUTE, route))
    else:
        cursor.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))::integer",
            (LOCK_SPACE_ROUTE, route),
        )
        if not _scalar(cursor):
            return 0
    cursor.execute(
        "SELECT count(*) FROM queue_messages"
        " WHERE route = %s AND state = 'delivering' AND lease_until > %s",
        (route, now),
    )
    return per_route - _scalar(cursor)


def _held(cursor: Cursor, query: sql.SQL, values: dict[str, object]) -> None:
    """Run an update guarded by C{id} and C{owner}; L{LeaseLostError} if it matched nothing."""
    cursor.execute(
        sql.SQL("{} WHERE id = %(id)s AND lease_owner = %(owner)s AND state = 'delivering'").format(
            query
        ),
        values,
    )
    if cursor.rowcount != 1:
        raise LeaseLostError(values["id"])


def renew(cursor: Cursor, id: str, owner: str, until: float) -> None:
    """Move C{owner}'s lease on C{id} to C{until}."""
    _held(
        cursor,
        sql.SQL("UPDATE queue_messages SET lease_until = %(until)s"),
        {"id": id, "owner": owner, "until": until},
    )


def delivered(cursor: Cursor, id: str, owner: str) -> None:
    """Remove a delivered message with its body and history."""
    _held(cursor, sql.SQL("DELETE FROM queue_messages"), {"id": id, "owner": owner})


def record(
    cursor: Cursor,
    id: str,
    owner: str,
    attempt: Attempt,
    next_attempt: float | None,
    recipients: Recipients | None = None,
) -> None:
    """Record a failed attempt: queued again at C{next_attempt}, or dead if that is None.

    C{recipients}, if given, replace the envelope's and the failed ones.
    """
    values: dict[str, object] = {
        "id": id,
        "owner": owner,
        "reply": attempt.reply,
        "next": next_attempt,
        "at": attempt.at,
    }
    _held(
        cursor,
        sql.SQL(
            "UPDATE queue_messages SET attempts = attempts + 1, last_reply = %(reply)s,"
            " lease_owner = NULL, lease_until = NULL,"
            " state = CASE WHEN %(next)s::float8 IS NULL THEN 'dead' ELSE 'queued' END,"
            " next_attempt = coalesce(%(next)s::float8, next_attempt),"
            " died_at = CASE WHEN %(next)s::float8 IS NULL THEN %(at)s ELSE NULL END"
        ),
        values,
    )
    if recipients is not None:
        cursor.execute(
            "UPDATE queue_messages SET recipients = %s, failed = %s WHERE id = %s",
            (list(recipients.owed), list(recipients.failed), id),
        )
    cursor.execute(
        "INSERT INTO queue_attempts (id, at, outcome, reply, request_id, worker, refused)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            id,
            attempt.at,
            str(attempt.outcome),
            attempt.reply,
            attempt.request_id,
            attempt.worker,
            refused_json(attempt.refused),
        ),
    )


def release(cursor: Cursor, owner: str, keep: list[str]) -> int:
    """Give back every lease C{owner} holds but those of C{keep}; how many."""
    cursor.execute(
        "UPDATE queue_messages SET state = 'queued', lease_owner = NULL, lease_until = NULL"
        " WHERE lease_owner = %s AND state = 'delivering' AND id <> ALL(%s)",
        (owner, keep),
    )
    return cursor.rowcount


def read_body(cursor: Cursor, id: str) -> bytes:
    """The body joined from its chunks; KeyError if there is no such message.

    L{BodyDamagedError} when the chunks do not add up to the size
    acknowledged (rows lost or removed by hand): never a body other than
    the one accepted.
    """
    cursor.execute("SELECT size FROM queue_messages WHERE id = %s", (id,))
    found = cursor.fetchone()
    if found is None:
        raise KeyError(id)
    size = int(found[0])
    cursor.execute("SELECT data FROM queue_body_chunks WHERE id = %s ORDER BY seq", (id,))
    data = b"".join(bytes(row[0]) for row in cursor)
    if len(data) != size:
        raise BodyDamagedError(id, len(data), size)
    return data


def entries(cursor: Cursor, state: State | None, limit: int) -> list[Entry]:
    """Messages oldest first, all or in one state."""
    cursor.execute(
        sql.SQL(
            "SELECT {} FROM queue_messages WHERE (%(state)s::text IS NULL OR state = %(state)s)"
            " ORDER BY queued_at, id LIMIT %(limit)s"
        ).format(_COLUMNS),
        {"state": None if state is None else str(state), "limit": max(0, limit)},
    )
    return [entry(row) for row in cursor.fetchall()]


def show(cursor: Cursor, id: str) -> Entry | None:
    """One message with its attempts, oldest first; None if there is none."""
    cursor.execute(sql.SQL("SELECT {} FROM queue_messages WHERE id = %s").format(_COLUMNS), (id,))
    row = cursor.fetchone()
    if row is None:
        return None
    cursor.execute(
        "SELECT at, outcome, reply, request_id, worker, refused FROM queue_attempts"
        " WHERE id = %s ORDER BY n",
        (id,),
    )
    history = tuple(
        Attempt(
            at=at,
            outcome=Outcome(outcome),
            reply=reply,
            request_id=rid,
            worker=worker,
            refused=refused_from_json(refused),
        )
        for at, outcome, reply, rid, worker, refused in cursor.fetchall()
    )
    return entry(row, history)


def retry(cursor: Cursor, id: str | None, now: float) -> int:
    """Make one message no live lease holds, or every dead one (C{id} None), queued and due.

    A dead message starts its age again (C{queued_at}), so it has a whole
    C{QUEUE_MAX_AGE} of retries before it; see L{smtpproxy.queue.store}.
    """
    cursor.execute(
        "UPDATE queue_messages SET state = 'queued', next_attempt = %(now)s, died_at = NULL,"
        " queued_at = CASE WHEN state = 'dead' THEN %(now)s ELSE queued_at END,"
        " lease_owner = NULL, lease_until = NULL"
        " WHERE (%(id)s::text IS NULL AND state = 'dead')"
        " OR (id = %(id)s AND (state <> 'delivering' OR lease_until <= %(now)s))",
        {"id": id, "now": now},
    )
    return cursor.rowcount


def delete(cursor: Cursor, id: str, now: float) -> int:
    """Remove a message unless a live lease holds it; 1 if removed."""
    cursor.execute(
        "DELETE FROM queue_messages WHERE id = %s AND (state <> 'delivering' OR lease_until <= %s)",
        (id, now),
    )
    return cursor.rowcount


def stats(cursor: Cursor, now: float) -> Stats:
    """Counts by state, bytes held, the oldest live message's arrival.

    A lease that ran out before C{now} counts as queued (L{claim} takes it).
    """
    row = cursor.execute(
        "SELECT count(*) FILTER (WHERE state = 'queued'"
        " OR (state = 'delivering' AND lease_until <= %(now)s)),"
        " count(*) FILTER (WHERE state = 'delivering' AND lease_until > %(now)s),"
        " count(*) FILTER (WHERE state = 'dead'),"
        " coalesce(sum(size), 0),"
        " min(queued_at) FILTER (WHERE state <> 'dead')"
        " FROM queue_messages",
        {"now": now},
    ).fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    queued, delivering, dead, held, oldest = row
    return Stats(int(queued), int(delivering), int(dead), int(held), oldest)


def purge_dead(cursor: Cursor, before: float) -> int:
    """Remove messages that died before C{before}; how many."""
    cursor.execute("DELETE FROM queue_messages WHERE state = 'dead' AND died_at < %s", (before,))
    return cursor.rowcount


def writable(cursor: Cursor) -> Writability:
    """Whether this session may write: not a standby, not a read-only transaction.

    After a failover a relay whose connection string still leads to the old
    primary (now a standby in recovery), or to a database or server set to
    C{default_transaction_read_only}, stores nothing: every enqueue fails.
    Asked in the session the enqueues use, in a transaction like theirs.
    """
    row = cursor.execute(
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
    ).fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    recovering, read_only = row
    if recovering:
        return Writability("read-only database: the server is a standby in recovery")
    if read_only == "on":
        return Writability("read-only database: transaction_read_only is on")
    return Writability(None)
