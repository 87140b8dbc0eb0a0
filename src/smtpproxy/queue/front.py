"""The queue's front door: what a session hands the store when a message is complete.

In queue mode a transaction's message is not parsed or sent while the
client waits: its envelope and body go to the store, and the client hears
C{250 ... queued as <id>} once the store's Deferred fired (durable).  The
delivery worker (L{smtpproxy.queue.worker}) takes it from there, parsing
and sending it through the same pipeline as direct mode
(L{smtpproxy.delivery.send_email}).

The envelope keeps what delivery needs again beyond the addresses: the
DSN parameters and the identity's sending mailbox, as JSON in C{meta}
(L{meta_json}, L{dsn_from_meta}, L{mailbox_from_meta}).  C{meta} is a
column every schema version has, so a new fact needs no migration: a row
written before the fact existed simply lacks its key, which reads as the
old behaviour (no mailbox: the provider chooses).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.queue.model import BodySource, EnqueueWithdrawnError, Envelope
from smtpproxy.queue.store import QueueStore

# Seeded from the system's entropy once, so that replicas started at the
# same instant still draw different ids.
_random_bits = random.Random(os.urandom(16)).getrandbits  # noqa: S311


def new_queue_id(now: float) -> str:
    """A 96-bit id, time first: 44 bits of milliseconds and 52 random bits, 24 hex digits.

    Unique in a queue that several replicas share for days (two ids of the
    same millisecond collide with odds of one in 2**52), and ids sort
    roughly in arrival order, which helps an operator reading a listing.
    """
    millis = int(now * 1000) & ((1 << 44) - 1)
    return f"{millis:011x}{_random_bits(52):013x}"


def route_for(mailboxes: tuple[str, ...]) -> str:
    """The concurrency lane of a message, when it is known without parsing.

    A provider with one sending mailbox (Graph with one C{GRAPH_SENDER})
    sends everything as that mailbox.  With several, the From header
    chooses, and reading it would mean parsing here; such messages share
    the lane C{""} (which is then capped like one mailbox: slower, never
    over Graph's limit).
    """
    return mailboxes[0].casefold() if len(mailboxes) == 1 else ""


def meta_json(dsn: Dsn | None, mailbox: str = "") -> str:
    """The envelope's C{meta}: the DSN parameters and the sending mailbox, as JSON."""
    if dsn is None and not mailbox:
        return "{}"
    document: dict[str, object] = {}
    if mailbox:
        document["mailbox"] = mailbox
    if dsn is not None:
        document["dsn"] = {
            "ret": dsn.ret,
            "envid": dsn.envid,
            "recipients": [
                {
                    "address": r.address,
                    "notify": list(r.notify) if r.notify is not None else None,
                    "orcpt": list(r.orcpt) if r.orcpt is not None else None,
                }
                for r in dsn.recipients
            ],
        }
    return json.dumps(document, separators=(",", ":"))


def mailbox_from_meta(meta: str) -> str:
    """The sending mailbox kept by L{meta_json}; empty when there is none.

    Empty too for a row queued before mailboxes were kept, and for
    unreadable text: the provider then chooses as it always did.
    """
    try:
        document = json.loads(meta)
    except ValueError:
        return ""
    found = document.get("mailbox") if isinstance(document, dict) else None
    return found if isinstance(found, str) else ""


def dsn_from_meta(meta: str) -> Dsn | None:
    """The L{Dsn} kept by L{meta_json}; None when there was none (or it is unreadable)."""
    try:
        document = json.loads(meta)
    except ValueError:
        return None
    found = document.get("dsn") if isinstance(document, dict) else None
    if not isinstance(found, dict):
        return None
    recipients = []
    for entry in found.get("recipients") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            continue
        notify, orcpt = entry.get("notify"), entry.get("orcpt")
        recipients.append(
            RecipientDsn(
                entry["address"],
                tuple(str(n) for n in notify) if isinstance(notify, list) else None,
                (str(orcpt[0]), str(orcpt[1]))
                if isinstance(orcpt, list) and len(orcpt) == 2
                else None,
            )
        )
    ret, envid = found.get("ret"), found.get("envid")
    return Dsn(
        ret if isinstance(ret, str) else None,
        envid if isinstance(envid, str) else None,
        tuple(recipients),
    )


class QueueFront:
    """What the delivery code of every session uses to queue a message.

    @param kick: called once a message is durable, so this process's worker
        looks for due messages now rather than at its next poll.
    """

    def __init__(
        self,
        store: QueueStore,
        reactor: IReactorTime,
        route: str = "",
        kick: Callable[[], None] = lambda: None,
        *,
        open: bool = True,
    ) -> None:
        self.store = store
        self._reactor = reactor
        self.route = route
        self._kick = kick
        # Messages finished while the store is still opening (the first
        # milliseconds after start) wait here rather than hear 451; None
        # once open.  Bounded by the number of sessions.
        self._waiting: list[defer.Deferred[None]] | None = None if open else []
        self._waiting_ids: dict[str, defer.Deferred[None]] = {}

    def opened(self) -> None:
        """The store is open: messages waiting for it go in, and later ones at once."""
        waiting, self._waiting = self._waiting or [], None
        self._waiting_ids.clear()
        for waiter in waiting:
            waiter.callback(None)

    def open_failed(self) -> None:
        """The store could not be opened (the relay is stopping): refuse with 451."""
        waiting, self._waiting = self._waiting or [], []
        self._waiting_ids.clear()
        for waiter in waiting:
            waiter.errback(TransientDeliveryError("the queue is not available, try again later"))

    def new_id(self) -> str:
        return new_queue_id(self._reactor.seconds())

    def route_for(self, mailbox: str) -> str:
        """The lane of a message bound to C{mailbox} (an identity's); the default without one."""
        return mailbox.casefold() if mailbox else self.route

    def enqueue(self, id: str, envelope: Envelope, body: BodySource) -> defer.Deferred[None]:
        """Store the message; fires once it is durable (then the worker is woken)."""
        if self._waiting is not None:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiting.append(waiter)
            self._waiting_ids[id] = waiter
            return waiter.addCallback(lambda _: self._enqueue(id, envelope, body))
        return self._enqueue(id, envelope, body)

    def withdraw(self, id: str) -> bool:
        """Give up queuing C{id} if it can still be stopped before its commit.

        True: it will never be stored, and its C{enqueue} Deferred fails
        with L{EnqueueWithdrawnError}; False: it is stored or being
        committed, and that Deferred tells the outcome.  See
        L{smtpproxy.queue.store.QueueStore.withdraw}.
        """
        waiter = self._waiting_ids.pop(id, None)
        if waiter is not None and self._waiting is not None:
            self._waiting.remove(waiter)
            waiter.errback(EnqueueWithdrawnError(id))
            return True
        return self.store.withdraw(id)

    def _enqueue(self, id: str, envelope: Envelope, body: BodySource) -> defer.Deferred[None]:
        try:
            stored = self.store.enqueue(id, envelope, body, self._reactor.seconds())
        except Exception:
            return defer.fail()

        def queued(result: None) -> None:
            self._kick()
            return result

        return stored.addCallback(queued)
