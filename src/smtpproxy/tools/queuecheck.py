"""C{smtpproxy doctor}'s queue checks (C{QUEUE_URL}): it opens, takes a write, and is not behind.

The store is the relay's own (L{smtpproxy.queue.backend.make_store}, the
same code for SQLite and PostgreSQL), opened as the relay opens it at
start: that creates the schema of an empty PostgreSQL database or upgrades
an older one, exactly what the relay's next start would do.  It opens it
as a reader (C{writer=False}), so it never tidies files a running relay is
about to commit as crash leftovers.  An SQLite file
that does not exist yet is not created: the check says whether its
directory would let the relay create it.

Writable: one message is enqueued through the store's own durable path
(commit and sync, as for relayed mail) and deleted at once.  It is queued
with a time far in the future, so no delivery worker of a running relay
sharing the store can claim it in between, and its sender and recipient
are in C{.invalid} (RFC 2606), so even a mistake could deliver it nowhere.
Nothing is left behind; a check interrupted between the two steps leaves
one such message, which the report of the next run names.

Then the depth and the oldest message of each state, with warnings past
L{OLDEST_QUEUED_WARNING}, L{BYTES_WARNING} of C{QUEUE_MAX_BYTES}, and for
any dead message.  L{stats_results} is pure, tested without a database.
"""

from __future__ import annotations

import importlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from smtpproxy.queue.backend import make_store
from smtpproxy.queue.command import age
from smtpproxy.queue.model import Envelope, QueueFullError, State
from smtpproxy.queue.store import QueueStore
from smtpproxy.queue.url import parse_queue_url
from smtpproxy.tools.doctor import Context, Result

__all__ = ["BYTES_WARNING", "OLDEST_QUEUED_WARNING", "Depth", "check", "stats_results"]

#: A queued message older than this (seconds) means delivery is behind or failing.
OLDEST_QUEUED_WARNING = 15 * 60
#: The share of C{QUEUE_MAX_BYTES} past which the queue is nearly full.
BYTES_WARNING = 0.8
#: How far ahead the write test's message is due: never, for any worker.
FAR_FUTURE = 100 * 365 * 86400
#: The write test's envelope: addresses nobody can receive mail at.
PROBE_ADDRESS = "smtpproxy-doctor@doctor.invalid"
PROBE_ID_PREFIX = "doctor-"

_SCHEMA_VERSIONS = {
    "sqlite": ("smtpproxy.queue.sqlite", "SCHEMA_VERSION"),
    "postgresql": ("smtpproxy.queue.postgres_sql", "SCHEMA_VERSION"),
}


@dataclass(frozen=True, slots=True)
class Depth:
    """One state's count and the time its oldest message was queued (None when empty)."""

    state: State
    count: int
    oldest: float | None


class _Probe:
    """The write test's body, in memory (L{smtpproxy.queue.model.BodySource})."""

    data = (
        b"From: <" + PROBE_ADDRESS.encode() + b">\r\n"
        b"Subject: smtpproxy doctor write test (deleted at once)\r\n\r\n"
        b"Never delivered.\r\n"
    )

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[bytes]:
        yield self.data


async def check(context: Context) -> list[Result]:
    """The queue's checks; one SKIP line when there is no queue."""
    settings = context.config
    url = settings.queue_url
    if not url:
        return [Result("queue", "SKIP", "no QUEUE_URL: mail is delivered directly, not queued")]
    try:
        kind, target = parse_queue_url(url)
    except ValueError as e:
        return [Result("queue", "FAIL", f"QUEUE_URL: {e}")]
    where = _where(kind, target)
    if kind == "sqlite" and not os.path.exists(target):
        return [_not_created(target)]
    try:
        store = make_store(url, settings.queue_max_bytes, context.reactor, writer=False)
    except ValueError as e:
        return [Result("queue", "FAIL", f"QUEUE_URL: {e}")]
    try:
        await store.open()
    except Exception as e:
        return [Result("queue", "FAIL", f"{where}: cannot open: {_why(e)}")]
    try:
        results = [Result("queue", "PASS", f"{where} opens; schema version {_schema(kind)}")]
        results.append(await _write(store, context.reactor.seconds(), where))
        now = context.reactor.seconds()
        stats = await store.stats(now)
        counts = {State.QUEUED: stats.queued, State.DELIVERING: stats.delivering}
        depths = [
            Depth(state, counts.get(state, stats.dead), await _oldest(store, state))
            for state in State
        ]
        results += stats_results(depths, stats.bytes, settings.queue_max_bytes, now)
    finally:
        await store.close()
    return results


