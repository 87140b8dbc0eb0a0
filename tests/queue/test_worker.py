"""The queue's delivery worker on a Clock: claiming, outcomes, leases, shutdown.

The provider is the backend double of L{tests.support.RecordingProvider};
the parser and the delivery pipeline are the real ones.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers.result import Handover, PartlyRefused, RecipientRefusal, SendCancelledError
from smtpproxy.queue.front import QueueFront, meta_json
from smtpproxy.queue.model import Envelope, Outcome, Refused, State
from smtpproxy.queue.policy import Schedule
from smtpproxy.queue.worker import QueueRunner, RunnerSettings, _Flight
from smtpproxy.spool import InflightBudget, MessageBody
from tests.queue.memory import MemoryStore
from tests.support import RecordingProvider, message

T0 = 1_700_000_000.0
SETTINGS = RunnerSettings(
    concurrency=2,
    per_route=3,
    lease_time=30.0,
    schedule=Schedule(min_interval=60.0, max_interval=600.0, max_age=3600.0),
    dead_retention=86400.0,
    shutdown_timeout=10.0,
    poll_interval=5.0,
    purge_interval=600.0,
)


def body(data: bytes) -> MessageBody:
    b = MessageBody()
    b.write(data)
    return b


class WorkerCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.provider = RecordingProvider()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def runner(self, **changes: Any) -> QueueRunner:
        runner = QueueRunner(
            self.store,
            self.provider,
            self.clock,
            MessageParser(self.clock),
            dataclasses.replace(SETTINGS, **changes),
            owner="test-worker",
            rand=lambda: 0.0,
        )
        self.front = QueueFront(self.store, self.clock, kick=runner.kick)
        return runner

    def queue(self, subject: str = "Hello", meta: str = "{}", route: str = "") -> str:
        id = self.front.new_id()
        envelope = Envelope("a@example.com", ("b@example.org",), "192.0.2.7", None, route, meta)
        self.successResultOf(self.front.enqueue(id, envelope, body(message(subject))))
        self.clock.advance(0.001)  # distinct queued_at, so age order is well defined
        return id

    def logged(self, text: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_format") == text]


class OutcomeTests(WorkerCase):
    def test_delivered_once_and_removed(self) -> None:
        """A queued message reaches the provider once, leaves the queue, and the delivered
        line carries queue time and attempts."""
        runner = self.runner()
        runner.startService()
        id = self.queue("Report")
        self.clock.advance(0)
        self.assertEqual([e.subject for e in self.provider.emails], ["Report"])
        self.assertEqual(self.provider.emails[0].envelope_to, ("b@example.org",))
        self.assertEqual(self.store.entries, {})
        [line] = self.logged("message delivered")
        self.assertEqual((line["id"], line["attempts"]), (id, 1))
        self.assertGreaterEqual(line["queue_time_s"], 0)
        self.clock.advance(60)
        self.assertEqual(len(self.provider.emails), 1)

    def test_temporary_failure_is_retried_after_the_backoff(self) -> None:
        """A 451 records the attempt, waits QUEUE_RETRY_MIN_INTERVAL, then delivers."""
        self.provider.outcomes.append(TransientDeliveryError("Graph down", "4.4.5"))
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.attempts), (State.QUEUED, 1))
        self.assertEqual(entry.history[0].outcome, Outcome.DEFERRED)
        self.assertEqual(entry.history[0].reply, "451 4.4.5 Graph down")
        [deferred] = self.logged("message delivery deferred")
        self.assertEqual((deferred["id"], deferred["retry_in_s"]), (id, 60.0))
        self.clock.advance(55)
        self.assertEqual(len(self.provider.emails), 1)
        self.clock.advance(5)
        self.assertEqual(len(self.provider.emails), 2)
        self.assertEqual(self.store.entries, {})
        [line] = self.logged("message delivered")
        self.assertEqual(line["attempts"], 2)

    def test_retry_after_and_request_id_recorded(self) -> None:
        """The provider's Retry-After sets the next attempt, its request id the history."""
        error = TransientDeliveryError("throttled", "4.4.5")
        error.retry_after = 300.0
        error.request_id = "req-1"
        self.provider.outcomes.append(error)
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        entry = self.store.entries[id]
        self.assertEqual(entry.next_attempt, self.clock.seconds() + 300)
        self.assertEqual(entry.history[0].request_id, "req-1")

    def test_permanent_failure_is_dead_and_logged_as_error(self) -> None:
        """A 5xx makes the message dead at once, kept with its history, logged at error."""
        self.provider.outcomes.append(PermanentDeliveryError("no such user", "5.1.1", 550))
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        entry = self.store.entries[id]
        self.assertEqual(entry.state, State.DEAD)
        self.assertEqual(entry.history[0].outcome, Outcome.FAILED)
        [dead] = self.logged("message dead")
        self.assertEqual((dead["id"], dead["reply"]), (id, "550 5.1.1 no such user"))
        self.assertEqual(dead["log_level"].name, "error")
        self.clock.advance(3600)
        self.assertEqual(len(self.provider.emails), 1)

    def test_too_old_is_dead(self) -> None:
        """Temporary failures until the next try would pass QUEUE_MAX_AGE: dead, expired."""
        self.provider.outcomes.extend(TransientDeliveryError("down") for _ in range(10))
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        for _ in range(70):
            self.clock.advance(60)
        entry = self.store.entries[id]
        self.assertEqual(entry.state, State.DEAD)
        outcomes = [a.outcome for a in entry.history]
        self.assertEqual(outcomes, [Outcome.DEFERRED] * (len(outcomes) - 1) + [Outcome.EXPIRED])
        # Waits of 60, 120, 240, 480 s, then 600 s: the last attempt is the one
        # after which 600 s more would pass the hour.
        last = entry.history[-1].at - entry.queued_at
        self.assertTrue(3000 < last <= 3600, last)
        self.assertEqual(len(self.provider.emails), len(outcomes))
        self.assertEqual(len(outcomes), 9)

    def test_retried_expired_message_gets_a_new_max_age(self) -> None:
        """An expired (dead) message retried by the operator starts its age again: its next
        temporary failure is deferred for another try, not expired at once."""
        self.provider.outcomes.extend(TransientDeliveryError("down") for _ in range(10))
        runner = self.runner()
        runner.startService()
        id = self.queue()
        for _ in range(70):
            self.clock.advance(60)
        self.assertEqual(self.store.entries[id].history[-1].outcome, Outcome.EXPIRED)
        self.assertTrue(self.successResultOf(self.store.retry(id, self.clock.seconds())))
        self.clock.advance(runner.settings.poll_interval)
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.history[-1].outcome), (State.QUEUED, Outcome.DEFERRED))
        self.assertEqual(len(self.provider.emails), 10)

    def test_dsn_parameters_reach_the_provider(self) -> None:
        """The DSN parameters kept in meta are on the Email the provider gets."""
        dsn = Dsn("HDRS", "env-1", (RecipientDsn("b@example.org", ("FAILURE",), None),))
        runner = self.runner()
        runner.startService()
        self.queue(meta=meta_json(dsn))
        self.clock.advance(0)
        self.assertEqual(self.provider.emails[0].dsn, dsn)

    def test_bound_mailbox_reaches_the_provider(self) -> None:
        """A queued message's mailbox (kept in meta) is on the Email the worker sends, so
        a restart between queueing and sending still sends as the identity's mailbox;
        one queued before mailboxes were kept (DSN-only meta) sends with none."""
        dsn = Dsn("HDRS", "env-1", ())
        runner = self.runner()
        runner.startService()
        self.queue(meta=meta_json(None, "billing@contoso.example"))
        self.queue(meta='{"dsn":{"ret":"HDRS","envid":"env-1","recipients":[]}}')
        self.clock.advance(0)
        self.assertEqual(
            [(e.mailbox, e.dsn) for e in self.provider.emails],
            [("billing@contoso.example", None), ("", dsn)],
        )

    def test_dead_messages_purged_after_retention(self) -> None:
        """Dead mail older than QUEUE_DEAD_RETENTION goes at the next sweep."""
        self.provider.outcomes.append(PermanentDeliveryError("no"))
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        self.assertIn(id, self.store.entries)
        self.clock.advance(86400 - 600)
        self.assertIn(id, self.store.entries)
        self.clock.advance(1200)
        self.assertNotIn(id, self.store.entries)
        [purged] = self.logged("dead messages purged")
        self.assertEqual(purged["count"], 1)


