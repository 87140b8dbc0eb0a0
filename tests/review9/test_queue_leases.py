"""Leases of the durable queue's worker: who may deliver a message, and when.

The worker runs on a L{twisted.internet.task.Clock} (the time it reads for
leases and due times); the store is the real SQLite one on the real
reactor's threads.  The provider records each message it is handed and
answers only when the test says (a Graph request still on the wire).
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.queue.front import QueueFront
from smtpproxy.queue.model import Envelope
from smtpproxy.queue.policy import Schedule
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.queue.worker import QueueRunner, RunnerSettings
from smtpproxy.spool import MessageBody
from tests.support import RecordingProvider, message

T0 = 1_700_000_000.0
SETTINGS = RunnerSettings(
    concurrency=4,
    per_route=4,
    lease_time=30.0,
    schedule=Schedule(min_interval=60.0, max_interval=600.0, max_age=86400.0),
    dead_retention=86400.0,
    shutdown_timeout=10.0,
    poll_interval=5.0,
    purge_interval=600.0,
)


class LeaseCase(TestCase):
    async def setup_queue(self) -> tuple[SQLiteStore, Clock, str]:
        """A real SQLite queue holding one acknowledged message; the worker's clock; its id."""
        directory = self.mktemp()
        os.makedirs(directory)
        store = SQLiteStore(os.path.join(directory, "queue.db"), 1 << 30, reactor)
        await store.open()
        self.addCleanup(store.close)
        clock = Clock()
        clock.advance(T0)
        front = QueueFront(store, clock, kick=lambda: None)
        body = MessageBody()
        body.write(message("Invoice"))
        id = front.new_id()
        await front.enqueue(id, Envelope("a@example.com", ("b@example.org",)), body)
        return store, clock, id

    def runner(
        self, store: SQLiteStore, clock: Clock, provider: RecordingProvider, owner: str
    ) -> QueueRunner:
        runner = QueueRunner(
            store, provider, clock, MessageParser(clock), SETTINGS, owner=owner, rand=lambda: 0.0
        )
        runner.startService()
        return runner

    async def settle(self) -> None:
        """Let the store's thread answer what the worker asked (claims, renewals, outcomes)."""
        for _ in range(10):
            await deferLater(reactor, 0.02, lambda: None)


class LeaseTests(LeaseCase):
    async def test_worker_never_claims_a_message_it_is_still_delivering(self) -> None:
        """Defect: when this process's own lease runs out while its delivery is still in
        flight (the process stalled, or the clock stepped forward, for longer than
        QUEUE_LEASE_TIME, so the renewal could not run in time), the next poll claims the
        same message again (sqlite.py claim takes expired 'delivering' rows, whoever held
        them) and worker.py _start hands it to the provider a second time, beside the
        first attempt, which is still running and will succeed.  The recipient gets two
        copies, though no attempt failed and no process died; the worker even overwrites
        its own inflight entry for the id.

        Correct: a worker never starts a second attempt of a message it is delivering
        itself (it skips ids in its inflight set, or its claim excludes them and its
        renewal takes the lease back): one send to the provider."""
        store, clock, id = await self.setup_queue()
        provider = RecordingProvider()
        on_the_wire: defer.Deferred[None] = defer.Deferred()
        provider.outcomes.append(on_the_wire)
        runner = self.runner(store, clock, provider, "relay-a")
        self.addCleanup(runner.stopService)
        await self.settle()
        self.assertEqual(len(provider.emails), 1)
        # The process stalls (or the clock steps) past the lease while the request is out.
        clock.advance(SETTINGS.lease_time + 1)
        await self.settle()
        on_the_wire.callback(None)
        await self.settle()
        self.assertEqual(
            [e.subject for e in provider.emails],
            ["Invoice"],
            "the same worker sent a message it was still delivering a second time",
        )
        self.assertIsNone(await store.show(id))

    async def test_shutdown_does_not_hand_an_inflight_delivery_to_another_replica(
        self,
    ) -> None:
        """Defect: stopping a worker whose delivery is still on the wire after
        SMTP_SHUTDOWN_TIMEOUT gives its lease back (worker.py _stop calls store.release
        while self.inflight is not empty, and never cancels the attempt), so the message is
        due at once for another replica sharing the queue, which sends it while the first
        request is still running.  When Graph then answers the first request with 202 the
        message has been delivered twice, though no process crashed: the duplicate is not
        the documented gap (a crash between Graph's 202 and the commit) but one the
        shutdown makes itself.

        Correct: a lease whose attempt may still reach the backend is not handed to anyone
        before that attempt has ended (cancel the attempt and keep, or let run out, the
        lease of one that may have reached the backend; release only leases of messages
        not yet sent): the message is sent once."""
        store, clock, _ = await self.setup_queue()
        provider_a, provider_b = RecordingProvider(), RecordingProvider()
        on_the_wire: defer.Deferred[None] = defer.Deferred()
        provider_a.outcomes.append(on_the_wire)
        replica_a = self.runner(store, clock, provider_a, "relay-a")
        await self.settle()
        self.assertEqual(len(provider_a.emails), 1)
        stopping = replica_a.stopService()
        clock.advance(SETTINGS.shutdown_timeout)
        await self.settle()
        self.assertTrue(stopping.called)
        replica_b = self.runner(store, clock, provider_b, "relay-b")
        self.addCleanup(replica_b.stopService)
        await self.settle()
        on_the_wire.callback(None)  # Graph's 202 for replica A's request
        await self.settle()
        self.assertEqual(
            len(provider_a.emails) + len(provider_b.emails),
            1,
            "a message whose request was still on the wire was sent again by another replica",
        )
