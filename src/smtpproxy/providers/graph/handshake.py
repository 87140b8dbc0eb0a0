"""A TLS connection counts as made only once its handshake has completed.

Twisted's C{wrapClientTLS} hands its protocol over as soon as the TCP
connection is up; the HTTP client then writes its request, which waits in
the TLS layer until the handshake is done.  If the handshake never
completes (a middlebox that swallows TLS, a front end that accepts and
hangs), the request never left the relay, yet to the provider it looked
like a request on the wire whose answer did not come: "possibly sent".

L{HandshakeEndpoint} wraps such an endpoint and fires only once the peer
has completed the handshake (Twisted's public C{IHandshakeListener}), so:

  - a timeout that cancels the connection before then fails with
    C{ConnectingCancelledError}, as a timeout during the TCP connect does;
  - a connection lost before then (a refused certificate, a reset) fails
    with L{HandshakeFailedError};

and the provider reads both as "never connected": nothing reached Graph.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


class HandshakeFailedError(Exception):
    """The connection ended before its TLS handshake completed; nothing was sent over it."""


@implementer(IHandshakeListener)
class _Gate(Protocol):
    """Sits between the TLS layer and the HTTP protocol until the handshake is done.

    The HTTP protocol gets the TLS transport itself; the gate only passes
    bytes and the end of the connection on, and fires C{ready} with the
    HTTP protocol once the handshake has completed.
    """

    def __init__(self, inner: IProtocol, ready: Deferred[IProtocol]) -> None:
        self._inner = inner
        self._ready = ready

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # connectionMade: makeConnection set it
        self._inner.makeConnection(transport)

    def handshakeCompleted(self) -> None:
        # A peer whose certificate was refused after the handshake has its
        # connection aborted at once: wait for its connectionLost instead.
        if getattr(self.transport, "disconnecting", False):
            return
        if not self._ready.called:
            self._ready.callback(self._inner)

    def dataReceived(self, data: bytes) -> None:
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._ready.called:
            self._ready.errback(
                HandshakeFailedError("the connection ended before the TLS handshake completed")
            )
        self._inner.connectionLost(reason)

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class _GateFactory(ClientFactory):
    def __init__(self, inner: IProtocolFactory, ready: Deferred[IProtocol]) -> None:
        self._inner = inner
        self._ready = ready
        self.gate: _Gate | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        # The TLS layer always names the peer; without one there is nothing to build.
        inner = self._inner.buildProtocol(addr) if addr is not None else None
        if inner is None:
            return None
        self.gate = _Gate(inner, self._ready)
        return self.gate


@implementer(IStreamClientEndpoint)
class HandshakeEndpoint:
    """C{tls_endpoint} (from C{wrapClientTLS}), connected once the TLS handshake is done.

    @param target: the address named in a C{ConnectingCancelledError}.
    """

    def __init__(self, tls_endpoint: IStreamClientEndpoint, target: IAddress) -> None:
        self._endpoint = tls_endpoint
        self._target = target

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[IProtocol] | None = None
        factory: _GateFactory | None = None

        def cancel(ready: Deferred[IProtocol]) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
                return
            if factory is not None and factory.gate is not None:
                factory.gate.abort()
            # Still in the handshake: nothing can have been sent yet.
            if not ready.called:
                ready.errback(ConnectingCancelledError(self._target))  # type: ignore[no-untyped-call]

        ready: Deferred[IProtocol] = Deferred(cancel)
        factory = _GateFactory(protocolFactory, ready)
        connecting = self._endpoint.connect(factory)

        def failed(reason: Failure) -> None:
            if not ready.called:
                ready.errback(reason)

        connecting.addErrback(failed)
        return ready