class PacingTests(WorkerCase):
    def test_concurrency_and_per_route(self) -> None:
        """At most QUEUE_CONCURRENCY in flight, oldest first; a freed slot is filled at once;
        the provider's per-mailbox cap is passed to every claim."""
        held = [defer.Deferred[None]() for _ in range(4)]
        self.provider.outcomes.extend(held)
        runner = self.runner()
        ids = [self.queue(f"m{n}") for n in range(4)]
        runner.startService()
        self.clock.advance(0)
        self.assertEqual([e.subject for e in self.provider.emails], ["m0", "m1"])
        self.assertEqual(sorted(runner.inflight), sorted(ids[:2]))
        held[0].callback(None)
        self.clock.advance(0)
        self.assertEqual([e.subject for e in self.provider.emails], ["m0", "m1", "m2"])
        self.assertTrue(all(per_route == 3 for _, per_route in self.store.claims))
        self.assertLessEqual(max(limit for limit, _ in self.store.claims), 2)

    def test_bodies_read_back_within_the_memory_budget(self) -> None:
        """With the sessions' memory budget nearly full, a queued body is not read back
        (nor delivered) until its size fits; its bytes go back once the provider is done."""
        budget = InflightBudget(1_000)
        runner = self.runner()
        runner.budget = budget
        self.assertTrue(budget.reserve(900))  # a session holds most of it
        runner.startService()
        self.queue("waits")
        self.clock.advance(0)
        self.assertEqual(self.provider.emails, [])
        self.assertEqual(budget.waiting, 1)
        budget.release(900)
        self.clock.advance(0)
        self.assertEqual([e.subject for e in self.provider.emails], ["waits"])
        self.assertEqual((budget.held, budget.waiting), (0, 0))

    def test_kick_delivers_without_waiting_for_the_poll(self) -> None:
        """Mail queued by this process goes out in the next reactor turn, not the next poll."""
        runner = self.runner(poll_interval=1000.0)
        runner.startService()
        self.clock.advance(1)
        self.queue()
        self.clock.advance(0)
        self.assertEqual(len(self.provider.emails), 1)

    def test_slow_delivery_renews_its_lease(self) -> None:
        """A delivery longer than the lease keeps it: renewed every third of the lease."""
        slow: defer.Deferred[None] = defer.Deferred()
        self.provider.outcomes.append(slow)
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        for _ in range(6):
            self.clock.advance(10)
        entry = self.store.entries[id]
        self.assertEqual(entry.lease_until, self.clock.seconds() + 30)
        self.assertEqual(len(self.provider.emails), 1)
        slow.callback(None)
        self.assertEqual(self.store.entries, {})


