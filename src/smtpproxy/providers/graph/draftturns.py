"""One MIME-draft send at a time per mailbox and Message-ID, within this process.

After a createDraft whose answer was lost, the provider lists the mailbox's
drafts with the message's C{internetMessageId} and deletes every one but its
own (L{smtpproxy.providers.graph.drafts}).  A MIME draft can be found by
nothing else: Graph takes the draft from the message's bytes, which the
relay never alters, so the draft carries no mark of the attempt that made
it.  Two sends of one message at once (Postfix splitting the recipients
over parallel connections, a client resubmitting while its first attempt
runs) share that Message-ID, and one's clean-up would delete the other's
draft in the middle of its uploads or its send.

So such sends take turns: a send holds its turn from before it creates the
draft until it has sent the draft (or given up on it) and its clean-up has
ended, background clean-up after a cancellation included.  Sends of other
messages are not held up.  What this cannot cover, two relay processes
sending one message at once, is in docs/graph.md.

Bounded: an entry exists only while a send holds or awaits its turn, so
there are never more entries, nor waiters, than sends in flight; every
waiter also waits no longer than its message's time budget.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredLock
from twisted.python.failure import Failure

# (mailbox, Message-ID), both case-folded: Graph's C{eq} on a string
# compares without regard to case, so the lookup would find both.
TurnKey = tuple[str, str]


def turn_key(mailbox: str, message_id: str) -> TurnKey:
    """The key of the sends whose stray lookups would find each other's drafts."""
    return mailbox.casefold(), message_id.casefold()


class DraftTurns:
    """A lock per key, forgotten as soon as nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[TurnKey, DeferredLock] = {}

    def __len__(self) -> int:
        """How many keys are held or awaited now."""
        return len(self._locks)

    def take(self, key: TurnKey) -> Deferred[None]:
        """Fire once the turn for C{key} is ours; cancel it to stop waiting.

        Whoever gets the turn must L{give_back} it exactly once.
        """
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()
        waiting = lock.acquire()

        def stopped(failure: Failure) -> Failure:
            # A cancelled wait: its lock may now be unused.
            self._forget_if_idle(key)
            return failure

        return waiting.addCallbacks(lambda _: None, stopped)

    def give_back(self, key: TurnKey) -> None:
        """End the turn for C{key}: the next waiter, if any, gets it."""
        self._locks[key].release()
        self._forget_if_idle(key)

    def _forget_if_idle(self, key: TurnKey) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked and not lock.waiting:
            del self._locks[key]
