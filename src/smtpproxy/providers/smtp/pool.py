"""A bounded set of upstream sessions, kept open and reused.

At most C{size} connections exist at once (open, opening or busy); a
delivery that finds none idle and the limit reached waits for one to be
handed back.  Idle sessions close after L{IDLE_SECONDS}, well before a
typical server's own idle timeout (Postfix: 300 s), so a reused session is
rarely one the upstream is about to drop; when it is, the provider retries
once on a fresh one (L{smtpproxy.providers.smtp.client.StaleConnectionError}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.providers.smtp.client import RelayClient

IDLE_SECONDS = 30.0


class Pool:
    """Hands out ready L{RelayClient}s; C{connect} makes a new one (ready or failed)."""

    def __init__(
        self, connect: Callable[[], Deferred[RelayClient]], size: int, reactor: IReactorTime
    ) -> None:
        self._connect = connect
        self._size = size
        self._reactor = reactor
        self._opening = 0
        self._members: set[RelayClient] = set()
        self._idle: list[tuple[RelayClient, IDelayedCall]] = []
        self._waiters: deque[Deferred[RelayClient | None]] = deque()
        self._closed = False

    @property
    def open(self) -> int:
        """Connections open, opening or in use."""
        return self._opening + len(self._members)

    async def acquire(self) -> RelayClient:
        """A ready session, reused when one is idle."""
        while True:
            if self._closed:
                raise TransientDeliveryError("the relay is shutting down", "4.3.2")
            while self._idle:
                client, timer = self._idle.pop()
                timer.cancel()
                if client.usable:
                    return client
                self._forget(client)
            if self.open < self._size:
                self._opening += 1
                try:
                    client = await self._connect()
                except BaseException:
                    # Free the place before waking a waiter, which runs at once.
                    self._opening -= 1
                    self._wake()
                    raise
                self._opening -= 1
                self._members.add(client)
                client.on_lost = self._lost
                return client
            waiter: Deferred[RelayClient | None] = Deferred()
            self._waiters.append(waiter)
            handed = await waiter
            if handed is not None:
                return handed

    def release(self, client: RelayClient) -> None:
        """Hand C{client} back after a transaction, whatever its outcome."""
        if not client.usable or self._closed:
            self._forget(client)
            client.quit()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(client)
                return
        timer = self._reactor.callLater(IDLE_SECONDS, self._expire, client)
        self._idle.append((client, timer))

    def _expire(self, client: RelayClient) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not client]
        self._forget(client)
        client.quit()

    def _lost(self, client: RelayClient) -> None:
        """A connection closed (by either side): its place is free."""
        for index, (idle, timer) in enumerate(self._idle):
            if idle is client:
                del self._idle[index]
                if timer.active():
                    timer.cancel()
                break
        self._forget(client)

    def _forget(self, client: RelayClient) -> None:
        if client in self._members:
            self._members.discard(client)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(None)
                return

    def close(self) -> Deferred[None]:
        """QUIT every idle session; busy ones close when handed back.

        Fires once every connection is gone (each QUIT is bounded by its
        own short timeout).
        """
        self._closed = True
        members = list(self._members)
        idle, self._idle = self._idle, []
        for client, timer in idle:
            timer.cancel()
            client.quit()
        self._wake_all()
        gone = [client.closed() for client in members]
        return gatherResults(gone).addCallback(lambda _: None)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
