"""Twisted's stock ESMTP server, accepting every message and keeping none of it.

This is the framework's ceiling: the same reactor and the same C{ESMTP}
class the relay builds on, with a delivery that does no work at all.  Stock
C{SMTP} hands the message to the delivery one line at a time
(C{IMessage.lineReceived}), so this peer pays a Python call per DATA line;
the relay reads DATA in chunks instead, which is where it can beat it.

Only C{noisy} is switched off, so that neither server spends time on
per-message log lines the other does not write.

Run: C{python bench/peers/twisted_stock.py PORT}
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer


@implementer(IMessageSMTP)
class NullMessage:
    """Throws every line away and reports success at the end of DATA."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class NullDelivery:
    """Accepts any sender and any recipient."""

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return NullMessage


class NullFactory(ServerFactory):
    """One stock ESMTP protocol per connection, all sharing one delivery."""

    def __init__(self) -> None:
        self.delivery = NullDelivery()

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol = smtp.ESMTP()  # type: ignore[no-untyped-call]
        protocol.host = b"bench.test"
        protocol.delivery = self.delivery
        protocol.noisy = False
        protocol.factory = self
        return protocol


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    port = int(argv[1])
    reactor.listenTCP(port, NullFactory(), backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
