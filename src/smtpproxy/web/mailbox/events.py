"""Live updates for the page: server-sent events when mail arrives.

Each open page holds one C{GET /events} request; every new message is
written to all of them as one C{event: new} with its list entry as JSON,
and a comment line every L{KEEPALIVE} seconds keeps proxies from closing an
idle stream.  Bounded both ways: at most C{max_clients} streams (the next
gets C{503}), and a client that does not read is dropped as soon as its
socket's buffer is full (Twisted pauses the stream as a producer): its
browser reconnects and reloads the list, nothing piles up here.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

from smtpproxy.providers.mailbox.store import Store, Stored
from smtpproxy.web.mailbox.shapes import list_item

#: Seconds between keep-alive comments on an idle stream.
KEEPALIVE = 25.0


@implementer(IPushProducer)
class _Stream:
    """One browser's event stream; finished when the client lags or leaves."""

    def __init__(
        self, request: Request, done: Callable[[_Stream], None], reactor: IReactorTime
    ) -> None:
        self.request = request
        self._done = done
        self._reactor = reactor
        self.open = True

    def send(self, data: bytes) -> None:
        if self.open:
            self.request.write(data)

    def pauseProducing(self) -> None:
        # The socket's buffer is full: this client is not keeping up.  Not
        # closed right here: this is called from inside a write.
        self._reactor.callLater(0, self.close)

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self._done(self)
        if not self.request.finished and not getattr(self.request, "_disconnected", False):
            self.request.unregisterProducer()
            self.request.finish()


class EventHub:
    """The open streams, fed by the store."""

    def __init__(self, store: Store, reactor: IReactorTime, max_clients: int) -> None:
        self.max_clients = max_clients
        self.streams: list[_Stream] = []
        self._reactor = reactor
        store.subscribe(self._new_message)
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor

    def open(self, request: Request) -> bool:
        """Start streaming to C{request}; False when the limit is reached."""
        if len(self.streams) >= self.max_clients:
            return False
        stream = _Stream(request, self._closed, self._reactor)
        self.streams.append(stream)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        stream.send(b"retry: 3000\n\n")
        if not self._keepalive.running:
            self._keepalive.start(KEEPALIVE, now=False)
        return True

    def _closed(self, stream: _Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams and self._keepalive.running:
            self._keepalive.stop()

    def _new_message(self, stored: Stored) -> None:
        if not self.streams:
            return
        data = json.dumps(list_item(stored), ensure_ascii=True, separators=(",", ":"))
        frame = b"event: new\ndata: " + data.encode("ascii") + b"\n\n"
        for stream in list(self.streams):
            stream.send(frame)

    def _ping(self) -> None:
        for stream in list(self.streams):
            stream.send(b": keep-alive\n\n")

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()
