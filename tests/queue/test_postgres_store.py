"""The PostgreSQL queue store against a real PostgreSQL server (L{tests.queue.pgserver}).

What only PostgreSQL can show is tested here: two stores with their own
connection pools, as two relay processes on two machines would have, claiming
at once; the per-route cap held across both; group commit counted by the
transactions that really inserted the rows; a server that stops, restarts,
hangs or holds a lock answered with a prompt 451-class error, never a hang.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from smtpproxy.queue.model import (
    Attempt,
    BodyDamagedError,
    Outcome,
    QueueFullError,
)
from smtpproxy.queue.postgres import PostgresStore, QueueUnavailableError
from smtpproxy.queue.postgres_sql import SCHEMA_VERSION, SchemaTooNewError
from smtpproxy.queue.store import QueueStore
from smtpproxy.spool import MessageBody
from tests.queue import pgserver
from tests.queue.test_store_contract import Body, FullDiskBody, StoreContract, envelope

T = 1000.0


def attempt(at: float, outcome: Outcome) -> Attempt:
    """A successful or failed attempt as a worker records it."""
    return Attempt(at, outcome, "", "req-1", "worker-test")


REACTOR: IReactorCore = reactor
REACTOR_TIME = cast(IReactorTime, reactor)
REACTOR_TCP = cast(IReactorTCP, reactor)

#: How long a failure against a dead or stuck server may take at most.
PROMPT = 10.0


class PostgresCase(TestCase):
    """A fresh database on this process's server for each test, and stores closed after it."""

    def setUp(self) -> None:
        self.server = pgserver.server()
        self.dsn = self.server.new_database()

    def store(
        self,
        max_bytes: int = 1 << 30,
        dsn: str | None = None,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
    ) -> PostgresStore:
        """A store on this test's database; closed when the test ends."""
        store = PostgresStore(
            dsn or self.dsn,
            max_bytes,
            REACTOR,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
        self.addCleanup(store.close)
        return store

    async def opened(self, max_bytes: int = 1 << 30) -> PostgresStore:
        """A store with its schema in place."""
        store = self.store(max_bytes)
        await store.open()
        return store

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """Rows seen from a connection of the test's own, outside any store."""
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(sql.encode(), args)
            return cursor.fetchall() if cursor.description else []

    async def fill(self, store: PostgresStore, count: int, route: str = "", start: int = 0) -> None:
        """Enqueue C{count} small messages, one second apart from C{1000 + start}."""
        await defer.gatherResults(
            [
                store.enqueue(
                    f"m{start + n:05d}", envelope(route), Body(b"x" * 100), 1000.0 + start + n
                )
                for n in range(count)
            ]
        )


class PostgresContractTests(StoreContract, PostgresCase):
    """Every rule of the QueueStore protocol (L{StoreContract}), against PostgreSQL."""

    async def make_store(self, max_bytes: int | None = None) -> QueueStore:
        """An opened store on this test's database."""
        return await self.opened(max_bytes or self.max_bytes)

    async def reopen(self, store: QueueStore) -> QueueStore:
        """Close C{store}; a new store (a new pool) on the same database."""
        await store.close()
        return await self.make_store()

    def hold_writes(self) -> Callable[[], None]:
        """Lock the messages table from a connection of the test's own."""
        holder = psycopg.connect(self.dsn)
        holder.execute("LOCK TABLE queue_messages IN ACCESS EXCLUSIVE MODE")

        def release() -> None:
            holder.rollback()
            holder.close()

        return release


class StoreTests(PostgresCase):
    """What the contract cannot see: chunk rows, commits by xmin, a batch's refusals."""

    async def test_large_body_in_chunks(self) -> None:
        """A 3.5 MiB body from the relay's spool is stored as four 1 MiB-bounded rows, intact."""
        data = bytes(range(256)) * (3_670_016 // 256)
        body = MessageBody(threshold=1 << 20)
        for start in range(0, len(data), 65536):
            body.write(data[start : start + 65536])
        body.finish()
        self.addCleanup(body.close)
        store = await self.opened()
        await store.enqueue("big", envelope(), body, 1000.0)
        self.assertEqual(
            self.query(
                "SELECT count(*), max(length(data)) FROM queue_body_chunks WHERE id = 'big'"
            ),
            [(4, 1 << 20)],
        )
        self.assertEqual(await store.read_body("big"), data)

    async def test_group_commit(self) -> None:
        """Fifty enqueues at once share two commits, and each fires only once its row is committed.

        The first enqueue starts a commit alone; the 49 that arrive while it
        runs wait and share the next one.  xmin is the id of the transaction
        that inserted a row, so distinct xmins count the commits.
        """
        store = await self.opened()
        seen_committed: list[bool] = []

        def check(_: None, id: str) -> None:
            seen_committed.append(
                bool(self.query("SELECT 1 FROM queue_messages WHERE id = %s", id))
            )

        await defer.gatherResults(
            [
                store.enqueue(f"g{n}", envelope(), Body(b"y" * 10_000), 1000.0 + n).addCallback(
                    check, f"g{n}"
                )
                for n in range(50)
            ]
        )
        self.assertEqual(seen_committed, [True] * 50)
        self.assertEqual(
            self.query("SELECT count(DISTINCT xmin::text) FROM queue_messages"), [(2,)]
        )

    async def test_refusals_leave_nothing(self) -> None:
        """In one batch, a duplicate id, an over-capacity message and an unreadable body fail alone.

        Each gets its own error (KeyError, QueueFullError, OSError), leaves no
        row or chunk behind, and the other messages of the batch are stored.
        """
        store = await self.opened(max_bytes=35_000)
        await store.enqueue("first", envelope(), Body(b"a" * 10_000), 1000.0)
        results = await defer.DeferredList(
            [
                store.enqueue("first", envelope(), Body(b"b" * 10), 1001.0),
                store.enqueue("broken", envelope(), FullDiskBody(b"c" * 12_000, room=5000), 1002.0),
                store.enqueue("fits", envelope(), Body(b"d" * 20_000), 1003.0),
                store.enqueue("over", envelope(), Body(b"e" * 10_000), 1004.0),
            ],
            consumeErrors=True,
        )
        errors = [None if ok else type(cast(Failure, outcome).value) for ok, outcome in results]
        self.assertEqual(errors, [KeyError, OSError, None, QueueFullError])
        self.assertEqual(
            self.query("SELECT id, size FROM queue_messages ORDER BY id"),
            [("first", 10_000), ("fits", 20_000)],
        )
        self.assertEqual(
            self.query("SELECT DISTINCT id FROM queue_body_chunks ORDER BY id"),
            [("first",), ("fits",)],
        )
        self.assertEqual(await store.read_body("first"), b"a" * 10_000)
        self.assertEqual((await store.stats(T)).bytes, 30_000)

    async def test_body_missing_a_chunk_is_refused(self) -> None:
        """A body whose chunk rows no longer add up to the acknowledged size (one deleted
        by hand) fails read_body with BodyDamagedError rather than reading as the message."""
        store = await self.opened()
        await store.enqueue("cut", envelope(), Body(b"z" * 1000, piece=600), 1000.0)
        self.query("DELETE FROM queue_body_chunks WHERE id = 'cut' AND seq = 0")
        with self.assertRaises(BodyDamagedError) as caught:
            await store.read_body("cut")
        error = caught.exception
        self.assertEqual((error.found, error.expected), (400, 1000))

    async def test_oldest_first_and_a_full_route_hides_nothing(self) -> None:
        """Claims come oldest first; a mailbox at its cap does not hide newer mail for others."""
        store = await self.opened()
        await self.fill(store, 60, route="busy@example.com")
        await self.fill(store, 2, route="quiet@example.com", start=100)
        entries = await store.claim("w1", 5000.0, 60.0, 10, 3)
        self.assertEqual(
            [e.id for e in entries], ["m00000", "m00001", "m00002", "m00100", "m00101"]
        )


class ReplicaTests(PostgresCase):
    """Two stores on one database, each with its own pool: two relay processes."""

    async def claim_until_empty(self, store: PostgresStore, owner: str, taken: list[str]) -> None:
        """Claim and deliver until nothing is due, recording what C{owner} took."""
        while entries := await store.claim(owner, 9000.0, 60.0, 7, 1000):
            for entry in entries:
                taken.append(entry.id)
                await store.delivered(entry.id, owner, attempt(T, Outcome.DELIVERED))

    async def test_concurrent_claims_never_share(self) -> None:
        """Two stores, three claim loops each, 300 messages: each is taken exactly once."""
        one, two = await self.opened(), await self.opened()
        await self.fill(one, 300, route="r")
        taken: dict[str, list[str]] = {
            f"{name}{n}": [] for name in ("one", "two") for n in range(3)
        }
        await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(
                    self.claim_until_empty(one if owner.startswith("one") else two, owner, ids)
                )
                for owner, ids in taken.items()
            ]
        )
        every = [id for ids in taken.values() for id in ids]
        self.assertEqual(sorted(every), [f"m{n:05d}" for n in range(300)])
        by_store = {
            name: sum(len(taken[f"{name}{n}"]) for n in range(3)) for name in ("one", "two")
        }
        self.assertTrue(by_store["one"] and by_store["two"], f"both stores took part: {by_store}")

    async def test_route_cap_holds_across_stores(self) -> None:
        """Eight claims at once from two stores never lease more than the route's cap of 3.

        Round after round (each delivering what it leased) until 40 messages
        are through; then leases that expire free their places.
        """
        stores = {"one": await self.opened(), "two": await self.opened()}
        await self.fill(stores["one"], 40, route="mailbox@example.com")
        remaining = 40
        while remaining:
            claims = [
                store.claim(f"{name}{n}", 5000.0, 60.0, 5, 3)
                for name, store in stores.items()
                for n in range(4)
            ]
            leased = [entry for batch in await defer.gatherResults(claims) for entry in batch]
            self.assertIn(len(leased), range(1, 4))
            live = self.query("SELECT count(*) FROM queue_messages WHERE state = 'delivering'")
            self.assertEqual(live, [(len(leased),)])
            for entry in leased:
                assert entry.lease_owner is not None
                store = stores[entry.lease_owner[:3]]
                await store.delivered(entry.id, entry.lease_owner, attempt(T, Outcome.DELIVERED))
            remaining -= len(leased)
        await self.fill(stores["one"], 5, route="mailbox@example.com", start=100)
        self.assertEqual(len(await stores["one"].claim("w1", 6000.0, 60.0, 5, 3)), 3)
        self.assertEqual(await stores["two"].claim("w2", 6059.0, 60.0, 5, 3), [])
        self.assertEqual(len(await stores["two"].claim("w2", 6060.0, 60.0, 5, 3)), 3)

    async def test_concurrent_open(self) -> None:
        """Two processes opening a new database at once both succeed; the schema is made once."""
        await defer.gatherResults([self.store().open(), self.store().open()])
        self.assertEqual(self.query("SELECT version FROM queue_schema"), [(SCHEMA_VERSION,)])

    async def test_version_1_upgraded(self) -> None:
        """A database of schema 1 (before refused recipients were kept) is upgraded at
        open: its messages stay, and partial deliveries can be recorded."""
        store = await self.opened()
        await self.fill(store, 1)
        await store.close()
        self.query("ALTER TABLE queue_messages DROP COLUMN failed")
        self.query("ALTER TABLE queue_attempts DROP COLUMN refused")
        self.query("DELETE FROM queue_schema")
        self.query("INSERT INTO queue_schema (version) VALUES (1)")
        store = await self.opened()
        [entry] = await store.claim("w1", 5000.0, 60.0, 5, 5)
        self.assertEqual(entry.failed, ())
        self.assertEqual(self.query("SELECT max(version) FROM queue_schema"), [(SCHEMA_VERSION,)])

    async def test_newer_schema_refused(self) -> None:
        """A database whose schema is newer than this relay's is refused, not altered."""
        await self.opened()
        self.query("UPDATE queue_schema SET version = version + 1")
        with self.assertRaises(SchemaTooNewError):
            await self.store().open()


