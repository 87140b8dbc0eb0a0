"""C{GET /readyz} of the real twistd process when its queue cannot take mail, and after.

Each test starts C{twistd -n smtpproxy} with a queue and the HTTP listener,
breaks the queue the way production does (the write lock held by another
process, the database file no longer writable, a disk too small for the
largest message, C{QUEUE_MAX_BYTES} reached, a PostgreSQL database turned
read-only), and reads the probe with http.client: C{503} with the reason in
C{checks.queue}, then C{200} again once the cause is gone.  The probe
answers from the poller's last look, every few seconds, so each wait is
bounded but not instant.
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from smtpproxy.web.ready import room_needed
from tests.fakegraph import Fault
from tests.queue import pgserver
from tests.queue.readonly import make_unwritable
from tests.queue.test_e2e import QueuedRelay, fake_graph, graph_settings
from tests.support import TIMEOUT, async_test, in_thread, message
from tests.test_twistd import free_port
from tests.web.test_ops import fetch

#: Seconds a change may take to show in the probe (the poller looks every 5 s).
SHOWS_WITHIN = 30.0


def probe(port: int) -> tuple[int, dict[str, Any]]:
    """The probe's status and its JSON body."""
    code, body = fetch(port, "/readyz")
    found: dict[str, Any] = json.loads(body)
    return code, found


def wait_for(port: int, wanted: Callable[[int, dict[str, Any]], bool]) -> tuple[int, str]:
    """Read the probe until C{wanted} holds (bounded); its status and its queue check."""
    deadline = time.monotonic() + SHOWS_WITHIN
    code, body = probe(port)
    while not wanted(code, body) and time.monotonic() < deadline:
        time.sleep(0.2)
        code, body = probe(port)
    return code, str(body["checks"].get("queue"))


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of C{/metrics}, by name."""
    code, text = fetch(port, "/metrics")
    assert code == 200, code
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if not sample.labels
    }


def ready(code: int, body: dict[str, Any]) -> bool:
    return code == 200


def not_ready(code: int, body: dict[str, Any]) -> bool:
    return code == 503


def send_large(relay: QueuedRelay, subject: str, size: int) -> None:
    """One message with a body of C{size} bytes over smtplib, which must hear 250."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        code, reply = client.data(message(subject, "z" * size + "\r\n"))
    assert code == 250, (code, reply)


