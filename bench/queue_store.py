"""Enqueue throughput of the SQLite queue store alone: no SMTP, just durable writes.

C{--concurrency} callers (50 by default, the sessions of C{make bench}'s
parallel scenario) each enqueue C{--size}-byte messages (10 KB) one after
another until C{--messages} are stored; every enqueue waits for its commit,
as the SMTP side must before it answers 250.  Prints messages per second and
commits per message (group commit at work: below 1.0 means batches), as one
JSON object, for each concurrency given.

The store writes into C{--dir} (a fresh temporary directory under it,
removed afterwards), which must be on the disk being measured: a tmpfs would
make every fsync free.

  .venv/bin/python bench/queue_store.py
  .venv/bin/python bench/queue_store.py --concurrency 1 50 --messages 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from smtpproxy.queue.model import Envelope
from smtpproxy.queue.sqlite import SQLiteStore

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


async def measure(
    reactor: IReactorTime, directory: str, concurrency: int, messages: int, size: int
) -> dict[str, float]:
    work = tempfile.mkdtemp(prefix="queue-bench-", dir=directory)
    try:
        store = SQLiteStore(os.path.join(work, "queue.db"), 1 << 40, reactor)
        await store.open()
        data = os.urandom(size)
        numbers = iter(range(messages))

        async def caller() -> None:
            for n in numbers:
                await store.enqueue(f"m{n}", ENVELOPE, Body(data), reactor.seconds())

        started = time.perf_counter()
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(caller()) for _ in range(concurrency)]
        )
        elapsed = time.perf_counter() - started
        commits = store.commits
        await store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "concurrency": concurrency,
        "messages": messages,
        "size": size,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(messages / elapsed, 1),
        "commits_per_message": round(commits / messages, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    options = parser.parse_args()

    async def run(reactor: IReactorTime) -> None:
        for concurrency in options.concurrency:
            result = await measure(
                reactor, options.dir, concurrency, options.messages, options.size
            )
            print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
