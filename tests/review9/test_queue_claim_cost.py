"""What one claim costs the SQLite queue when the backlog's route is at its cap.

With one Graph sending mailbox (the common set-up) every queued message has
the same route, and the worker's defaults (QUEUE_CONCURRENCY 20, Graph's
per-mailbox cap GRAPH_MAX_CONCURRENCY 4) leave it room for more while that
route is full, so it claims on every poll, every kick (each enqueue) and each
finished delivery.  The rows are made with sqlite3 in the store's own schema
(a backlog after an outage; enqueueing 40,000 messages would take minutes);
the claims are the store's.
"""

from __future__ import annotations

import os
import sqlite3
import time

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smtpproxy.queue.sqlite import SQLiteStore

ROUTE = "reports@example.com"
NOW = 1_700_000_000.0


class ClaimCostTests(TestCase):
    async def claim_seconds(self, backlog: int) -> float:
        """The fastest of three claims over C{backlog} due messages of a full route."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "queue.db")
        store = SQLiteStore(path, 1 << 40, reactor)
        await store.open()
        await store.close()
        leased = (NOW - 10, "delivering", NOW + 3600, "other-relay")  # the route's cap
        due = (NOW - 5, "queued", None, None)
        common = ("a@example.com", '["b@example.org"]', "", ROUTE, "{}", 100, "")
        rows = [
            (f"{n:024x}", *common, *(leased if n < 4 else due), NOW - 5) for n in range(backlog + 4)
        ]
        with sqlite3.connect(path) as db:
            db.executemany(
                "INSERT INTO messages (id, sender, recipients, client, route, meta, size, body,"
                " queued_at, state, lease_until, lease_owner, next_attempt)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        db.close()
        store = SQLiteStore(path, 1 << 40, reactor)
        await store.open()
        self.addCleanup(store.close)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            claimed = await store.claim("relay-a", NOW, 300, 16, 4)
            best = min(best, time.perf_counter() - started)
            self.assertEqual(claimed, [])  # the route is at its cap: nothing to take
        return best

    async def test_claim_on_a_full_route_does_not_walk_the_whole_backlog(self) -> None:
        """Defect: sqlite.py claim reads every due row, oldest first, and skips those
        whose route is at its cap one by one in Python (the `continue` in its merge loop),
        inside BEGIN IMMEDIATE on the store's only database thread.  When the backlog's
        one route is full, which is the normal state while a backlog drains through
        Graph's per-mailbox cap, each claim walks the entire backlog and takes nothing,
        and the worker claims on every poll, enqueue and finished delivery: the cost per
        message grows with the backlog (quadratic to drain it) while holding the write
        lock that enqueues and delivery records wait behind.  The PostgreSQL claim
        excludes full routes from its next pages (postgres_sql.claim); this one does not.

        Correct: a claim's cost does not grow with the number of due messages of routes
        already at their cap (exclude them in the query, or stop once every route seen
        is full): 40 times the backlog costs about the same, here under 5 times."""
        small = await self.claim_seconds(1_000)
        large = await self.claim_seconds(40_000)
        self.assertLess(
            large,
            5 * max(small, 0.002),
            f"a claim took {small * 1000:.1f} ms over 1,000 due messages of a full route"
            f" and {large * 1000:.1f} ms over 40,000",
        )
