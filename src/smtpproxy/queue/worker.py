"""The delivery worker: takes due messages from the store and hands them to the provider.

One L{QueueRunner} runs in every relay process with a queue.  It polls the
store on a short interval (and at once when this process queued a message,
L{QueueRunner.kick}), leases up to C{QUEUE_CONCURRENCY} minus what it is
already delivering, and for each leased message reads the body, parses it
with the sessions' shared L{MessageParser} and sends it through the same
pipeline as direct mode (L{smtpproxy.delivery.send_email}).  What happens
next is L{smtpproxy.queue.policy}'s decision; the store records it with the
attempt.  A delivery slower than a third of the lease renews it, so only a
dead process's leases expire.

Every state change is one log line carrying the message id (the front
door logs C{message queued}; here C{message delivered}, C{message delivery
deferred}, C{message dead}).

Stopping claims nothing more and gives deliveries in flight up to
C{shutdown_timeout} to finish.  It then cancels those still running and
gives back the leases of the messages no backend can have yet (waiting for
memory or parsing, or a send the provider says it stopped before handing
the message over), so they are due at once for the next start or another
replica.  A message the provider may already have handed to its backend
keeps its lease: handing it to another replica at once could deliver it
twice while the first request is still answered; it is retried once the
lease runs out (C{QUEUE_LEASE_TIME}) if no outcome was recorded.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.config import Config
from smtpproxy.delivery import send_email
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.logsafe import clip, clip_list
from smtpproxy.mime.message import Email
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers import Provider
from smtpproxy.providers.result import (
    AllRefusedError,
    Handover,
    PartlyRefused,
    RecipientRefusal,
    SendCancelledError,
    watched,
)
from smtpproxy.queue import policy
from smtpproxy.queue.front import dsn_from_meta, mailbox_from_meta
from smtpproxy.queue.model import (
    Attempt,
    BodyDamagedError,
    Entry,
    LeaseLostError,
    QueueBusyError,
    Recipients,
    Refused,
)
from smtpproxy.queue.store import QueueStore
from smtpproxy.spool import InflightBudget

log = Logger(namespace="smtpproxy.queue")


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """How the worker paces itself; built from the C{QUEUE_*} settings by L{settings_from}.

    @ivar per_route: deliveries of one route (Graph mailbox) in flight at
        once, across every process sharing the store.
    @ivar poll_interval: seconds between two looks at the store when
        nothing woke the worker (mail queued by another replica, a retry
        coming due).
    @ivar purge_interval: seconds between two sweeps of expired dead mail.
    """

    concurrency: int
    per_route: int
    lease_time: float
    schedule: policy.Schedule
    dead_retention: float
    shutdown_timeout: float
    poll_interval: float
    purge_interval: float


#: Seconds between two looks at the store: mail queued by another replica,
#: or made due by the operator, waits at most this long.
POLL_INTERVAL = 1.0
#: Seconds between two sweeps of dead mail past its retention.
PURGE_INTERVAL = 3600.0


#: Why a message whose body is gone at delivery time is dead (a 554 5.3.0).
LOST_BODY_REASON = "queued body was missing at delivery"


class UnusableBodyError(PermanentDeliveryError):
    """The queued body is gone, or is not the one accepted: no attempt can ever deliver it.

    The policy makes such a message dead at once (a 5xx), with a reply that
    says what is wrong with its body, rather than retrying it for
    C{QUEUE_MAX_AGE} under the generic "local error" reply.  The body's
    name stays in its row, so an operator who restores the file can
    C{smtpproxy queue retry} it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "5.3.0", 554)


def settings_from(config: Config, per_route: int) -> RunnerSettings:
    """The worker's settings from the relay's L{smtpproxy.config.Config}."""
    return RunnerSettings(
        concurrency=config.queue_concurrency,
        per_route=per_route,
        lease_time=config.queue_lease_time,
        schedule=policy.Schedule(
            config.queue_retry_min_interval,
            config.queue_retry_max_interval,
            config.queue_max_age,
        ),
        dead_retention=config.queue_dead_retention,
        shutdown_timeout=config.smtp_shutdown_timeout,
        poll_interval=POLL_INTERVAL,
        purge_interval=min(PURGE_INTERVAL, max(1.0, config.queue_dead_retention)),
    )