class StopTests(WorkerCase):
    def test_stop_waits_for_deliveries_in_flight(self) -> None:
        """stopService claims nothing more and fires once the delivery in flight ended."""
        slow: defer.Deferred[None] = defer.Deferred()
        self.provider.outcomes.append(slow)
        runner = self.runner(concurrency=1)
        first, second = self.queue("first"), self.queue("second")
        runner.startService()
        self.clock.advance(0)
        stopped = runner.stopService()
        self.assertNoResult(stopped)
        slow.callback(None)
        self.successResultOf(stopped)
        self.clock.advance(100)
        self.assertEqual([e.subject for e in self.provider.emails], ["first"])
        self.assertNotIn(first, self.store.entries)
        self.assertEqual(self.store.entries[second].state, State.QUEUED)

    def stopped_while_sending(self, sending: defer.Deferred[None]) -> str:
        """Queue a message whose send is C{sending}, stop the worker past the timeout; its id."""
        self.provider.outcomes.append(sending)
        runner = self.runner()
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        self.stopped_after_the_timeout(runner)
        return id

    def stopped_after_the_timeout(self, runner: QueueRunner) -> None:
        """Stop C{runner}: nothing before the shutdown timeout, then the stop fires."""
        stopped = runner.stopService()
        self.clock.advance(9)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)

    def test_stop_gives_back_a_lease_the_provider_never_handed_over(self) -> None:
        """A send still running after the shutdown timeout, which the provider says it
        stopped before the message left for the backend (SendCancelledError without
        hand-over): the stop cancels it, fires, and the message is queued again, due at
        once, for the next start or another replica; no attempt is recorded."""
        sending: defer.Deferred[None] = defer.Deferred(
            lambda d: d.errback(SendCancelledError(handed_over=False))
        )
        id = self.stopped_while_sending(sending)
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.lease_owner, entry.attempts), (State.QUEUED, None, 0))
        [line] = self.logged("queue worker stopped")
        self.assertEqual((line["released"], line["kept"], line["unfinished"]), (1, 0, 0))
        self.assertEqual(self.logged(CUT_OFF), [])

    def test_stop_gives_back_a_lease_of_a_message_waiting_for_memory(self) -> None:
        """An attempt still waiting for the memory budget (its body never read, the
        provider never given it) at the shutdown timeout: cancelled, its lease given
        back."""
        budget = InflightBudget(1_000)
        self.assertTrue(budget.reserve(1_000))  # a session holds all of it
        runner = self.runner()
        runner.budget = budget
        runner.startService()
        id = self.queue()
        self.clock.advance(0)
        self.assertEqual(budget.waiting, 1)
        self.stopped_after_the_timeout(runner)
        self.assertEqual((budget.waiting, self.provider.emails), (0, []))
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.lease_owner), (State.QUEUED, None))

    def test_stop_keeps_the_lease_of_a_send_that_may_have_reached_the_backend(self) -> None:
        """A send still running after the shutdown timeout that may have reached the
        backend (a plain cancel: the provider cannot say; or marked handed over): the
        stop fires, but the lease stays this process's until it runs out, so no replica
        sends the message while the first request may still be answered; a warning
        names the message, and after QUEUE_LEASE_TIME the message is due again."""
        id = self.stopped_while_sending(defer.Deferred())
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.lease_owner), (State.DELIVERING, "test-worker"))
        [line] = self.logged("queue worker stopped")
        self.assertEqual((line["released"], line["kept"], line["unfinished"]), (0, 1, 0))
        [warning] = self.logged(CUT_OFF)
        self.assertEqual(warning["id"], id)
        self.assertEqual(
            self.successResultOf(self.store.claim("other", self.clock.seconds(), 30, 5, 5)), []
        )
        later = self.clock.seconds() + SETTINGS.lease_time
        [again] = self.successResultOf(self.store.claim("other", later, 30, 5, 5))
        self.assertEqual(again.id, id)


