"""Plain values the queue's stores, its worker and its command share.

They carry no behaviour and no I/O, so a store can build them from rows and
the policy and the operator command can read them without a database.
Times are POSIX seconds (C{reactor.seconds()}), so tests drive them with
C{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class State(enum.StrEnum):
    """Where a queued message stands.  Delivered messages leave the queue."""

    QUEUED = "queued"
    """Waiting for its next attempt (C{next_attempt})."""
    DELIVERING = "delivering"
    """Held by a worker's lease until C{lease_until}; expired leases count as queued."""
    DEAD = "dead"
    """Given up (permanent failure or too old); kept for C{QUEUE_DEAD_RETENTION}."""


class Outcome(enum.StrEnum):
    """What one delivery attempt came to."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    """A temporary failure: tried again later."""
    FAILED = "failed"
    """A permanent failure: the message is dead."""
    EXPIRED = "expired"
    """Older than C{QUEUE_MAX_AGE} after a temporary failure: the message is dead."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about a message except its body, as the front door accepted it.

    @ivar sender: the envelope sender (may be empty: a null reverse-path).
    @ivar recipients: the envelope recipients, in the order given; after an
        attempt that reached only some, those still owed (L{Recipients}).
    @ivar client: the client's address as the logs show it.
    @ivar user: the authenticated identity, if any.
    @ivar route: the key the provider's concurrency is counted by (for
        Graph the sending mailbox); empty when the provider has one lane.
    @ivar meta: further JSON-safe facts the delivery needs again (DSN
        parameters, SMTPUTF8, BODY=), kept opaque by the store.
    """

    sender: str
    recipients: tuple[str, ...]
    client: str = ""
    user: str | None = None
    route: str = ""
    meta: str = "{}"


@dataclass(frozen=True, slots=True)
class Refused:
    """A recipient the backend refused while it took the message for others.

    @ivar reply: the backend's reply for it (C{"450 4.2.1 Mailbox busy"}), clipped.
    """

    address: str
    reply: str


def refused_json(refused: tuple[Refused, ...]) -> str:
    """An attempt's refused recipients as stored: a JSON list of [address, reply]."""
    return json.dumps([[r.address, r.reply] for r in refused], separators=(",", ":"))


def refused_from_json(text: str) -> tuple[Refused, ...]:
    """The refused recipients of L{refused_json}; none if the text is unreadable."""
    try:
        found = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(found, list):
        return ()
    return tuple(
        Refused(str(item[0]), str(item[1]))
        for item in found
        if isinstance(item, list) and len(item) == 2
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt, as the history records it.

    @ivar reply: the provider's answer as the relay would word it
        (C{"451 4.4.1 ..."}), clipped; empty for a success.
    @ivar request_id: the backend's own id for the request (Graph's
        C{request-id}), when it gave one.
    @ivar refused: recipients refused while the others got the message
        (an SMTP upstream's per-RCPT answers); empty when it was all or none.
    """

    at: float
    outcome: Outcome
    reply: str = ""
    request_id: str | None = None
    worker: str = ""
    refused: tuple[Refused, ...] = ()


@dataclass(frozen=True, slots=True)
class Recipients:
    """Who a message is still owed to, after an attempt that reached only some.

    @ivar owed: the recipients the next attempt sends to (the envelope's
        recipients from now on).
    @ivar failed: recipients refused permanently by earlier attempts,
        kept until the message ends, when it becomes dead for them.
    """

    owed: tuple[str, ...]
    failed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """One queued (or dead) message: its envelope, its state, its history so far."""

    id: str
    envelope: Envelope
    size: int
    queued_at: float
    state: State
    attempts: int
    next_attempt: float
    last_reply: str = ""
    lease_owner: str | None = None
    lease_until: float | None = None
    history: tuple[Attempt, ...] = ()
    """Filled by L{smtpproxy.queue.store.QueueStore.show} only."""
    failed: tuple[str, ...] = ()
    """Recipients a partial delivery could not reach for good (see L{Recipients})."""


@dataclass(frozen=True, slots=True)
class Stats:
    """The queue at a glance, for C{smtpproxy queue stats} and the metrics."""

    queued: int
    delivering: int
    dead: int
    bytes: int
    oldest_queued_at: float | None


@dataclass(frozen=True, slots=True)
class Writability:
    """Whether the queue could take a new message now, as its store last found it.

    @ivar problem: None when the store took a write lock just now (and
        gave it back unused), else why it could not, in a few words
        ("read-only database", "read-only filesystem", "write lock busy").
    @ivar free_bytes: free space on the filesystem holding the queue's
        files, for a user who is not root (C{statvfs}'s C{f_bavail}); None
        where the store does not know it (PostgreSQL: the disk is the
        server's).
    """

    problem: str | None
    free_bytes: int | None = None


class BodySource(Protocol):
    """A message body a store copies into durable storage.

    L{chunks} may run in a thread of the store's pool; the caller keeps the
    source unchanged and open until the store's Deferred has fired.
    """

    @property
    def size(self) -> int:
        """The body's length in bytes."""

    def chunks(self) -> Iterator[bytes]:
        """The body from its start, in pieces of a bounded size."""


class QueueFullError(Exception):
    """The queue is over C{QUEUE_MAX_BYTES}, or its disk is full: answer 452 4.3.1."""


class QueueBusyError(Exception):
    """Another process held the queue's write lock too long: nothing was stored, answer 451 4.3.0.

    The client keeps the message and sends it again later; the operator
    finds the cause in the warning the front door logs (a transaction left
    open in another program on the queue's file).
    """


class QueueReadOnlyError(Exception):
    """The queue's storage refuses writes (a read-only filesystem or database): answer 451 4.3.0.

    Nothing was stored.  Unlike a full disk (L{QueueFullError}, 452) this
    does not pass by itself: the operator has to make the storage writable
    again, which the front door's error line says.
    """


class LeaseLostError(Exception):
    """The worker's lease ran out and another worker may hold the message now."""


class BodyDamagedError(Exception):
    """The stored body's length is not the size the queue acknowledged with C{250}.

    A store's C{read_body} raises it rather than hand over a body that a
    crash of the filesystem, a restore or a hand edit cut short (or grew):
    delivering it would send the recipient a message that is not the one
    accepted.  It names lengths only, never content.
    """

    def __init__(self, id: str, found: int, expected: int) -> None:
        super().__init__(f"the body of {id} has {found} bytes, {expected} were accepted")
        self.found = found
        self.expected = expected


class EnqueueWithdrawnError(Exception):
    """The enqueue was withdrawn before its commit (a forced shutdown): nothing was stored.

    A store fails an enqueue's Deferred with it once the store no longer
    reads the body; the session had already told its client "421 ... not
    accepted" when L{smtpproxy.queue.store.QueueStore.withdraw} said yes.
    """