@dataclass(eq=False, slots=True)
class _Flight:
    """One attempt in flight, as a stop needs to see it.

    @ivar handover: set once the provider was given the message; whether
        it has left for the backend (L{Handover}).
    @ivar recording: the attempt has ended and its outcome is being
        written to the store: too late (and needless) to cancel.
    @ivar stopped: cancelled by the worker's stop.
    """

    handover: Handover | None = None
    recording: bool = False
    stopped: bool = False

    def may_have_reached_backend(self, error: BaseException | None) -> bool:
        """After a stop's cancel: can the backend have the message?  (Pure.)

        Not before the provider was given it, nor when the provider says
        it stopped before handing it over (L{SendCancelledError}); any
        other end (a plain cancel, a provider that does not say) may
        have, so it is read as yes.
        """
        if self.handover is None:
            return False
        if self.handover.handed_over:
            return True
        return not (isinstance(error, SendCancelledError) and not error.handed_over)


def worker_name() -> str:
    """This process's lease owner name: host, pid and a random tag (a restarted pid differs)."""
    tag = random.Random(os.urandom(8)).getrandbits(32)  # noqa: S311
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{tag:08x}"


class QueueRunner(Service):
    """Delivers due queued messages; see the module docstring."""

    name = "queue"

    def __init__(
        self,
        store: QueueStore,
        provider: Provider,
        reactor: IReactorTime,
        parser: MessageParser,
        settings: RunnerSettings,
        *,
        owner: str | None = None,
        rand: Callable[[], float] = random.random,
        budget: InflightBudget | None = None,
    ) -> None:
        self.store = store
        self._provider = provider
        self._reactor = reactor
        self._parser = parser
        self.settings = settings
        self.owner = owner or worker_name()
        self._rand = rand
        # The sessions' memory budget (smtpproxy.spool): a body is read back
        # only once its size fits, so concurrent large deliveries take turns
        # rather than all sitting in memory; None: no limit (tests).
        self.budget = budget
        self.inflight: dict[str, defer.Deferred[None]] = {}
        self._flights: dict[str, _Flight] = {}
        # Messages whose delivery a stop cut off after the provider may
        # have handed them over: their leases are kept (see _stop).
        self._kept: set[str] = set()
        self._claiming = False
        self._again = False
        self._kicked: IDelayedCall | None = None
        self._stopping = False
        self._poller: LoopingCall | None = None
        self._purger: LoopingCall | None = None

    # -- the service ----------------------------------------------------------

    def startService(self) -> None:
        # What Service.startService does (it is untyped, so mypy --strict
        # will not let it be called).
        self.running = True
        self._stopping = False
        self._kept.clear()
        self._poller = LoopingCall(self.poll)
        self._poller.clock = self._reactor
        self._poller.start(self.settings.poll_interval, now=True)
        self._purger = LoopingCall(self.purge)
        self._purger.clock = self._reactor
        self._purger.start(self.settings.purge_interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        self.running = False
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        for loop in (self._poller, self._purger):
            if loop is not None and loop.running:
                loop.stop()
        if self._kicked is not None and self._kicked.active():
            self._kicked.cancel()
        busy = len(self.inflight)
        if busy:
            log.info("waiting for queue deliveries in flight", count=busy)
            await self._settled(self.settings.shutdown_timeout)
        if self.inflight:
            # Past the grace: stop what is still running.  An attempt whose
            # outcome is being recorded is left to finish (a moment).
            for id, attempt in list(self.inflight.items()):
                flight = self._flights.get(id)
                if flight is not None and not flight.recording:
                    flight.stopped = True
                    attempt.cancel()
            if self.inflight:
                await self._settled(self.settings.shutdown_timeout)
        # A send that did not end even when cancelled may still reach the
        # backend: its lease is kept too.
        self._kept.update(id for id, flight in self._flights.items() if flight.handover is not None)
        kept = sorted(self._kept)
        try:
            released = await self.store.release(self.owner, kept)
        except Exception:
            log.failure("could not give the queue's leases back", owner=self.owner)
            return
        log.info(
            "queue worker stopped",
            unfinished=len(self.inflight),
            released=released,
            kept=len(kept),
            owner=self.owner,
        )

    def _settled(self, timeout: float) -> defer.Deferred[None]:
        """Fires once every delivery in flight has ended, or after C{timeout} seconds."""
        done: defer.Deferred[None] = defer.Deferred()

        def fire(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        timer = self._reactor.callLater(timeout, fire)
        waits = defer.DeferredList(list(self.inflight.values()), consumeErrors=True)
        waits.addBoth(fire)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return done

    # -- claiming -------------------------------------------------------------

    def kick(self) -> None:
        """A message was queued here: look for due mail in this reactor turn's wake."""
        if self.running and not self._stopping and self._kicked is None:
            self._kicked = self._reactor.callLater(0, self._kick_now)

    def _kick_now(self) -> None:
        self._kicked = None
        self.poll()

    def poll(self) -> None:
        """Lease as many due messages as there is room for, and start delivering them."""
        if self._stopping:
            return
        if self._claiming:
            # A claim is on its way to the store; look again once it is back.
            self._again = True
            return
        room = self.settings.concurrency - len(self.inflight)
        if room <= 0:
            return
        self._claiming = True
        self._again = False
        now = self._reactor.seconds()
        try:
            claimed = self.store.claim(
                self.owner, now, self.settings.lease_time, room, self.settings.per_route
            )
        except Exception:
            claimed = defer.fail()
        claimed.addCallbacks(self._start, self._claim_failed, callbackArgs=(room,))

    def _start(self, entries: list[Entry], room: int) -> None:
        self._claiming = False
        for entry in entries:
            if entry.id in self.inflight:
                # This process's own lease ran out while the attempt was
                # still running (a stall, or the clock stepped past
                # QUEUE_LEASE_TIME) and the claim took it again: the claim
                # renewed the lease, the attempt goes on.  A second attempt
                # beside it would send the message twice.
                log.warn(
                    "queue lease of a delivery in flight ran out and was taken back",
                    id=entry.id,
                    owner=self.owner,
                )
                continue
            self._deliver(entry)
        if (self._again or len(entries) == room) and not self._stopping:
            # More may be due (a full batch) or was queued meanwhile.
            self.kick()

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = False
        if isinstance(failure.value, QueueBusyError):
            # Known and passing: no traceback; the next poll tries again.
            log.warn(
                "could not take due messages: another process holds the queue's write lock",
                owner=self.owner,
            )
            return
        log.failure("could not take due messages from the queue", failure, owner=self.owner)

    # -- one attempt ----------------------------------------------------------

    def _deliver(self, entry: Entry) -> None:
        flight = _Flight()
        self._flights[entry.id] = flight
        attempt = defer.Deferred.fromCoroutine(self._attempt(entry, flight))
        if attempt.called:
            self._flights.pop(entry.id, None)
            return  # finished at once (a store and provider without waits)
        self.inflight[entry.id] = attempt

        def finished(result: object) -> None:
            self.inflight.pop(entry.id, None)
            self._flights.pop(entry.id, None)
            if not self._stopping:
                self.kick()  # a slot is free

        attempt.addBoth(finished)

    async def _attempt(self, entry: Entry, flight: _Flight) -> None:
        started = self._reactor.seconds()
        renewer = LoopingCall(lambda: self._renew(entry.id, renewer))
        renewer.clock = self._reactor
        renewer.start(self.settings.lease_time / 3, now=False).addErrback(
            lambda failure: log.failure("lease renewal stopped", failure, id=entry.id)
        )
        attempts = entry.attempts + 1
        envelope = entry.envelope
        fields: dict[str, Any] = {
            "id": entry.id,
            "client": envelope.client,
            "user": envelope.user,
            "sender": clip(envelope.sender),
            "recipients": clip_list(envelope.recipients),
            "recipient_count": len(envelope.recipients),
            "size": entry.size,
            "provider": self._provider.name,
            "attempts": attempts,
        }
        error: BaseException | None = None
        result: PartlyRefused | None = None
        held = 0
        try:
            if self.budget is not None:
                waiting = self.budget.acquire(entry.size)
                if waiting is not None:
                    await waiting
                held = entry.size
            email = await self._parse(entry)
            fields["queue_time_s"] = round(self._reactor.seconds() - entry.queued_at, 3)
            sending, flight.handover = watched(
                lambda: send_email(
                    self._provider, self._reactor, email, fields, started, log_failure=False
                )
            )
            result = await sending
        except Exception as e:
            error = e
        finally:
            if renewer.running:
                renewer.stop()
            if held and self.budget is not None:
                # The provider is done with the body: its bytes may go.
                self.budget.release(held)
        if flight.stopped and isinstance(error, defer.CancelledError):
            self._cut_off(entry, flight, error, fields["attempts"])
            return
        flight.recording = True
        now = self._reactor.seconds()
        decision = self._decide(entry, error, result, attempts, now)
        refused = _refusals(error, result)
        record = Attempt(
            at=started,
            outcome=decision.outcome,
            reply="" if isinstance(decision, policy.Delivered) else decision.reply,
            request_id=policy.request_id(error),
            worker=self.owner,
            refused=tuple(Refused(r.address, r.reply) for r in refused),
        )
        await self._record(entry, decision, record, fields, now)

    def _cut_off(self, entry: Entry, flight: _Flight, error: BaseException, attempts: int) -> None:
        """The stop cancelled this attempt: keep its lease if the backend may have it.

        Nothing is recorded: the attempt has no outcome.  A message no
        backend can have is released with the others by L{_stop}; one that
        may have reached it keeps this process's lease, so that no replica
        sends it again while the first request may still be answered.
        """
        if not flight.may_have_reached_backend(error):
            return
        self._kept.add(entry.id)
        log.warn(
            "queue delivery cut off at shutdown after hand-over: lease kept",
            id=entry.id,
            attempts=attempts,
            provider=self._provider.name,
            owner=self.owner,
            retry_after_lease_s=self.settings.lease_time,
        )

    def _decide(
        self,
        entry: Entry,
        error: BaseException | None,
        result: PartlyRefused | None,
        attempts: int,
        now: float,
    ) -> policy.Decision:
        """The policy's verdict, per recipient when the provider reached only some.

        Also per recipient when the provider refused every recipient, each
        with its own reply (L{AllRefusedError}): those refused with a 5xx
        are failed at once, only the 4xx ones are retried.  A message with
        recipients failed for good by an earlier attempt ends dead for them
        (and for any it still could not reach).
        """
        schedule, owed = self.settings.schedule, entry.envelope.recipients
        if isinstance(error, AllRefusedError) or (
            error is None and (result is not None or entry.failed)
        ):
            return policy.after_partial(
                owed,
                entry.failed,
                [(r.address, r.reply, r.permanent) for r in _refusals(error, result)],
                attempts,
                entry.queued_at,
                now,
                schedule,
                self._rand(),
            )
        decision = policy.decide(error, attempts, entry.queued_at, now, schedule, self._rand())
        if isinstance(decision, policy.Dead) and entry.failed:
            return dataclasses.replace(decision, recipients=Recipients(owed + entry.failed))
        return decision

    async def _parse(self, entry: Entry) -> Email:
        try:
            raw = await self.store.read_body(entry.id)
        except FileNotFoundError as e:
            raise UnusableBodyError(LOST_BODY_REASON) from e
        except BodyDamagedError as e:
            raise UnusableBodyError(
                f"queued body damaged: {e.found} bytes where {e.expected} were accepted"
            ) from e
        envelope = entry.envelope
        parsed = self._parser.parse_body(
            envelope.sender, envelope.recipients, len(raw), lambda: raw
        )
        email = await parsed if isinstance(parsed, defer.Deferred) else parsed
        dsn, mailbox = dsn_from_meta(envelope.meta), mailbox_from_meta(envelope.meta)
        # The queue owes each recipient its own retries (policy.after_partial):
        # a backend may deliver to some while it defers others.
        return dataclasses.replace(email, dsn=dsn, mailbox=mailbox, per_recipient_retry=True)

    async def _record(
        self,
        entry: Entry,
        decision: policy.Decision,
        record: Attempt,
        fields: dict[str, Any],
        now: float,
    ) -> None:
        id, owner = entry.id, self.owner
        try:
            if isinstance(decision, policy.Delivered):
                await self.store.delivered(id, owner, record)
            elif isinstance(decision, policy.Retry):
                await self.store.deferred(id, owner, record, decision.at, decision.recipients)
                log.warn(
                    "message delivery deferred",
                    id=id,
                    attempts=fields["attempts"],
                    reply=decision.reply,
                    request_id=record.request_id,
                    retry_in_s=round(decision.at - now, 1),
                    **_partial_fields(record, decision.recipients),
                )
            else:
                await self.store.dead(id, owner, record, decision.recipients)
                dead_fields = {k: v for k, v in fields.items() if k != "queue_time_s"}
                if decision.recipients is not None:
                    dead_fields["recipients"] = clip_list(decision.recipients.owed)
                    dead_fields["recipient_count"] = len(decision.recipients.owed)
                log.error(
                    "message dead",
                    outcome=str(decision.outcome),
                    reply=decision.reply,
                    request_id=record.request_id,
                    queue_time_s=round(now - entry.queued_at, 3),
                    **dead_fields,
                    **_partial_fields(record, None),
                )
        except LeaseLostError:
            log.warn(
                "queue lease lost before the attempt was recorded",
                id=id,
                outcome=str(decision.outcome),
                owner=owner,
            )
        except Exception:
            log.failure(
                "could not record a queue delivery attempt",
                id=id,
                outcome=str(decision.outcome),
            )

    def _renew(self, id: str, renewer: LoopingCall) -> defer.Deferred[None]:
        until = self._reactor.seconds() + self.settings.lease_time
        try:
            renewing = self.store.renew(id, self.owner, until)
        except Exception:
            renewing = defer.fail()

        def lost(failure: Any) -> None:
            if failure.check(LeaseLostError):
                # Said once: renewing a lease someone else may hold is pointless.
                if renewer.running:
                    renewer.stop()
                log.warn("queue lease lost during delivery", id=id, owner=self.owner)
            else:
                log.failure("could not renew a queue lease", failure, id=id)

        return renewing.addErrback(lost)

    # -- housekeeping ---------------------------------------------------------

    def purge(self) -> None:
        """Remove dead messages older than C{dead_retention}."""
        before = self._reactor.seconds() - self.settings.dead_retention

        def purged(count: int) -> None:
            if count:
                log.info("dead messages purged", count=count)

        try:
            purging = self.store.purge_dead(before)
        except Exception:
            purging = defer.fail()
        purging.addCallbacks(
            purged, lambda failure: log.failure("could not purge dead messages", failure)
        )


def _partial_fields(record: Attempt, recipients: Recipients | None) -> dict[str, object]:
    """Log fields of an attempt that reached only some: who was refused, who is still owed."""
    if not record.refused:
        return {}
    fields: dict[str, object] = {
        "refused": clip_list([f"<{r.address}> {r.reply}" for r in record.refused])
    }
    if recipients is not None:
        fields["owed"] = clip_list(recipients.owed)
    return fields


def _refusals(
    error: BaseException | None, result: PartlyRefused | None
) -> tuple[RecipientRefusal, ...]:
    """The recipients an attempt was refused for, each with its reply (none: no such news)."""
    if isinstance(error, AllRefusedError):
        return error.refused
    return () if result is None else result.refused
