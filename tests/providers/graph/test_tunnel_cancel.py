"""Cancelling a connection through the proxy before the tunnel is open.

The provider reads a C{ConnectingCancelledError} as "the request never left"
(its budget charge is given back, and a request timer firing then is a
connect timeout, not an answer lost).  While the proxy has not yet answered
C{CONNECT}, nothing can have reached Graph, so cancelling must say so; once
the tunnel is open the connection is Graph's and the usual rules apply.
The proxy here is a C{StringTransport}: no sockets.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtpproxy.providers.graph.proxyconfig import ProxyConfig
from smtpproxy.providers.graph.tunnel import TunnelEndpoint


@implementer(IStreamClientEndpoint)
class _ProxyEndpoint:
    """Connects at once to an in-memory transport, the proxy's side of the socket."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: IProtocol | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3128))
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return succeed(protocol)


class TunnelCancelTests(SynchronousTestCase):
    def open(self) -> tuple[_ProxyEndpoint, Deferred[IProtocol]]:
        proxy = _ProxyEndpoint()
        endpoint = TunnelEndpoint(proxy, ProxyConfig("proxy.test", 3128), "graph.test", 443)
        ready = endpoint.connect(Factory.forProtocol(Protocol))
        self.assertIn(b"CONNECT graph.test:443 ", proxy.transport.value())
        return proxy, ready

    def test_cancel_while_the_proxy_has_not_answered(self) -> None:
        """Cancelled while CONNECT is unanswered: the connection to the proxy is
        dropped and the attempt fails as still connecting, naming the target."""
        proxy, ready = self.open()
        ready.cancel()
        error = self.failureResultOf(ready, ConnectingCancelledError).value
        self.assertEqual(error.address.hostname, b"graph.test")
        self.assertTrue(proxy.transport.disconnecting)

    def test_tunnel_open_is_connected(self) -> None:
        """Once the proxy answered 200 the connection is handed over: it is Graph's."""
        proxy, ready = self.open()
        assert proxy.protocol is not None
        proxy.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertIsInstance(self.successResultOf(ready), Protocol)