class FailureTests(PostgresCase):
    """A server that is down, restarted, silent or locked: a prompt error, then recovery."""

    async def timed_failure(self, operation: defer.Deferred[Any]) -> float:
        """Seconds until C{operation} fails with L{QueueUnavailableError}."""
        started = time.monotonic()
        with self.assertRaises(QueueUnavailableError):
            await operation
        return time.monotonic() - started

    async def test_server_down_then_back(self) -> None:
        """With the server stopped, enqueue and claim fail at once; restarted, the same store works.

        Its pooled connections broke with the restart: the first statement on
        each fails and is run again on a new connection, so the first
        enqueue after the restart already succeeds.
        """
        store = await self.opened()
        await self.fill(store, 3)
        self.addCleanup(self.server.start_if_stopped)
        self.server.stop()
        self.assertLess(
            await self.timed_failure(store.enqueue("down", envelope(), Body(b"d"), 1.0)), PROMPT
        )
        self.assertLess(await self.timed_failure(store.claim("w1", 5000.0, 60.0, 5, 5)), PROMPT)
        self.server.start()
        await store.enqueue("up", envelope(), Body(b"u"), 2000.0)
        self.assertEqual(len(await store.claim("w1", 5000.0, 60.0, 5, 5)), 4)

    async def test_restart_while_idle(self) -> None:
        """A store idle across a server restart goes on as if nothing had happened."""
        store = await self.opened()
        await self.fill(store, 1)
        self.server.stop()
        self.server.start()
        self.assertEqual((await store.stats(T)).queued, 1)

    async def test_silent_server(self) -> None:
        """A server that accepts the connection but never answers fails open in connect_timeout."""
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            store = self.store(dsn=f"postgresql://postgres@127.0.0.1:{port}/db", connect_timeout=2)
            self.assertLess(await self.timed_failure(store.open()), PROMPT)

    async def test_locked_table(self) -> None:
        """A lock held elsewhere fails the enqueue after statement_timeout; then it works again."""
        store = self.store(statement_timeout=1)
        await store.open()
        with psycopg.connect(self.dsn) as locker:
            locker.execute("LOCK TABLE queue_messages IN ACCESS EXCLUSIVE MODE")
            failed = await self.timed_failure(store.enqueue("m1", envelope(), Body(b"l"), 1.0))
            self.assertLess(failed, PROMPT)
        await store.enqueue("m1", envelope(), Body(b"l"), 1.0)
        self.assertEqual((await store.stats(T)).queued, 1)

    async def test_closed_store(self) -> None:
        """After close, calls fail at once instead of waiting on a stopped pool."""
        store = PostgresStore(self.dsn, 1 << 30, REACTOR)
        await store.open()
        await store.close()
        self.assertLess(await self.timed_failure(store.stats(T)), 1.0)
        self.assertLess(
            await self.timed_failure(store.enqueue("m", envelope(), Body(b"c"), 1.0)), 1.0
        )