class SQLiteReadyTests(TestCase):
    timeout = 240

    def relay(self, **settings: str) -> tuple[QueuedRelay, int]:
        http = free_port()
        return QueuedRelay(self, HTTP_LISTEN=f"127.0.0.1:{http}", **settings), http

    @async_test
    async def test_lock_held_then_file_unwritable(self) -> None:
        """Ready with a writable queue (and /metrics says so, with the free space);
        another process holding SQLite's write lock makes it 503, "write lock busy" or
        the write check unanswered while the store's thread waits for that lock (and
        mail still queues once it lets go); the database file made unwritable (chattr +i
        as root) makes it 503 "read-only database"; each time it is 200 again once the
        cause is gone."""
        relay, http = self.relay()
        path = str(relay.dir / "queue.db")
        seen: list[tuple[int, str]] = []
        metrics: dict[str, float] = {}

        def scenario() -> None:
            relay.start()
            seen.append(wait_for(http, ready))
            metrics.update(scrape(http))
            holder = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                holder.execute("BEGIN IMMEDIATE")
                seen.append(wait_for(http, not_ready))
                holder.execute("ROLLBACK")
            finally:
                holder.close()
            seen.append(wait_for(http, ready))
            relay.send("after the lock")
            thaw = make_unwritable([path, path + "-wal"])
            try:
                seen.append(wait_for(http, not_ready))
            finally:
                thaw()
            seen.append(wait_for(http, ready))

        await in_thread(scenario)
        self.assertEqual(metrics["smtpproxy_queue_writable"], 1)
        self.assertGreater(metrics["smtpproxy_queue_disk_free_bytes"], 0)
        # Which of two words the busy lock gets depends on whether the check's turn
        # on the store's one database thread came before the worker's next claim,
        # which then waits for the lock itself (see docs/operations.md, Probes).
        self.assertEqual(seen[1][0], 503)
        self.assertRegex(
            seen[1][1],
            r"write lock busy: another process held it over 250 ms"
            r"|write check: no answer within 10 s",
        )
        self.assertEqual(
            [seen[0], *seen[2:]],
            [
                (200, "ok"),
                (200, "ok"),
                (503, f"read-only database: cannot write {path}"),
                (200, "ok"),
            ],
        )

    @async_test
    async def test_disk_too_small_for_the_largest_message(self) -> None:
        """SMTP_MAX_MESSAGE_SIZE larger than the free space beside the queue: not ready,
        saying how much is free and how much is needed."""
        size = 1 << 50  # a petabyte: no test machine has that free
        relay, http = self.relay(SMTP_MAX_MESSAGE_SIZE=str(size))

        def scenario() -> tuple[int, str]:
            relay.start()
            return wait_for(http, lambda code, body: "disk" in str(body["checks"]["queue"]))

        code, check = await in_thread(scenario)
        self.assertEqual(code, 503)
        need = -(-room_needed(size) // (1 << 20))
        self.assertRegex(check, rf"^disk has \d+ MB free, need {need} MB$")

    @async_test
    async def test_queue_full_by_max_bytes(self) -> None:
        """Graph holds every delivery, so messages stay queued: below QUEUE_MAX_BYTES the
        relay is ready; once less than 64 KiB is left it is 503 "queue full: X of Y
        bytes", the bytes the queue holds."""
        fake = fake_graph(self)
        fake.script("sendMail", *[Fault(delay=120)] * 10)
        relay, http = self.relay(QUEUE_MAX_BYTES="200000", **graph_settings(fake))
        seen: list[tuple[int, str]] = []

        def scenario() -> None:
            relay.start()
            seen.append(wait_for(http, ready))
            for n in range(3):
                send_large(relay, f"big {n}", 50_000)
            seen.append(wait_for(http, not_ready))

        await in_thread(scenario)
        self.assertEqual(seen[0], (200, "ok"))
        self.assertEqual(seen[1][0], 503)
        self.assertRegex(seen[1][1], r"^queue full: 1[5-9]\d{4} of 200000 bytes$")


def set_database_read_only(dsn: str, read_only: bool) -> None:
    """Set the queue's database read-only for new sessions, or not, and cut the sessions
    open on it, as a failover does: the relay reconnects to a server that refuses writes."""
    with psycopg.connect(pgserver.server().dsn(), autocommit=True, connect_timeout=10) as admin:
        name = dsn.rsplit("/", 1)[1]
        value = "on" if read_only else "off"
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )


class PostgresReadyTests(TestCase):
    timeout = 240

    @async_test
    async def test_database_read_only_then_writable(self) -> None:
        """A relay on a PostgreSQL queue: ready; its database turned read-only and its
        sessions cut (a failover onto a server that stores nothing): 503 "read-only
        database"; writable again: 200, and mail queues."""
        server = pgserver.server()
        dsn = await in_thread(server.new_database)
        http = free_port()
        relay = QueuedRelay(self, QUEUE_URL=dsn, HTTP_LISTEN=f"127.0.0.1:{http}")
        self.addCleanup(set_database_read_only, dsn, False)
        seen: list[tuple[int, str]] = []

        def scenario() -> None:
            relay.start()
            seen.append(wait_for(http, ready))
            set_database_read_only(dsn, True)
            seen.append(wait_for(http, not_ready))
            set_database_read_only(dsn, False)
            seen.append(wait_for(http, ready))
            relay.send("after the failover")

        await in_thread(scenario)
        self.assertEqual(
            seen,
            [
                (200, "ok"),
                (503, "read-only database: transaction_read_only is on"),
                (200, "ok"),
            ],
        )
