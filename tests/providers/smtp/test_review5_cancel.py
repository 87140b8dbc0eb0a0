"""Review 5: cancelling an upstream SMTP send while its connection is being set up.

A real loopback upstream (a minimal server written here, so the test can
see when its connection is closed, or a listening socket whose backlog is
full, so a connection attempt stays pending) and the real L{SmtpProvider}.
"""

from __future__ import annotations

import contextlib
import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from smtpproxy.providers.result import SendCancelledError, watched
from smtpproxy.providers.smtp.provider import SmtpProvider
from tests.providers.smtp.test_client import Case, message
from tests.providers.smtp.upstream import Script, port_of, relay_settings
from tests.support import async_test

#: The upstream greets this long after the connection is made.
GREETING_DELAY = 0.3


class SlowGreeter(LineReceiver):
    """Greets late, then says 250 to everything; remembers whether it was closed."""

    def __init__(self, sessions: list[SlowGreeter]) -> None:
        self.lost = False
        self.greeting: IDelayedCall | None = None
        sessions.append(self)

    def connectionMade(self) -> None:
        self.greeting = reactor.callLater(GREETING_DELAY, self._greet)

    def _greet(self) -> None:
        if not self.lost:
            self.sendLine(b"220 upstream.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if line.upper().startswith(b"EHLO"):
            self.sendLine(b"250-upstream.test")
            self.sendLine(b"250 PIPELINING")
        else:
            self.sendLine(b"250 2.0.0 Ok")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        if self.greeting is not None and self.greeting.active():
            self.greeting.cancel()


class SetupCancelTests(Case):
    @async_test
    async def test_cancel_while_connecting_closes_the_upstream_connection(self) -> None:
        """A send cancelled while its new upstream session waits for the greeting
        (pool.acquire -> _open -> client.ready) leaves no connection behind.

        C{RelayClient.ready} is a Deferred without a canceller: cancelling it
        only fails the wait, the session carries on (greeting, EHLO), is
        never handed to the pool (not a member, so L{Pool.close} does not
        close it either) and, idle with its timeout switched off, stays open
        until the upstream drops it.  Right: the cancel closes the half-made
        session at once (as L{RelayClient._cancel} does for a transaction).
        """
        sessions: list[SlowGreeter] = []
        factory = Factory.forProtocol(lambda: SlowGreeter(sessions))
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)

        def cut_leftovers() -> None:
            # The leaked client connection would make the reactor dirty.
            for session in sessions:
                if not session.lost and session.transport is not None:
                    session.transport.abortConnection()  # type: ignore[attr-defined]

        provider = SmtpProvider(relay_settings(port_of(port), timeout=30.0), reactor)
        self.addCleanup(provider.close)
        self.addCleanup(deferLater, reactor, 0.1, lambda: None)
        self.addCleanup(cut_leftovers)
        sending = provider.send(message())
        for _ in range(200):
            if sessions:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(sessions), 1)
        # Let the client side see its connection made too (connectProtocol
        # fired): it now waits for the greeting, due at GREETING_DELAY.
        await deferLater(reactor, GREETING_DELAY / 3, lambda: None)
        sending.cancel()
        with self.assertRaises(SendCancelledError):
            await sending
        # Past the greeting and EHLO, well inside the client's 30 s timeout.
        await deferLater(reactor, GREETING_DELAY + 1.0, lambda: None)
        self.assertTrue(sessions[0].lost, "the cancelled session's connection is still open")

    @async_test
    async def test_cancel_while_the_tcp_connect_is_pending_says_cancelled(self) -> None:
        """A send cancelled while its TCP connection to the upstream is still being made
        fails with L{SendCancelledError} (nothing handed over), as
        L{smtpproxy.providers.result} requires of a cancelled send.

        L{SmtpProvider._open} wraps C{connectProtocol} in C{except Exception},
        which also catches the cancellation (C{CancelledError} is an
        C{Exception}), and turns it into C{TransientDeliveryError("cannot
        connect to the upstream: ...")} with an "upstream connection failed"
        warning: a forced stop reads as an upstream outage, and the HTTP API
        answers with the provider's error instead of C{shutting_down}.
        Right: a cancellation passes through as L{SendCancelledError}.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            # Never accepted: they fill the backlog, so the relay's SYN waits.
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        provider = SmtpProvider(relay_settings(port, timeout=30.0), reactor)
        self.addCleanup(provider.close)
        sending = provider.send(message())
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(sending.called, "the connection attempt should still be pending")
        sending.cancel()
        try:
            await sending
        except BaseException as e:
            error = e
        else:
            self.fail("the cancelled send succeeded")
        self.assertIsInstance(error, SendCancelledError)
        assert isinstance(error, SendCancelledError)
        self.assertFalse(error.handed_over)


class HandoverTests(Case):
    @async_test
    async def test_handover_is_marked_at_the_final_dot_not_before(self) -> None:
        """The provider tells its caller (L{watched}) when the upstream has the whole
        body: not while the envelope is being answered, and before the upstream's final
        reply, which is what a forced stop then waits for instead of cancelling."""
        script = Script(final_delay=0.5)
        script.data_delay = 0.3
        provider = await self.upstream(script)
        sending, handover = watched(lambda: provider.send(message()))
        for _ in range(20):
            if b"DATA" in script.commands:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(handover.handed_over, "marked before the body went")
        for _ in range(100):
            if script.bodies:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(script.bodies), 1)
        self.assertTrue(handover.handed_over)
        self.assertFalse(sending.called, "the upstream has not answered yet")
        await sending
