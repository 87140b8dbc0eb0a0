"""The HTTP listener's URL space: health always, the mailbox only with PROVIDER=mailbox;
and the mailbox's live event streams, bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.config import Config
from smtpproxy.providers.mailbox.provider import MailboxProvider
from smtpproxy.providers.mailbox.settings import MailboxSettings
from smtpproxy.web import health, site
from smtpproxy.web import mailbox as web_mailbox
from smtpproxy.web.mailbox.events import EventHub
from tests.providers.mailbox.helpers import email
from tests.support import TIMEOUT, RecordingProvider, async_test, in_thread


def get(port: int, path: str) -> tuple[int, str, bytes]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
            return reply.status, reply.headers["content-type"], reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


class SiteTests(TestCase):
    def listen(self, provider: Any) -> int:
        from twisted.internet import reactor

        http: Any = site.build_site(
            [health.mount(lambda: False)],
            reactor=reactor,
            fallback=web_mailbox.mount_for(provider, reactor),
        )
        port: Any = reactor.listenTCP(0, http, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @async_test
    async def test_without_the_mailbox_nothing_changes(self) -> None:
        """Another provider: /healthz answers, / and /api/v1/messages are the JSON 404s."""
        port = self.listen(RecordingProvider())
        health, root, api = await in_thread(
            lambda: [get(port, p) for p in ("/healthz", "/", "/api/v1/messages")]
        )
        self.assertEqual((health[0], json.loads(health[2])), (200, {"status": "ok"}))
        self.assertEqual((root[0], root[1]), (404, "application/json"))
        self.assertEqual(api[0], 404)

    @async_test
    async def test_with_the_mailbox(self) -> None:
        """The mailbox: /healthz still the health endpoint, / the page, /api/v1 the API."""
        from twisted.internet import reactor

        provider = MailboxProvider(MailboxSettings.from_config(Config()), reactor)
        provider.send(email(subject="Mounted"))
        port = self.listen(provider)
        health, root, api = await in_thread(
            lambda: [get(port, p) for p in ("/healthz", "/", "/api/v1/messages")]
        )
        self.assertEqual(json.loads(health[2]), {"status": "ok"})
        self.assertEqual((root[0], root[1]), (200, "text/html; charset=utf-8"))
        self.assertIn(b"/static/mailbox.js", root[2])
        self.assertEqual(json.loads(api[2])["messages"][0]["Subject"], "Mounted")


class StreamRequest:
    """The part of a twisted.web request an event stream uses, recording what it gets.

    Not Twisted's DummyRequest: that one pulls from a registered producer in a
    loop, where the socket behind a real request pushes and pauses.
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.producer: Any = None
        self.finished = 0
        self._finish: list[Deferred[None]] = []

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finish.append(d)
        return d

    def finish(self) -> None:
        self.finished += 1
        for d in self._finish:
            d.callback(None)


def stream_request() -> Any:
    """A L{StreamRequest}, typed as the twisted.web request it stands in for."""
    return StreamRequest()


class EventHubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = MailboxProvider(MailboxSettings.from_config(Config()), self.clock)
        self.hub = EventHub(self.provider.store, self.clock, max_clients=2)

    def test_new_mail_reaches_every_stream_and_the_count_is_capped(self) -> None:
        """Two streams get each new message as one event; a third is turned away."""
        first, second, third = (stream_request() for _ in range(3))
        self.assertTrue(self.hub.open(first))
        self.assertTrue(self.hub.open(second))
        self.assertFalse(self.hub.open(third))
        self.provider.send(email(subject="Live"))
        for request in (first, second):
            frames = b"".join(request.written)
            self.assertIn(b"event: new\ndata: ", frames)
            data = frames.split(b"data: ", 1)[1].split(b"\n\n", 1)[0]
            self.assertEqual(json.loads(data)["Subject"], "Live")

    def test_a_client_that_does_not_read_is_dropped(self) -> None:
        """When the socket's buffer is full (the stream is paused) the stream is finished
        and its slot freed: nothing piles up for a client that does not read."""
        request = stream_request()
        self.hub.open(request)
        self.assertEqual(request.headers[b"content-type"], b"text/event-stream; charset=utf-8")
        request.producer.pauseProducing()
        self.clock.advance(0)
        self.assertEqual(self.hub.streams, [])
        self.assertEqual(request.finished, 1)
        self.assertTrue(self.hub.open(stream_request()))

    def test_keepalive_only_while_streams_are_open(self) -> None:
        """A comment every 25 s keeps idle streams open; with none open, no timer runs."""
        request = stream_request()
        self.hub.open(request)
        before = len(request.written)
        self.clock.advance(25)
        self.assertEqual(request.written[before:], [b": keep-alive\n\n"])
        self.hub.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PendingFile:
    """A mailbox file whose messages arrive when the test says (the disk, simulated)."""

    path = "pending.sqlite"

    def __init__(self) -> None:
        self.loading: Deferred[list[Any]] = Deferred()

    def load(self, limit: int, prepare: Any) -> Deferred[list[Any]]:
        return self.loading

    def insert(self, row: Any, evicted: Any) -> Deferred[None]:
        return Deferred()

    def close(self) -> None:
        pass


class LoadingTests(SynchronousTestCase):
    def test_api_waits_for_the_file(self) -> None:
        """Right after start, while MAILBOX_PATH is read, an API request is held and then
        answered with the messages read, not with an empty mailbox."""
        from twisted.internet.address import IPv4Address
        from twisted.web.server import NOT_DONE_YET
        from twisted.web.test.requesthelper import DummyRequest

        from smtpproxy.providers.mailbox.store import prepare
        from smtpproxy.web.mailbox.routes import MailboxResource

        clock = Clock()
        pending = PendingFile()
        disk: Any = pending
        provider = MailboxProvider(MailboxSettings.from_config(Config()), clock, file=disk)
        resource = MailboxResource(provider, clock)
        request: Any = DummyRequest([b"api", b"v1", b"messages"])
        request.client = IPv4Address("TCP", "127.0.0.1", 40000)
        self.assertEqual(resource.render(request), NOT_DONE_YET)
        self.assertEqual(request.written, [])
        pending.loading.callback([prepare(email(subject="From the file"), 1.0, "kept-id")])
        self.assertEqual(request.finished, 1)
        listed = json.loads(b"".join(request.written))
        self.assertEqual([m["ID"] for m in listed["messages"]], ["kept-id"])
