"""Enqueue throughput of a queue store alone (SQLite, or PostgreSQL): no SMTP, just durable writes.

C{--concurrency} callers (50 by default, the sessions of C{make bench}'s
parallel scenario) each enqueue C{--size}-byte messages (10 KB) one after
another until C{--messages} are stored; every enqueue waits for its commit,
as the SMTP side must before it answers 250.  Prints messages per second and
commits per message (group commit at work: below 1.0 means batches), as one
JSON object, for each concurrency given.

The store writes into C{--dir} (a fresh temporary directory under it,
removed afterwards), which must be on the disk being measured: a tmpfs would
make every fsync free.

With C{--postgresql DSN} (a server where the DSN's user may create
databases) the PostgreSQL store is measured instead, in a database the bench
creates and drops again; it then also measures claiming: two stores (two
connection pools, as two relay processes) with C{--claimers} loops each,
claiming C{--claim-limit} messages at a time and marking them delivered,
until the queue is empty.

  .venv/bin/python bench/queue_store.py
  .venv/bin/python bench/queue_store.py --concurrency 1 50 --messages 2000
  .venv/bin/python bench/queue_store.py --postgresql postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import cast

import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorCore, IReactorTime

from smtpproxy.queue.model import Attempt, Envelope, Outcome
from smtpproxy.queue.postgres import PostgresStore
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.queue.store import QueueStore

ENVELOPE = Envelope(sender="bench@example.com", recipients=("to@example.org",), route="bench")


class Body:
    """A fixed body handed out in one piece, like a small in-memory MessageBody."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[bytes]:
        yield self.data


async def fill(
    reactor: IReactorTime,
    store: SQLiteStore | PostgresStore,
    concurrency: int,
    messages: int,
    size: int,
) -> dict[str, float]:
    """Enqueue C{messages} from C{concurrency} callers; the figures."""
    data = os.urandom(size)
    numbers = iter(range(messages))
    before = store.commits

    async def caller() -> None:
        for n in numbers:
            await store.enqueue(f"m{n}", ENVELOPE, Body(data), reactor.seconds())

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(caller()) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    commits = store.commits - before
    return {
        "concurrency": concurrency,
        "messages": messages,
        "size": size,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(messages / elapsed, 1),
        "commits_per_message": round(commits / messages, 3),
    }


async def measure(
    reactor: IReactorTime, directory: str, concurrency: int, messages: int, size: int
) -> dict[str, float | str]:
    work = tempfile.mkdtemp(prefix="queue-bench-", dir=directory)
    try:
        store = SQLiteStore(os.path.join(work, "queue.db"), 1 << 40, reactor)
        await store.open()
        result = await fill(reactor, store, concurrency, messages, size)
        await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"store": "sqlite", **result}


async def drain(reactor: IReactorTime, store: QueueStore, owner: str, limit: int) -> int:
    """Claim and deliver until nothing is due; how many claims it took."""
    claims = 0
    while entries := await store.claim(owner, reactor.seconds(), 60.0, limit, 1 << 30):
        claims += 1
        for entry in entries:
            done = Attempt(reactor.seconds(), Outcome.DELIVERED, worker=owner)
            await store.delivered(entry.id, owner, done)
    return claims


async def measure_postgresql(
    reactor: IReactorCore, dsn: str, options: argparse.Namespace
) -> list[dict[str, float | str]]:
    """Enqueue for each concurrency, then claim with two stores; in a scratch database."""
    name = f"smtpproxy_bench_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    scratch = make_conninfo(dsn, dbname=name)
    results: list[dict[str, float | str]] = []
    stores = [PostgresStore(scratch, 1 << 40, reactor, pool_size=4) for _ in range(2)]
    try:
        for store in stores:
            await store.open()
        clock = cast(IReactorTime, reactor)
        for concurrency in options.concurrency:
            with psycopg.connect(scratch, autocommit=True) as cleaner:
                cleaner.execute("TRUNCATE queue_messages CASCADE")
            filled = await fill(clock, stores[0], concurrency, options.messages, options.size)
            results.append({"store": "postgresql", **filled})
        started = time.perf_counter()
        claims = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(drain(clock, store, f"s{s}w{w}", options.claim_limit))
                for s, store in enumerate(stores)
                for w in range(options.claimers)
            ]
        )
        elapsed = time.perf_counter() - started
        results.append(
            {
                "store": "postgresql",
                "claim": f"2 stores x {options.claimers} loops, limit {options.claim_limit}",
                "messages": options.messages,
                "seconds": round(elapsed, 3),
                "delivered_per_second": round(options.messages / elapsed, 1),
                "claims_per_second": round(sum(claims) / elapsed, 1),
            }
        )
    finally:
        for store in stores:
            await store.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"'.encode())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--postgresql", metavar="DSN", help="measure PostgreSQL on this server")
    parser.add_argument("--claimers", type=int, default=4, help="claim loops per store")
    parser.add_argument("--claim-limit", type=int, default=10)
    options = parser.parse_args()

    async def run(reactor: IReactorCore) -> None:
        if options.postgresql:
            for line in await measure_postgresql(reactor, options.postgresql, options):
                print(json.dumps(line), flush=True)
            return
        for concurrency in options.concurrency:
            result = await measure(
                cast(IReactorTime, reactor),
                options.dir,
                concurrency,
                options.messages,
                options.size,
            )
            print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