def _where(kind: str, target: str) -> str:
    """How the report names the store, without the password a DSN may hold."""
    if kind == "sqlite":
        return f"sqlite {target}"
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(target)
    except Exception:
        return "postgresql"
    host = info.get("host") or "local socket"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql {host}{port}/{info.get('dbname') or '?'}"


def _not_created(path: str) -> Result:
    """An SQLite queue file that does not exist yet: can the relay create it?"""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
        return Result(
            "queue", "PASS", f"sqlite {path} does not exist yet; the relay will create it"
        )
    return Result(
        "queue",
        "FAIL",
        f"sqlite {path} does not exist and its directory {directory} is missing or not "
        "writable by this user",
    )


def _schema(kind: str) -> int:
    """The schema version an open store holds: open refuses any other, upgrades older ones."""
    module, name = _SCHEMA_VERSIONS[kind]
    version: int = getattr(importlib.import_module(module), name)
    return version


async def _write(store: QueueStore, now: float, where: str) -> Result:
    """Enqueue one message through the durable path and delete it again."""
    leftovers = [
        e.id
        for e in await store.list(State.QUEUED, 1000)
        if e.id.startswith(PROBE_ID_PREFIX) and PROBE_ADDRESS in e.envelope.recipients
    ]
    for old in leftovers:
        await store.delete(old)
    id = PROBE_ID_PREFIX + secrets.token_hex(8)
    envelope = Envelope(PROBE_ADDRESS, (PROBE_ADDRESS,), client="smtpproxy doctor")
    try:
        await store.enqueue(id, envelope, _Probe(), now + FAR_FUTURE)
    except QueueFullError as e:
        return Result("queue", "FAIL", f"{where}: full, new mail is answered 452: {e}")
    except Exception as e:
        return Result("queue", "FAIL", f"{where}: a write failed: {_why(e)}")
    if not await store.delete(id):
        return Result("queue", "FAIL", f"{where}: the write test's message {id} was not removed")
    tidied = f" (removed {len(leftovers)} left by an interrupted run)" if leftovers else ""
    return Result("queue", "PASS", f"{where} is writable: one message stored and removed{tidied}")


async def _oldest(store: QueueStore, state: State) -> float | None:
    """When the oldest message in C{state} was queued (lists come oldest first)."""
    entries = await store.list(state, 1)
    return entries[0].queued_at if entries else None


def stats_results(depths: list[Depth], held: int, max_bytes: int, now: float) -> list[Result]:
    """One line with the depth and oldest age per state, and a line per warning."""
    parts = []
    for depth in depths:
        oldest = "" if depth.oldest is None else f" (oldest {age(now - depth.oldest)})"
        parts.append(f"{depth.count} {depth.state.value}{oldest}")
    results = [Result("queue", "PASS", f"{', '.join(parts)}; {held} of {max_bytes} bytes held")]
    by_state = {d.state: d for d in depths}
    queued = by_state.get(State.QUEUED)
    if queued and queued.oldest is not None and now - queued.oldest > OLDEST_QUEUED_WARNING:
        results.append(
            Result(
                "queue",
                "WARN",
                f"the oldest queued message waits for {age(now - queued.oldest)} (more than "
                f"{age(OLDEST_QUEUED_WARNING)}): delivery is behind or failing; see "
                "smtpproxy queue list",
            )
        )
    dead = by_state.get(State.DEAD)
    if dead and dead.count:
        results.append(
            Result(
                "queue",
                "WARN",
                f"{dead.count} dead messages (given up): smtpproxy queue list --state dead",
            )
        )
    if held > BYTES_WARNING * max_bytes:
        results.append(
            Result(
                "queue",
                "WARN",
                f"{held} of {max_bytes} bytes held ({held / max_bytes:.0%}): new mail is "
                "answered 452 at QUEUE_MAX_BYTES",
            )
        )
    return results


def _why(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
