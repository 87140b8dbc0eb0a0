"""The test suite's fake Graph, served on loopback with a fixed answer delay.

The Graph path benchmark needs a Graph that answers like the real one, only
closer: this serves L{tests.fakegraph.FakeGraph} (which checks every request
the way Graph does) and holds every answer for C{--delay} seconds, 20 ms by
default, so that what the relay adds on top of Graph's own time can be
measured.  It counts what the relay did: HTTP requests by route and TCP
connections opened.

It prints C{{"port": N}} once listening; each line C{stats} on stdin is
answered with one JSON line of counters, with the time each request was held
(arrival of the whole request to the end of the answer: the fake's own
time, which the relay's added latency is measured against); it exits when
stdin closes.

With C{--tls CERT KEY} it serves HTTPS with that certificate (PEM files),
so the relay's TLS cost to Graph can be measured too.

Run: C{PYTHONPATH=src:. python bench/peers/fake_graph.py [--delay 0.02] [--tls CERT KEY]}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from tests.fakegraph import FakeGraph
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


class Delayed(Resource):
    """Hands each request to the fake only after C{delay} seconds."""

    isLeaf = True

    def __init__(self, inner: Resource, delay: float, clock: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.delay = delay
        self.clock = clock

        self.held: list[float] = []

    def render(self, request: Request) -> int:
        start = self.clock.seconds()

        def done(result: object) -> None:
            self.held.append(self.clock.seconds() - start)

        request.notifyFinish().addBoth(done)
        self.clock.callLater(self.delay, self.inner.render, request)
        return NOT_DONE_YET


class CountingSite(Site):
    """A Site that counts the TCP connections it accepted."""

    connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]


class Control(LineReceiver):
    """Answers C{stats} on stdin; closing stdin stops the reactor."""

    delimiter = b"\n"

    def __init__(self, fake: FakeGraph, site: CountingSite, delayed: Delayed, reactor: Any) -> None:
        self.fake = fake
        self.site = site
        self.delayed = delayed
        self.reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        if line.strip() != b"stats":
            return
        routes = Counter(seen.route for seen in self.fake.requests)
        held = self.delayed.held
        stats = {
            "held_ms": [round(1000 * h, 3) for h in held],
            "requests": dict(routes),
            "deliveries": len(self.fake.deliveries),
            "connections": self.site.connections,
            "violations": self.fake.violations[:5],
            "violation_count": len(self.fake.violations),
        }
        self.sendLine(json.dumps(stats).encode())  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor, stdio

    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS")
    args = parser.parse_args(argv)
    fake = FakeGraph(reactor)
    delayed = Delayed(fake.resource, args.delay, reactor)
    site: Any = CountingSite(delayed)  # type: ignore[no-untyped-call]
    port: Any
    if args.tls:
        from twisted.internet.ssl import PrivateCertificate

        with open(args.tls[0], "rb") as cert, open(args.tls[1], "rb") as key:
            pem = cert.read() + key.read()
        identity = PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]
        listener: Any = reactor
        port = listener.listenSSL(0, site, identity.options(), backlog=1024, interface="127.0.0.1")
        fake.endpoint = f"https://127.0.0.1:{port.getHost().port}"
    else:
        port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")
        fake.endpoint = f"http://127.0.0.1:{port.getHost().port}"
    control: Protocol = Control(fake, site, delayed, reactor)
    stdio.StandardIO(control)  # type: ignore[no-untyped-call]
    print(json.dumps({"port": port.getHost().port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
