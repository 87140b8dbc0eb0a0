"""A queue store in memory, keeping the L{QueueStore} rules, for tests of its users.

It is the collaborator of the worker's and the front door's tests, never
the thing under test: the real backends are held to the same rules by
C{tests/queue/test_store_contract.py}.  Every method answers with an
already-fired Deferred unless C{hold} is set, when it waits for the test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet import defer

from smtpproxy.queue.model import (
    Attempt,
    BodySource,
    EnqueueWithdrawnError,
    Entry,
    Envelope,
    LeaseLostError,
    QueueFullError,
    Recipients,
    State,
    Stats,
    Writability,
)


@dataclass
class MemoryStore:
    max_bytes: int = 1 << 40
    entries: dict[str, Entry] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    opened: bool = False
    closed: bool = False
    claims: list[tuple[int, int]] = field(default_factory=list)
    hold_enqueue: list[defer.Deferred[None]] | None = None
    withdrawable: dict[str, defer.Deferred[None]] = field(default_factory=dict)
    # Held enqueues whose commit is "under way": withdraw() refuses them.
    sealed: set[str] = field(default_factory=set)

    def open(self) -> defer.Deferred[None]:
        self.opened = True
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)

    def enqueue(
        self, id: str, envelope: Envelope, body: BodySource, now: float
    ) -> defer.Deferred[None]:
        if id in self.entries:
            return defer.fail(KeyError(id))
        if sum(e.size for e in self.entries.values()) + body.size > self.max_bytes:
            return defer.fail(QueueFullError("full"))
        data = b"".join(body.chunks())
        entry = Entry(id, envelope, len(data), now, State.QUEUED, 0, now)

        def commit(_: object = None) -> None:
            self.entries[id] = entry
            self.bodies[id] = data

        if self.hold_enqueue is not None:
            held: defer.Deferred[None] = defer.Deferred()
            self.hold_enqueue.append(held)
            self.withdrawable[id] = held
            return held.addCallback(commit)
        commit()
        return defer.succeed(None)

    def withdraw(self, id: str) -> bool:
        if id in self.sealed:
            return False
        held = self.withdrawable.pop(id, None)
        if held is None or held.called:
            return False
        if self.hold_enqueue is not None and held in self.hold_enqueue:
            self.hold_enqueue.remove(held)
        held.errback(EnqueueWithdrawnError(id))
        return True

    def _leased(self, entry: Entry, now: float) -> bool:
        return (
            entry.state == State.DELIVERING
            and entry.lease_until is not None
            and entry.lease_until > now
        )

    def claim(
        self, owner: str, now: float, lease: float, limit: int, per_route: int
    ) -> defer.Deferred[list[Entry]]:
        self.claims.append((limit, per_route))
        busy: dict[str, int] = {}
        for entry in self.entries.values():
            if self._leased(entry, now):
                busy[entry.envelope.route] = busy.get(entry.envelope.route, 0) + 1
        taken: list[Entry] = []
        for entry in sorted(self.entries.values(), key=lambda e: (e.queued_at, e.id)):
            if len(taken) >= limit:
                break
            if entry.state == State.DEAD or self._leased(entry, now) or entry.next_attempt > now:
                continue
            route = entry.envelope.route
            if busy.get(route, 0) >= per_route:
                continue
            busy[route] = busy.get(route, 0) + 1
            leased = dataclasses.replace(
                entry, state=State.DELIVERING, lease_owner=owner, lease_until=now + lease
            )
            self.entries[entry.id] = leased
            taken.append(leased)
        return defer.succeed(taken)

    def _held(self, id: str, owner: str) -> Entry:
        entry = self.entries.get(id)
        if entry is None or entry.state != State.DELIVERING or entry.lease_owner != owner:
            raise LeaseLostError(id)
        return entry

    def renew(self, id: str, owner: str, until: float) -> defer.Deferred[None]:
        try:
            entry = self._held(id, owner)
        except LeaseLostError:
            return defer.fail()
        self.entries[id] = dataclasses.replace(entry, lease_until=until)
        return defer.succeed(None)

    def read_body(self, id: str) -> defer.Deferred[bytes]:
        return defer.succeed(self.bodies[id])

    def delivered(self, id: str, owner: str, attempt: Attempt) -> defer.Deferred[None]:
        try:
            self._held(id, owner)
        except LeaseLostError:
            return defer.fail()
        del self.entries[id], self.bodies[id]
        return defer.succeed(None)

    def _settle(
        self, id: str, owner: str, attempt: Attempt, **changes: object
    ) -> defer.Deferred[None]:
        try:
            entry = self._held(id, owner)
        except LeaseLostError:
            return defer.fail()
        self.entries[id] = dataclasses.replace(
            entry,
            attempts=entry.attempts + 1,
            last_reply=attempt.reply,
            lease_owner=None,
            lease_until=None,
            history=(*entry.history, attempt),
            **changes,  # type: ignore[arg-type]
        )
        return defer.succeed(None)

    def deferred(
        self,
        id: str,
        owner: str,
        attempt: Attempt,
        next_attempt: float,
        recipients: Recipients | None = None,
    ) -> defer.Deferred[None]:
        changes = self._recipients(id, recipients)
        return self._settle(
            id, owner, attempt, state=State.QUEUED, next_attempt=next_attempt, **changes
        )

    def dead(
        self, id: str, owner: str, attempt: Attempt, recipients: Recipients | None = None
    ) -> defer.Deferred[None]:
        changes = self._recipients(id, recipients)
        return self._settle(
            id, owner, attempt, state=State.DEAD, next_attempt=attempt.at, **changes
        )

    def _recipients(self, id: str, recipients: Recipients | None) -> dict[str, object]:
        entry = self.entries.get(id)
        if recipients is None or entry is None:
            return {}
        return {
            "envelope": dataclasses.replace(entry.envelope, recipients=recipients.owed),
            "failed": recipients.failed,
        }

    def release(self, owner: str, keep: Sequence[str] = ()) -> defer.Deferred[int]:
        count = 0
        for id, entry in list(self.entries.items()):
            if entry.state == State.DELIVERING and entry.lease_owner == owner and id not in keep:
                self.entries[id] = dataclasses.replace(
                    entry, state=State.QUEUED, lease_owner=None, lease_until=None
                )
                count += 1
        return defer.succeed(count)

    def list(self, state: State | None, limit: int) -> defer.Deferred[list[Entry]]:
        found = [e for e in self.entries.values() if state is None or e.state == state]
        return defer.succeed(sorted(found, key=lambda e: e.queued_at)[:limit])

    def show(self, id: str) -> defer.Deferred[Entry | None]:
        return defer.succeed(self.entries.get(id))

    def retry(self, id: str, now: float) -> defer.Deferred[bool]:
        entry = self.entries.get(id)
        if entry is None:
            return defer.succeed(False)
        queued_at = now if entry.state == State.DEAD else entry.queued_at
        self.entries[id] = dataclasses.replace(
            entry, state=State.QUEUED, next_attempt=now, queued_at=queued_at
        )
        return defer.succeed(True)

    def retry_dead(self, now: float) -> defer.Deferred[int]:
        dead = [id for id, e in self.entries.items() if e.state == State.DEAD]
        for id in dead:
            self.entries[id] = dataclasses.replace(
                self.entries[id], state=State.QUEUED, next_attempt=now, queued_at=now
            )
        return defer.succeed(len(dead))

    def delete(self, id: str) -> defer.Deferred[bool]:
        entry = self.entries.get(id)
        if entry is None or entry.state == State.DELIVERING:
            return defer.succeed(False)
        del self.entries[id], self.bodies[id]
        return defer.succeed(True)

    def stats(self, now: float) -> defer.Deferred[Stats]:
        values = list(self.entries.values())
        queued = [e for e in values if e.state == State.QUEUED]
        expired = [e for e in values if _expired(e, now)]
        return defer.succeed(
            Stats(
                len(queued) + len(expired),
                sum(1 for e in values if e.state == State.DELIVERING and not _expired(e, now)),
                sum(1 for e in values if e.state == State.DEAD),
                sum(e.size for e in values),
                min((e.queued_at for e in queued), default=None),
            )
        )

    def writable(self) -> defer.Deferred[Writability]:
        """Always writable: memory has no disk and no lock (no free-space figure)."""
        return defer.succeed(Writability(None))

    def purge_dead(self, before: float) -> defer.Deferred[int]:
        gone = [
            id
            for id, e in self.entries.items()
            if e.state == State.DEAD and e.next_attempt < before
        ]
        for id in gone:
            del self.entries[id], self.bodies[id]
        return defer.succeed(len(gone))


def _expired(entry: Entry, now: float) -> bool:
    """A lease that ran out before C{now}: the message counts as queued."""
    return (
        entry.state == State.DELIVERING
        and entry.lease_until is not None
        and entry.lease_until <= now
    )
