"""PROXY protocol (v1 and v2) in front of the SMTP listener.

Twisted's own C{haproxy:} endpoint connects the wrapped protocol as soon as
TCP connects, before the header has said who the client is.  An SMTP server
speaks first and takes its policy decisions at connect time, so it would
greet, log and judge the load balancer's address instead of the client's.
This wrapper holds the SMTP session back until the header is parsed, and
drops connections that never send one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import WrappingFactory
from zope.interface import directlyProvides, providedBy

from smtpproxy.logsummary import LogSummary

log = Logger(namespace="smtpproxy.proxyheader")

PREFIX = "haproxy:"
# A load balancer sends the header with its first packet; a peer that has
# said nothing for this long is not one.
HEADER_TIMEOUT = 10.0
MAX_HEADER = 536  # v1 is at most 107 bytes; v2 with TLVs stays well below this


class _HeaderFirstWrapper(HAProxyProtocolWrapper):
    factory: ProxyHeaderFactory

    @property
    def _tcp(self) -> Any:
        return self.transport

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._started = False
        self._pending = b""
        self._timer: IDelayedCall | None = self.factory.reactor.callLater(
            HEADER_TIMEOUT, self._give_up
        )

    def _give_up(self) -> None:
        self._timer = None
        self._log_refusal("no PROXY header received, closing")
        self._tcp.abortConnection()

    def _log_refusal(self, event: str) -> None:
        """One line per peer address and interval: any peer can repeat this at will."""
        peer = self._tcp.getPeer()
        host = str(getattr(peer, "host", peer))
        self.factory.log_summary.emit(LogLevel.warn, event, host, peer=str(peer))

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        self._pending += data
        try:
            if self._parser is None:
                pending = self._pending
                if len(pending) >= 16 and pending[:12] == V2Parser.PREFIX:
                    self._parser = V2Parser()
                elif len(pending) >= 8 and pending[:5] == V1Parser.PROXYSTR:
                    self._parser = V1Parser()
                elif len(pending) >= 16 or not _could_be_header(pending):
                    raise InvalidProxyHeader()
                else:
                    return
                data, self._pending = self._pending, b""
            else:
                self._pending = b""
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._reject("invalid PROXY header")
            return
        if info is None:
            if self._parser is not None and len(getattr(self._parser, "buffer", b"")) > MAX_HEADER:
                self._reject("PROXY header too long")
            return
        self._proxyInfo = info
        self._started = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def _reject(self, why: str) -> None:
        self._log_refusal(f"closing connection: {why}")
        self._tcp.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)


def _could_be_header(data: bytes) -> bool:
    """True while C{data} is still a prefix of some v1 or v2 header."""
    v1, v2 = V1Parser.PROXYSTR, V2Parser.PREFIX
    return v1.startswith(data[: len(v1)]) or v2.startswith(data[: len(v2)])


class ProxyHeaderFactory(WrappingFactory):
    """Wraps the SMTP factory so sessions start after the PROXY header."""

    protocol = _HeaderFirstWrapper

    def __init__(self, wrapped: Any, reactor: IReactorTime) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.log_summary = LogSummary(log, reactor)

    def stopFactory(self) -> None:
        """The listener closed: write the refusals counted so far, stop the timer."""
        self.log_summary.stop()

    def logPrefix(self) -> str:
        return "smtpproxy (PROXY)"


def split_proxy(description: str) -> tuple[bool, str]:
    """C{"haproxy:tcp:2525"} → C{(True, "tcp:2525")}; anything else unchanged."""
    if description.startswith(PREFIX):
        return True, description[len(PREFIX) :]
    return False, description
