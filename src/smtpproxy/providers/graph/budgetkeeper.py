"""The sending budgets at work: charged before each message, kept with the queue when there is one.

L{smtpproxy.providers.graph.budget} decides; this module feeds it the time
and, with a queue, the counts stored in the queue's database:

  - without a queue the budgets live in this process's memory: a restart
    forgets them, and two relays sending as one mailbox each count only
    their own mail;
  - with a queue (L{smtpproxy.queue.store.CounterStore}) every charge is
    added to the store, and before each choice the candidates' counts are
    read back from it, so a restarted relay, and every replica sharing a
    PostgreSQL queue, sees what was sent.

Reading and adding are two steps, so replicas choosing at the same moment
may both see room for the last message.  Within one process choices are
made one at a time (a lock), so only deliveries of other processes overlap;
the queue lets at most C{GRAPH_MAX_CONCURRENCY} deliveries of one route run
at once across all replicas, so a window can be overdrawn by at most that
many messages less one (docs/graph.md, "Sending budgets").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.providers.graph.budget import (
    MESSAGES,
    Budgets,
    Granted,
    Limits,
    Wait,
    Window,
)
from smtpproxy.queue.store import CounterStore

log = Logger(namespace="smtpproxy.graph")


@dataclass(frozen=True, slots=True)
class Charge:
    """What one message took from a mailbox's budget (to give back if it is never sent)."""

    mailbox: str
    recipients: int
    at: float


def _key(mailbox: str, kind: str, window: Window) -> str:
    # The bucket width is part of the key: a changed window setting never
    # reads counts kept in buckets of another size.
    return f"graph:{mailbox.casefold()}:{kind}:{round(window.width * 1000)}"


class BudgetKeeper:
    """Charges the sending budgets; see the module docstring."""

    def __init__(self, limits: Limits, mailboxes: Sequence[str], reactor: IReactorTime) -> None:
        self.budgets = Budgets(limits, mailboxes)
        self._reactor = reactor
        self._store: CounterStore | None = None
        self._lock = DeferredLock()

    @property
    def counting(self) -> bool:
        """Whether any limit is set (both 0: nothing to count)."""
        limits = self.budgets.limits
        return bool(limits.recipients_per_day or limits.messages_per_minute)

    def keep_in(self, store: CounterStore) -> None:
        """Keep the counts in C{store} (the queue's) from now on."""
        self._store = store

    def _windows(self, mailbox: str) -> list[tuple[str, Window]]:
        budget = self.budgets.of(mailbox)
        return [
            (_key(mailbox, "messages", budget.messages), budget.messages),
            (_key(mailbox, "recipients", budget.recipients), budget.recipients),
        ]

    async def charge(self, candidates: Sequence[str], recipients: int) -> Charge:
        """Charge the least-used candidate for one message to C{recipients} people.

        @raise TransientDeliveryError: no candidate has room (451 4.7.0,
            with C{retry_after} for the queue).
        @raise PermanentDeliveryError: the message has more recipients than
            a whole day's budget.
        """
        await self._lock.acquire()
        try:
            return await self._charge(candidates, recipients)
        finally:
            self._lock.release()

    async def _charge(self, candidates: Sequence[str], recipients: int) -> Charge:
        if self._store is not None:
            now = self._reactor.seconds()
            since = {
                key: window.first_slot(now)
                for mailbox in candidates
                for key, window in self._windows(mailbox)
            }
            rows = await self._store.read_counts(since)
            now = self._reactor.seconds()
            for mailbox in candidates:
                for key, window in self._windows(mailbox):
                    window.replace(now, ((slot, n) for k, slot, n in rows if k == key))
        now = self._reactor.seconds()
        decision = self.budgets.take(candidates, recipients, now)
        if isinstance(decision, Wait):
            raise self._refusal(decision, recipients, now)
        assert isinstance(decision, Granted)
        if self._store is not None:
            await self._save(decision.mailbox, recipients, now)
        return Charge(decision.mailbox, recipients, now)

    async def _save(self, mailbox: str, recipients: int, at: float, sign: int = 1) -> None:
        (messages_key, messages), (recipients_key, window) = self._windows(mailbox)
        counts = [
            (messages_key, messages.slot(at), sign),
            (recipients_key, window.slot(at), sign * recipients),
        ]
        forget = {messages_key: messages.first_slot(at), recipients_key: window.first_slot(at)}
        assert self._store is not None
        await self._store.add_counts(counts, forget)

    async def give_back(self, charge: Charge) -> None:
        """Return a charge whose message never reached Graph (it failed to be planned)."""
        now = self._reactor.seconds()
        self.budgets.give_back(charge.mailbox, charge.recipients, now, charge.at)
        if self._store is not None:
            try:
                await self._save(charge.mailbox, charge.recipients, charge.at, sign=-1)
            except Exception as e:
                # Only the budget is a little too small until the window passes.
                log.warn("could not give back a sending budget charge", error=repr(e))

    def _refusal(self, wait: Wait, recipients: int, now: float) -> Exception:
        names = ", ".join(wait.mailboxes)
        if math.isinf(wait.delay):
            return PermanentDeliveryError(
                f"the message has {recipients} recipients, more than "
                f"GRAPH_MAILBOX_RECIPIENTS_PER_DAY ({self.budgets.limits.recipients_per_day}) "
                "allows a mailbox in a day",
                "5.5.3",
                554,
            )
        delay = math.ceil(wait.delay)
        when = datetime.fromtimestamp(now + delay, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        what = "messages a minute" if wait.limit == MESSAGES else "recipients a day"
        log.warn(
            "sending budget used up; message held back",
            mailboxes=list(wait.mailboxes),
            limit=wait.limit,
            recipients=recipients,
            retry_in_s=delay,
        )
        error = TransientDeliveryError(
            f"sending limit ({what}) reached for {names}; try again after {when} (in {delay} s)",
            "4.7.0",
        )
        error.retry_after = float(delay)
        error.not_attempted = True
        return error
