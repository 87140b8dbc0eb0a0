"""The PostgreSQL store's write check (L{PostgresStore.writable}) against a real server.

A relay left connected to a server that stores nothing (a standby after a
failover, a database set read-only) still answers every query; only the
write check sees it.  These tests turn read-only on for the whole server
(C{ALTER SYSTEM} and a reload, which the store's open sessions pick up at
their next statement) and off again, in the one test process's own server,
and move a store's connections onto a real hot standby, as a failover
behind one address does.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import make_conninfo
from twisted.internet.endpoints import TCP4ServerEndpoint

from smtpproxy.queue.postgres import PostgresStore, QueueUnavailableError
from tests.queue import pgserver
from tests.queue.test_postgres_store import REACTOR_TCP, CommitCutter, PostgresCase
from tests.queue.test_store_contract import Body, deferLater, envelope
from tests.support import in_thread

T = 1000.0


def set_server_read_only(dsn: str, read_only: bool) -> None:
    """Make every session of the server read-only from its next statement on, or undo it."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as admin:
        # This session itself may already be read-only: it only changes settings.
        admin.execute("SET default_transaction_read_only = off")
        if read_only:
            admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
        admin.execute("SELECT pg_reload_conf()")


class PostgresWritableTests(PostgresCase):
    async def wait_for_problem(self, store: PostgresStore, wanted: bool) -> str | None:
        """The check's finding once it has (or has not) a problem; a reload takes a moment."""
        for _ in range(100):
            found = (await store.writable()).problem
            if (found is not None) == wanted:
                return found
            await deferLater(0.05)
        self.fail(f"the write check never {'failed' if wanted else 'cleared'}")

    async def test_read_only_server_then_writable_again(self) -> None:
        """A primary writable at first; set read-only (the store's sessions stay open), the
        check says "read-only database" and an enqueue really fails; writable again, the
        check clears and the same store enqueues. The server has no disk figure for us."""
        store = await self.opened()
        found = await store.writable()
        self.assertEqual((found.problem, found.free_bytes), (None, None))
        self.addCleanup(set_server_read_only, self.dsn, False)
        await in_thread(set_server_read_only, self.dsn, True)
        problem = await self.wait_for_problem(store, True)
        self.assertEqual(problem, "read-only database: transaction_read_only is on")
        with self.assertRaises(QueueUnavailableError):
            await store.enqueue("refused", envelope(), Body(b"x" * 100), T)
        await in_thread(set_server_read_only, self.dsn, False)
        self.assertIsNone(await self.wait_for_problem(store, False))
        await store.enqueue("stored", envelope(), Body(b"y" * 100), T + 1)
        self.assertEqual((await store.stats(T + 1)).queued, 1)

    async def test_failover_onto_a_standby(self) -> None:
        """A store reaches the primary through one address (a TCP relay, as a virtual IP or
        a DNS name would be); that address then leads to a hot standby and the old
        sessions are cut: the check says "standby in recovery" and enqueues fail; led
        back to the primary, the same store is writable again."""
        primary = self.server
        relay = CommitCutter("127.0.0.1", primary.port)  # never armed: a plain TCP relay
        port = await TCP4ServerEndpoint(REACTOR_TCP, 0, interface="127.0.0.1").listen(relay)
        self.addCleanup(port.stopListening)
        # Last of the clean-ups: the relay closes its server sides 0.3 s after the
        # store's connections went.
        self.addCleanup(deferLater, 0.5)
        via = make_conninfo(self.dsn, host="127.0.0.1", port=port.getHost().port)
        store = self.store(dsn=via)
        await store.open()
        self.assertIsNone((await store.writable()).problem)
        replica = await in_thread(pgserver.standby, primary)
        self.addCleanup(replica.destroy)
        relay.port = replica.port
        await in_thread(cut_sessions, primary.dsn())
        problem = await self.wait_for_problem(store, True)
        self.assertEqual(problem, "read-only database: the server is a standby in recovery")
        with self.assertRaises(QueueUnavailableError):
            await store.enqueue("refused", envelope(), Body(b"x" * 100), T)
        relay.port = primary.port
        await in_thread(cut_sessions, replica.dsn())
        self.assertIsNone(await self.wait_for_problem(store, False))
        await store.enqueue("stored", envelope(), Body(b"y" * 100), T + 1)


def cut_sessions(admin_dsn: str) -> None:
    """End every queue session on the server at C{admin_dsn} (the store reconnects)."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'smtpproxy-queue'"
        )
