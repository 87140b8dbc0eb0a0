"""Reaching Entra and Graph through an HTTP proxy: a CONNECT tunnel with TLS inside.

Twisted's C{ProxyAgent} speaks to plain-HTTP proxies by sending them the
whole request, which is no use for C{https} URLs: the proxy would see the
bearer token.  Here the proxy only carries bytes: the relay asks it to
C{CONNECT graph.microsoft.com:443}, and once it answers C{200} the TLS
handshake with Graph runs inside that connection, verified as without a
proxy.  L{GraphEndpoints} is what the provider's C{Agent} asks for a
connection per URL (public API: C{Agent.usingEndpointFactory}); it decides,
from C{NO_PROXY}, whether a host goes through the tunnel or direct.

Plain C{http} URLs (the managed identity endpoint on 169.254.169.254, or
App Service's on localhost; test fakes) always go direct: the proxy is
C{HTTPS_PROXY}, for HTTPS.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from smtpproxy.providers.graph.handshake import HandshakeEndpoint
from smtpproxy.providers.graph.proxyconfig import NoProxy, ProxyConfig

log = Logger(namespace="smtpproxy.graph")

# The proxy's answer to CONNECT is a status line and a few headers; more
# than this is not a proxy we can talk to.
MAX_ANSWER = 16 * 1024
CONNECT_TIMEOUT = 30

_HINTS = {
    407: "the proxy wants credentials: put them in HTTPS_PROXY as http://user:password@host:port",
    403: "the proxy does not allow this destination (check its allowed ports and hosts)",
}


class ProxyTunnelError(Exception):
    """The proxy would not (or could not) open the tunnel; nothing reached Graph.

    Like a refused connection, the request certainly had no effect, so
    retrying it cannot send a message twice.
    """


def connect_request(host: str, port: int, authorization: bytes | None) -> bytes:
    """The C{CONNECT} request for C{host}:C{port} (IPv6 literals in brackets)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: smtpproxy"]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    if authorization is not None:
        head += b"Proxy-Authorization: " + authorization + b"\r\n"
    return head + b"\r\n"


def answer_status(head: bytes) -> int:
    """The status code of the proxy's answer head (0 when it is not HTTP)."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])


class _TunnelProtocol(Protocol):
    """Sends CONNECT, reads the answer, then hands the connection to the inner protocol."""

    def __init__(
        self,
        request: bytes,
        inner_factory: IProtocolFactory,
        ready: Deferred[IProtocol],
        where: dict[str, str],
    ) -> None:
        self._request = request
        self._inner_factory = inner_factory
        self._ready = ready
        self._where = where
        self._buffer = bytearray()
        self._inner: IProtocol | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # connectionMade: makeConnection set it
        transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_ANSWER:
                self._fail(0, "the proxy's answer to CONNECT is too long")
            return
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        status = answer_status(head)
        if not 200 <= status < 300:
            why = f"HTTP {status}" if status else "not an HTTP answer"
            self._fail(status, f"the proxy refused the tunnel ({why})")
            return
        transport = self.transport
        assert transport is not None  # bytes arrived, so it is connected
        inner = self._inner_factory.buildProtocol(transport.getPeer())
        if inner is None:
            self._fail(0, "no protocol for the tunnel")
            return
        self._inner = inner
        inner.makeConnection(transport)
        if not self._ready.called:
            self._ready.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(
                ProxyTunnelError("the proxy closed the connection before the tunnel opened")
            )

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _fail(self, status: int, text: str) -> None:
        fields = dict(self._where)
        if status in _HINTS:
            fields["hint"] = _HINTS[status]
        log.error("could not open a tunnel through the proxy", status=status, **fields)
        if not self._ready.called:
            self._ready.errback(ProxyTunnelError(text))
        self.abort()


class _TunnelFactory(ClientFactory):
    def __init__(self, protocol: _TunnelProtocol) -> None:
        self.tunnel = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.tunnel


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A connection to C{host}:C{port} through the HTTP proxy at C{proxy_endpoint}."""

    def __init__(
        self, proxy_endpoint: IStreamClientEndpoint, proxy: ProxyConfig, host: str, port: int
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._request = connect_request(host, port, proxy.authorization)
        self._where = {"proxy": proxy.display, "target": f"{host}:{port}"}
        self._target = HostnameAddress(host.encode(), port)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[IProtocol] | None = None
        tunnel: _TunnelProtocol | None = None

        def cancel(waiting: Deferred[IProtocol]) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
            elif tunnel is not None:
                tunnel.abort()
                # The proxy has not opened the tunnel: nothing can have
                # reached the target yet, so this is still connecting (the
                # provider then knows the request never left).
                if not waiting.called:
                    cancelled = ConnectingCancelledError(self._target)  # type: ignore[no-untyped-call]
                    waiting.errback(cancelled)

        ready: Deferred[IProtocol] = Deferred(cancel)
        tunnel = _TunnelProtocol(self._request, protocolFactory, ready, self._where)
        connecting = self._proxy_endpoint.connect(_TunnelFactory(tunnel))

        def failed(reason: Failure) -> None:
            if not ready.called:
                log.warn(
                    "could not connect to the proxy",
                    error=type(reason.value).__name__,
                    **self._where,
                )
                ready.errback(reason)

        connecting.addErrback(failed)
        return ready


@implementer(IAgentEndpointFactory)
class GraphEndpoints:
    """For each URL the Agent asks for: direct, or through the proxy's tunnel; TLS for https."""

    def __init__(
        self,
        reactor: Any,
        tls_policy: IPolicyForHTTPS,
        proxy: ProxyConfig | None = None,
        no_proxy: NoProxy | None = None,
    ) -> None:
        self._reactor = reactor
        self._tls = tls_policy
        self._proxy = proxy
        self._no_proxy = no_proxy or NoProxy()

    def proxied(self, host: str, port: int) -> bool:
        """Does an https request to C{host}:C{port} go through the proxy?"""
        return self._proxy is not None and not self._no_proxy.bypasses(host, port)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        direct = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=CONNECT_TIMEOUT)
        if uri.scheme != b"https":
            return direct
        inner: IStreamClientEndpoint = direct
        if self._proxy is not None and self.proxied(host, uri.port):
            proxy = self._proxy
            to_proxy = HostnameEndpoint(
                self._reactor, proxy.host, proxy.port, timeout=CONNECT_TIMEOUT
            )
            inner = TunnelEndpoint(to_proxy, proxy, host, uri.port)
        creator = self._tls.creatorForNetloc(uri.host, uri.port)
        # Connected only once the handshake is done: a request cannot have
        # reached Graph before then (see smtpproxy.providers.graph.handshake).
        return HandshakeEndpoint(wrapClientTLS(creator, inner), HostnameAddress(uri.host, uri.port))
