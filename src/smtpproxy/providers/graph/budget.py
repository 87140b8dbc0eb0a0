"""Sending budgets per mailbox: Exchange Online's sending limits, counted before Graph is asked.

Exchange Online lets one mailbox send to so many recipients in a rolling
24 hours (10,000 by default, every recipient of every message counted) and
so many messages a minute (30).  Past the first, Graph still answers 202
and Exchange then bounces the message into the sending mailbox, where a
relay's operator rarely looks: the mail is lost without the client hearing
of it.  So the relay counts for itself and holds a message back (a 451 in
direct mode, a later retry in queue mode) rather than hand Exchange one it
would bounce.

Everything here is pure: times come in as arguments, nothing reads a
clock, logs or does I/O, so every rule is tested with plain numbers.

Each limit is a L{Window}: a fixed number of buckets covering the window,
so memory stays bounded however much is sent (1,440 one-minute buckets for
the day, 60 one-second buckets for the minute).  A bucket counts in full
until all of it has left the window, so a budget frees at most one bucket
width later than an exact sliding window would, never earlier: the relay
may hold a message a little too long, and never sends one Exchange would
count over the limit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Buckets per window: the day in minutes, the minute in seconds.
DAY_BUCKETS = 1440
MINUTE_BUCKETS = 60


class Window:
    """How much was used in the last C{span} seconds, in C{buckets} slices.

    @ivar limit: what the window allows; 0 means no limit (nothing is counted).
    """

    def __init__(self, limit: int, span: float, buckets: int) -> None:
        if span <= 0 or buckets <= 0:
            raise ValueError("a window needs a positive span and bucket count")
        self.limit = limit
        self.span = span
        self.buckets = buckets
        self.width = span / buckets
        # (bucket number, amount), oldest first; at most buckets + 1 entries.
        self._slots: deque[tuple[int, int]] = deque()
        self._total = 0

    def slot(self, now: float) -> int:
        """The number of the bucket C{now} falls in (what the store keys a count by)."""
        return math.floor(now / self.width)

    def _expire(self, now: float) -> None:
        # A bucket leaves the window once its end is span seconds ago.
        first = self.first_slot(now)
        while self._slots and self._slots[0][0] < first:
            self._total -= self._slots.popleft()[1]

    def first_slot(self, now: float) -> int:
        """The oldest bucket still inside the window at C{now} (the window spans one more
        bucket than C{buckets}, the oldest only in part: counting it whole is the
        conservative side)."""
        return self.slot(now) - self.buckets

    def used(self, now: float) -> int:
        """What the window holds at C{now}."""
        self._expire(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        """Count C{amount} at C{now}."""
        if self.limit == 0 or amount <= 0:
            return
        self._expire(now)
        slot = self.slot(now)
        if self._slots and self._slots[-1][0] >= slot:
            # The same bucket (or the clock went back: count it in the newest).
            last, count = self._slots[-1]
            self._slots[-1] = (last, count + amount)
        else:
            self._slots.append((slot, amount))
        self._total += amount

    def remove(self, now: float, amount: int, at: float) -> None:
        """Give back C{amount} counted at time C{at} (if its bucket is still held)."""
        if self.limit == 0 or amount <= 0:
            return
        self._expire(now)
        slot = self.slot(at)
        for index, (held, count) in enumerate(self._slots):
            if held == slot:
                taken = min(count, amount)
                self._slots[index] = (held, count - taken)
                self._total -= taken
                return

    def replace(self, now: float, counts: Iterable[tuple[int, int]]) -> None:
        """Take the counts (bucket number, amount) another process stored, in place of ours."""
        first = self.first_slot(now)
        merged: dict[int, int] = {}
        for slot, amount in counts:
            if first <= slot <= self.slot(now) and amount > 0:
                merged[slot] = merged.get(slot, 0) + amount
        self._slots = deque(sorted(merged.items()))
        self._total = sum(merged.values())

    def wait(self, now: float, amount: int) -> float:
        """Seconds from C{now} until C{amount} more fits (0: it fits now; inf: never)."""
        if self.limit == 0:
            return 0.0
        if amount > self.limit:
            return math.inf
        excess = self.used(now) + amount - self.limit
        if excess <= 0:
            return 0.0
        for slot, count in self._slots:
            excess -= count
            if excess <= 0:
                # This bucket leaves the window when its end is span seconds old.
                return max(0.0, (slot + 1) * self.width + self.span - now)
        return math.inf  # unreachable: the buckets hold all that is used

    def share(self, now: float) -> float:
        """The used fraction of the limit (0 without a limit)."""
        return self.used(now) / self.limit if self.limit else 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """C{GRAPH_MAILBOX_RECIPIENTS_PER_DAY} and C{GRAPH_MAILBOX_MESSAGES_PER_MINUTE}.

    The spans are Exchange's (a rolling day, a minute); tests shorten them.
    A limit of 0 is not counted (so is a limit left out here: the relay's
    defaults are the settings', declared once in the provider's settings).
    """

    recipients_per_day: int = 0
    messages_per_minute: int = 0
    day: float = 86_400.0
    minute: float = 60.0


class MailboxBudget:
    """One mailbox's two windows."""

    def __init__(self, limits: Limits) -> None:
        self.recipients = Window(limits.recipients_per_day, limits.day, DAY_BUCKETS)
        self.messages = Window(limits.messages_per_minute, limits.minute, MINUTE_BUCKETS)

    def wait(self, now: float, recipients: int) -> tuple[float, str]:
        """Seconds until one more message to C{recipients} people fits, and the limit that binds."""
        by_messages = self.messages.wait(now, 1)
        by_recipients = self.recipients.wait(now, recipients)
        if by_recipients >= by_messages:
            return by_recipients, RECIPIENTS
        return by_messages, MESSAGES

    def take(self, now: float, recipients: int) -> None:
        self.messages.add(now, 1)
        self.recipients.add(now, recipients)

    def give_back(self, now: float, recipients: int, at: float) -> None:
        self.messages.remove(now, 1, at)
        self.recipients.remove(now, recipients, at)

    def load(self, now: float) -> float:
        """How used the mailbox is: the larger share of its two limits."""
        return max(self.recipients.share(now), self.messages.share(now))