CUT_OFF = "queue delivery cut off at shutdown after hand-over: lease kept"


class HandoverTests(SynchronousTestCase):
    def test_may_have_reached_backend(self) -> None:
        """What a stop's cancel leaves behind: nothing reached the backend before the
        provider had the message, nor when it says it stopped before hand-over; a marked
        hand-over, a plain cancel or a provider's hand-over error may have."""
        self.assertFalse(_Flight().may_have_reached_backend(defer.CancelledError()))
        quiet = _Flight(handover=Handover())
        self.assertFalse(quiet.may_have_reached_backend(SendCancelledError(handed_over=False)))
        self.assertTrue(quiet.may_have_reached_backend(SendCancelledError(handed_over=True)))
        self.assertTrue(quiet.may_have_reached_backend(defer.CancelledError()))
        marked = _Flight(handover=Handover(handed_over=True))
        self.assertTrue(marked.may_have_reached_backend(SendCancelledError(handed_over=False)))


class SQLiteWorkerTests(TestCase):
    """The worker on the real SQLite store and the real reactor, with short intervals."""

    async def test_delivers_and_retries_through_sqlite(self) -> None:
        """Three messages through a real SQLite queue, the first failing once: all reach
        the provider, the failed one twice, and the queue ends empty."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from smtpproxy.queue.sqlite import SQLiteStore

        directory = self.mktemp()
        os.makedirs(directory)
        store = SQLiteStore(os.path.join(directory, "queue.db"), 1 << 30, reactor)
        self.addCleanup(store.close)
        await store.open()
        provider = RecordingProvider()
        provider.outcomes.append(TransientDeliveryError("Graph down", "4.4.5"))
        settings = dataclasses.replace(
            SETTINGS,
            poll_interval=0.05,
            schedule=Schedule(min_interval=0.2, max_interval=1.0, max_age=60.0),
        )
        runner = QueueRunner(store, provider, reactor, MessageParser(reactor), settings)
        front = QueueFront(store, reactor, kick=runner.kick)
        runner.startService()
        self.addCleanup(runner.stopService)
        envelope = Envelope("a@example.com", ("b@example.org",))
        for n in range(3):
            await front.enqueue(front.new_id(), envelope, body(message(f"m{n}")))
        for _ in range(100):
            if (await store.stats(reactor.seconds())).queued == 0 and len(provider.emails) == 4:
                break
            await deferLater(reactor, 0.05)
        subjects = [e.subject for e in provider.emails]
        self.assertEqual(sorted(subjects), ["m0", "m0", "m1", "m2"])
        stats = await store.stats(reactor.seconds())
        self.assertEqual((stats.queued, stats.delivering, stats.dead), (0, 0, 0))


class PartialProvider:
    """A backend that refuses some recipients per call (as an SMTP upstream's RCPT replies).

    Each send takes the next dict of C{refusals}: address -> reply ("450 4.2.1 Busy").
    """

    name = "partial"

    def __init__(self, *refusals: dict[str, str]) -> None:
        self.refusals = list(refusals)
        self.emails: list[Email] = []

    def send(self, email: Email) -> defer.Deferred[PartlyRefused | None]:
        self.emails.append(email)
        refuse = self.refusals.pop(0) if self.refusals else {}
        refused = tuple(
            RecipientRefusal(address, int(reply[:3]), *reply[4:].split(" ", 1))
            for address, reply in refuse.items()
            if address in email.envelope_to
        )
        if not refused:
            return defer.succeed(None)
        accepted = tuple(a for a in email.envelope_to if a not in refuse)
        return defer.succeed(PartlyRefused(accepted, refused))

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class PartlyRefusedTests(WorkerCase):
    """The provider took the message for some recipients and refused others."""

    RECIPIENTS = ("ok@example.org", "busy@example.org", "gone@example.org")

    def partial(self, *refusals: dict[str, str]) -> tuple[PartialProvider, str]:
        provider = PartialProvider(*refusals)
        self.provider = cast(RecordingProvider, provider)
        runner = self.runner()
        runner.startService()
        id = self.front.new_id()
        envelope = Envelope("a@example.com", self.RECIPIENTS, "192.0.2.7")
        self.successResultOf(self.front.enqueue(id, envelope, body(message("Partly"))))
        self.clock.advance(0)
        return provider, id

    def test_temporary_retried_alone_permanent_dead_alone(self) -> None:
        """One accepted, one 450, one 550: the attempt records both refusals; the message
        waits the normal back-off owed only to the 450 one (the accepted one never gets it
        again); once that one takes it, the message is dead for the 550 one alone, with its
        reply, as the queue treats a permanent failure."""
        provider, id = self.partial(
            {"busy@example.org": "450 4.2.1 Busy", "gone@example.org": "550 5.1.1 No such user"}
        )
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.attempts), (State.QUEUED, 1))
        self.assertEqual(entry.envelope.recipients, ("busy@example.org",))
        self.assertEqual(entry.failed, ("gone@example.org",))
        [first] = entry.history
        self.assertEqual(first.outcome, Outcome.DEFERRED)
        self.assertEqual(
            first.refused,
            (
                Refused("busy@example.org", "450 4.2.1 Busy"),
                Refused("gone@example.org", "550 5.1.1 No such user"),
            ),
        )
        self.assertEqual(first.reply, "450 4.2.1 Busy (delivered to 1 of 3 recipients)")
        [deferred] = self.logged("message delivery deferred")
        self.assertEqual(deferred["retry_in_s"], 60.0)
        self.assertEqual(deferred["owed"], ["busy@example.org"])
        self.assertEqual(len(deferred["refused"]), 2)

        self.clock.advance(59)
        self.assertEqual(len(provider.emails), 1)
        self.clock.advance(1)
        self.assertEqual(
            [e.envelope_to for e in provider.emails],
            [self.RECIPIENTS, ("busy@example.org",)],
        )
        entry = self.store.entries[id]
        self.assertEqual((entry.state, entry.attempts), (State.DEAD, 2))
        self.assertEqual((entry.envelope.recipients, entry.failed), (("gone@example.org",), ()))
        self.assertEqual(entry.history[1].outcome, Outcome.FAILED)
        self.assertIn("gone@example.org", entry.history[1].reply)
        [dead] = self.logged("message dead")
        self.assertEqual(dead["recipients"], ["gone@example.org"])
        self.clock.advance(3600)
        self.assertEqual(len(provider.emails), 2)

    def test_only_permanent_refusals_dead_at_once(self) -> None:
        """Refused for good only (the others accepted): dead at once for the refused
        recipients alone; nothing is sent again."""
        provider, id = self.partial({"gone@example.org": "550 5.1.1 No such user"})
        entry = self.store.entries[id]
        self.assertEqual(entry.state, State.DEAD)
        self.assertEqual(entry.envelope.recipients, ("gone@example.org",))
        self.assertEqual(entry.history[0].outcome, Outcome.FAILED)
        self.assertEqual(
            entry.history[0].reply, "550 5.1.1 No such user (delivered to 2 of 3 recipients)"
        )
        self.clock.advance(3600)
        self.assertEqual(len(provider.emails), 1)

    def test_refused_again_keeps_waiting_then_expires_for_those_never_reached(self) -> None:
        """A recipient refused with 4xx at every attempt follows the back-off up to
        QUEUE_MAX_AGE, then the message is dead (expired) for it and for the one refused
        for good earlier; the accepted one is never sent to again."""
        busy = {"busy@example.org": "450 4.2.1 Busy"}
        provider, id = self.partial(
            {**busy, "gone@example.org": "550 5.1.1 No such user"}, *[busy] * 20
        )
        self.clock.pump([60.0] * 70)
        entry = self.store.entries[id]
        self.assertEqual(entry.state, State.DEAD)
        self.assertEqual(entry.history[-1].outcome, Outcome.EXPIRED)
        self.assertEqual(set(entry.envelope.recipients), {"busy@example.org", "gone@example.org"})
        self.assertTrue(all(e.envelope_to == ("busy@example.org",) for e in provider.emails[1:]))
        self.assertGreater(len(provider.emails), 2)
