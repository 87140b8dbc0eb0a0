"""The protocol every queue backend implements (SQLite, PostgreSQL).

Every method returns a Deferred and never blocks the reactor: the backends
run their SQL through C{twisted.enterprise.adbapi} and their file work in
the pool's threads.  The rules a backend must keep, which the shared tests
in C{tests/queue/test_store_contract.py} hold each backend to:

  - L{QueueStore.enqueue} fires only once envelope and body are committed
    and synced (file and directory, or the database's commit); it may wait
    to share one commit with other messages (group commit), never answer
    before it.  Past C{max_bytes} or on a full disk it fails with
    L{smtpproxy.queue.model.QueueFullError} and leaves nothing behind.
  - L{QueueStore.claim} hands a due message to one worker at a time: it
    sets a lease, and nobody else gets the message until the lease is
    given back or has expired.  Due messages come oldest first
    (C{queued_at}), so a burst of new mail cannot starve old mail, and no
    more than C{per_route} messages of one route are leased at once
    across every process sharing the store.
  - The outcome methods (L{delivered}, L{deferred}, L{dead}) apply only
    while the caller still holds the lease; otherwise they fail with
    L{smtpproxy.queue.model.LeaseLostError} and change nothing.
  - L{QueueStore.withdraw} answers at once and for good: True means the
    enqueue will never commit (its Deferred then fails with
    L{smtpproxy.queue.model.EnqueueWithdrawnError} and nothing is left
    behind), False means it has committed or is committing (its Deferred
    tells which).  A session forced closed at shutdown asks it before it
    says "421 ... not accepted", so that answer is never a lie.
  - Ids are the caller's (the relay's message id, printed in the 250 reply
    and every log line); an id already present fails the enqueue with
    C{KeyError} and stores nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from smtpproxy.queue.model import (
    Attempt,
    BodySource,
    Entry,
    Envelope,
    Recipients,
    State,
    Stats,
    Writability,
)


class QueueStore(Protocol):
    """Durable storage for queued messages; see the module docstring for its rules."""

    def open(self) -> Deferred[None]:
        """Create or upgrade the schema and tidy what a crash left (partial bodies)."""

    def close(self) -> Deferred[None]:
        """Finish pending commits and release connections and threads."""

    # The front door.

    def enqueue(self, id: str, envelope: Envelope, body: BodySource, now: float) -> Deferred[None]:
        """Store a message durably; fire once it is safe to answer 250."""

    def withdraw(self, id: str) -> bool:
        """Give up the enqueue of C{id} if it can still be stopped before its commit.

        True: it never commits (its Deferred fails with
        L{smtpproxy.queue.model.EnqueueWithdrawnError} once the store has
        let go of the body).  False: no enqueue of C{id} is in flight, or
        it is already past the point of no return (its commit is under way
        or done).
        """

    # The delivery workers.

    def claim(
        self, owner: str, now: float, lease: float, limit: int, per_route: int
    ) -> Deferred[list[Entry]]:
        """Lease up to C{limit} due messages to C{owner} until C{now + lease}."""

    def renew(self, id: str, owner: str, until: float) -> Deferred[None]:
        """Extend C{owner}'s lease on C{id} (a slow delivery); L{LeaseLostError} if gone."""

    def read_body(self, id: str) -> Deferred[bytes]:
        """The stored body, as accepted.

        Fails with C{FileNotFoundError} when the body is gone and with
        L{smtpproxy.queue.model.BodyDamagedError} when its length is not
        the size acknowledged: a backend never hands out a body other than
        the one accepted (the worker makes such a message dead at once).
        """

    def delivered(self, id: str, owner: str, attempt: Attempt) -> Deferred[None]:
        """The provider took it: remove the message and its body."""

    def deferred(
        self,
        id: str,
        owner: str,
        attempt: Attempt,
        next_attempt: float,
        recipients: Recipients | None = None,
    ) -> Deferred[None]:
        """A temporary failure: record it, release the lease, try again at C{next_attempt}.

        C{recipients}, after an attempt that reached some: whom the message
        is still owed to (the envelope's recipients from now on) and whom
        it failed for good; None leaves both as they were.
        """

    def dead(
        self, id: str, owner: str, attempt: Attempt, recipients: Recipients | None = None
    ) -> Deferred[None]:
        """Give up: record the attempt and keep the message, dead, with its history.

        C{recipients} as for L{deferred}: a message dead after reaching
        some keeps only those it never reached, so a retry sends to them.
        """

    def release(self, owner: str, keep: Sequence[str] = ()) -> Deferred[int]:
        """Give back every lease C{owner} holds but those of C{keep} (shutdown); the count.

        C{keep}: messages whose cancelled attempt may have reached the
        backend; their leases run out in their own time.
        """

    # The operator.

    def list(self, state: State | None, limit: int) -> Deferred[list[Entry]]:
        """Messages (oldest first), all or in one state."""

    def show(self, id: str) -> Deferred[Entry | None]:
        """One message with its attempt history, or None."""

    def retry(self, id: str, now: float) -> Deferred[bool]:
        """Make a queued or dead message due now; False if there is no such message.

        A dead message also starts its age again (C{queued_at} becomes
        C{now}): the operator fixed the cause, and an expired message would
        otherwise die again at its first temporary failure.  A queued one
        keeps its age (and its place in the age order).
        """

    def retry_dead(self, now: float) -> Deferred[int]:
        """Make every dead message queued and due now, its age restarted; how many."""

    def delete(self, id: str) -> Deferred[bool]:
        """Remove a message that no worker holds; False if absent or leased."""

    def stats(self, now: float) -> Deferred[Stats]:
        """Counts by state, bytes held, the oldest queued message's age.

        A message whose lease ran out before C{now} counts as queued, not
        delivering: nobody is delivering it (L{claim} takes it).
        """

    def purge_dead(self, before: float) -> Deferred[int]:
        """Remove dead messages that died before C{before}; how many."""

    # The readiness probe.

    def writable(self) -> Deferred[Writability]:
        """Whether a new message could be stored now, checked without storing anything.

        A queue that answers its statistics may still refuse every write
        (a database file or filesystem gone read-only, a PostgreSQL
        standby after a failover, another process holding the write lock):
        this takes the write lock (or asks the server whether the session
        may write), gives it straight back, and reports the free space
        beside the queue's files where the store has any.  It is bounded
        by a short wait of its own, so it never holds up the deliveries
        that share the store's connection.  A failure to ask at all fails
        the Deferred.
        """


@runtime_checkable
class CounterStore(Protocol):
    """Optional: counters kept with the queue, such as the Graph sending budgets.

    Both backends provide it (the statements are in
    L{smtpproxy.queue.counters}); a provider that keeps counts asks for it
    with C{isinstance(store, CounterStore)}.  Adding is atomic per row
    (C{n = n + amount}), so processes sharing a store never lose each
    other's counts; a read followed by an add is not one step, which the
    caller must allow for (see docs/graph.md, "Sending budgets").
    """

    def add_counts(
        self, counts: Sequence[tuple[str, int, int]], forget_before: Mapping[str, int]
    ) -> Deferred[None]:
        """Add each (key, slot, amount); drop each key's slots before C{forget_before[key]}."""

    def read_counts(self, since: Mapping[str, int]) -> Deferred[list[tuple[str, int, int]]]:
        """The (key, slot, count) rows of each key of C{since}, from slot C{since[key]} on."""