#: psycopg's COMMIT: a simple Query message ('Q', length 11, "COMMIT\0").
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


class _Upstream(protocol.Protocol):
    """The relay's side towards the real server: what it says goes back to the client."""

    def __init__(self, client: _Cutter) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.connected_upstream(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.from_server(data)

    def connectionLost(self, reason: object = None) -> None:
        self.client.server_gone()


class _Cutter(protocol.Protocol):
    """One client connection through L{CommitCutter}, passed on to the real server."""

    def __init__(self, cutter: CommitCutter) -> None:
        self.cutter = cutter
        self.upstream: ITransport | None = None
        self.early: list[bytes] = []
        self.muted = False
        # This connection is in a transaction that inserts messages (an
        # enqueue's): only its COMMIT is cut, not that of a new connection's
        # session settings.
        self.inserting = False

    def connectionMade(self) -> None:
        endpoint = TCP4ClientEndpoint(REACTOR_TCP, self.cutter.host, self.cutter.port)
        connectProtocol(endpoint, _Upstream(self))

    def connected_upstream(self, upstream: _Upstream) -> None:
        assert upstream.transport is not None
        self.upstream = upstream.transport
        for data in self.early:
            self.upstream.write(data)
        self.early = []

    def from_server(self, data: bytes) -> None:
        if not self.muted and self.transport is not None:
            self.transport.write(data)

    def server_gone(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        armed = self.cutter.armed
        self.inserting = self.inserting or b"INSERT INTO queue_messages" in data
        if armed is not None and self.inserting and COMMIT_MESSAGE in data:
            self.cutter.armed = None
            self.cutter.cut += 1
            self.muted = True
            if armed:
                self.to_server(data)
            # The client hears nothing more; the server gets its EOF a moment later.
            cast(ITCPTransport, self.transport).abortConnection()
            return
        self.to_server(data)

    def to_server(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connectionLost(self, reason: object = None) -> None:
        if self.upstream is not None:
            REACTOR_TIME.callLater(0.3, self.upstream.loseConnection)


class CommitCutter(protocol.Factory):
    """A TCP relay to PostgreSQL that, once armed, cuts the next COMMIT's connection.

    C{armed = True}: the COMMIT reaches the server (which commits) but its
    answer never reaches the store.  C{armed = False}: the COMMIT is
    dropped and the connection cut, so the server rolls the transaction back.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.armed: bool | None = None
        self.cut = 0

    def buildProtocol(self, addr: object) -> _Cutter:
        return _Cutter(self)


class LostCommitAnswerTests(PostgresCase):
    """The connection breaks during COMMIT: the enqueue is answered by what was committed."""

    async def through_cutter(self) -> tuple[PostgresStore, CommitCutter]:
        given = conninfo_to_dict(self.dsn)
        cutter = CommitCutter(str(given.get("host") or "127.0.0.1"), int(given.get("port") or 5432))
        port = await TCP4ServerEndpoint(REACTOR_TCP, 0, interface="127.0.0.1").listen(cutter)
        self.addCleanup(port.stopListening)
        # Last of the clean-ups: the relay closes its server sides 0.3 s
        # after the store's connections went.
        self.addCleanup(task.deferLater, REACTOR_TIME, 0.5, lambda: None)
        dsn = make_conninfo(self.dsn, host="127.0.0.1", port=port.getHost().port)
        store = self.store(dsn=dsn)
        await store.open()
        return store, cutter

    async def test_committed_but_answer_lost_is_250(self) -> None:
        """The COMMIT reached the server and committed; only its answer was lost.  The
        enqueue succeeds (the client hears 250), since a 451 would make the client send
        a message the queue already holds."""
        store, cutter = await self.through_cutter()
        cutter.armed = True
        await store.enqueue("m1", envelope(), Body(b"committed"), 1.0)
        self.assertEqual(cutter.cut, 1)
        self.assertEqual(self.query("SELECT id FROM queue_messages"), [("m1",)])
        await store.enqueue("m2", envelope(), Body(b"after"), 2.0)
        self.assertEqual((await store.stats(T)).queued, 2)

    async def test_commit_that_never_arrived_is_451(self) -> None:
        """The COMMIT never reached the server: the transaction was rolled back, so
        the enqueue fails (451) and nothing is stored."""
        store, cutter = await self.through_cutter()
        cutter.armed = False
        with self.assertRaises(QueueUnavailableError):
            await store.enqueue("m1", envelope(), Body(b"lost"), 1.0)
        self.assertEqual(cutter.cut, 1)
        self.assertEqual(self.query("SELECT id FROM queue_messages"), [])