#: The setting each limit comes from, as named in replies and logs.
RECIPIENTS = "GRAPH_MAILBOX_RECIPIENTS_PER_DAY"
MESSAGES = "GRAPH_MAILBOX_MESSAGES_PER_MINUTE"


@dataclass(frozen=True, slots=True)
class Granted:
    """Send as C{mailbox}; its budget has been charged."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class Wait:
    """No allowed mailbox has room: try again in C{delay} seconds (inf: never).

    @ivar limit: the setting that binds on the mailbox that frees first.
    """

    delay: float
    limit: str
    mailboxes: tuple[str, ...]


class Budgets:
    """The budgets of every sending mailbox, and the choice among them.

    Keys are the mailboxes case-folded, like Graph's own view of them.
    """

    def __init__(self, limits: Limits, mailboxes: Sequence[str]) -> None:
        self.limits = limits
        self._budgets = {m.casefold(): MailboxBudget(limits) for m in mailboxes}

    def of(self, mailbox: str) -> MailboxBudget:
        key = mailbox.casefold()
        found = self._budgets.get(key)
        if found is None:
            found = self._budgets[key] = MailboxBudget(self.limits)
        return found

    def take(self, candidates: Sequence[str], recipients: int, now: float) -> Granted | Wait:
        """Charge the least-used candidate that has room for one message to C{recipients}.

        @param candidates: the mailboxes the message may go from, in
            configuration order (which breaks ties): the one its From
            names, or every sending mailbox.
        """
        best: tuple[float, int, str] | None = None
        waits: list[tuple[float, str]] = []
        for index, mailbox in enumerate(candidates):
            budget = self.of(mailbox)
            delay, limit = budget.wait(now, recipients)
            if delay > 0:
                waits.append((delay, limit))
                continue
            rank = (budget.load(now), index, mailbox)
            if best is None or rank < best:
                best = rank
        if best is not None:
            self.of(best[2]).take(now, recipients)
            return Granted(best[2])
        delay, limit = min(waits)
        return Wait(delay, limit, tuple(candidates))

    def give_back(self, mailbox: str, recipients: int, now: float, at: float) -> None:
        """Undo a L{take} made at C{at} whose message was never offered to Graph."""
        self.of(mailbox).give_back(now, recipients, at)
