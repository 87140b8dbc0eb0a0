"""An API on a loopback port, its site built by make_site as the relay builds it, and treq.

The provider is the recording backend of L{tests.support} (or a queue in
memory): everything in front of it, from the socket through the checks,
the message building and the delivery pipeline, runs for real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from smtpproxy.config import Config
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.queue.front import QueueFront
from smtpproxy.web import health
from smtpproxy.web import site as web_site
from smtpproxy.web.api.keys import ApiKey, KeyRing, digest
from smtpproxy.web.api.limits import Limits
from smtpproxy.web.api.resource import Api
from smtpproxy.web.api.service import settings_from
from smtpproxy.web.api.submit import Submitter
from tests.queue.memory import MemoryStore
from tests.support import RecordingProvider
from tests.web.test_health import Loopback

SECRET = "s" * 24 + "-api-secret-0001"
OTHER_SECRET = "o" * 24 + "-api-secret-0002"
DISABLED_SECRET = "d" * 24 + "-api-secret-0003"


def key(key_id: str = "app", secret: str = SECRET, **policy: Any) -> ApiKey:
    return ApiKey(key_id, digest(secret), **policy)


def message(**changes: Any) -> dict[str, Any]:
    """A valid C{POST /v1/messages} document, with C{changes}."""
    document: dict[str, Any] = {
        "from": "app@example.com",
        "to": ["rcpt@example.org"],
        "subject": "Hello",
        "text": "Body text.",
    }
    document.update(changes)
    return document


@implementer(ILogObserver)
class LogCapture:
    """Every log event while a test runs, rendered as JSON text for searching."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def text(self) -> str:
        shown = []
        for event in self.events:
            fields = {
                k: v for k, v in event.items() if not k.startswith("log_") or k == "log_format"
            }
            shown.append(json.dumps(fields, default=repr))
        return "\n".join(shown)

    def named(self, msg: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_format") == msg]


@dataclass
class Answer:
    status: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[0].decode("latin-1") if values else None


class ApiServer:
    """One API behind a real listening site; cleaned up by the test."""

    def __init__(
        self,
        case: TestCase,
        *,
        keys: tuple[ApiKey, ...] | None = None,
        provider: RecordingProvider | None = None,
        store: MemoryStore | None = None,
        rates: tuple[int, int, int] = (0, 0, 0),
        limit_clock: IReactorTime | None = None,
        **settings: Any,
    ) -> None:
        self.provider = provider or RecordingProvider()
        self.store = store
        self.clock = limit_clock or Clock()
        config = Config(smtp_hostname="relay.test", **settings)
        queue = QueueFront(store, reactor) if store is not None else None
        self.api = Api(
            settings_from(config),
            KeyRing(keys if keys is not None else (key(),)),
            Limits(*rates, self.clock),
            Submitter(self.provider, reactor, MessageParser(reactor), queue),
            reactor,
        )
        case.addCleanup(self.api.stop)
        v1 = web_site.Mount(
            "/v1",
            web_site.Switchable(self.api.resource),
            max_body=self.api.settings.json_body_limit,
        )
        # The listener's bounds stay the defaults; the log level reaches it as in the relay.
        bounds = web_site.HttpSettings(log_requests=self.api.settings.log_requests)
        site = web_site.build_site([health.mount(lambda: False), v1], bounds, reactor=reactor)
        loopback = Loopback(case, site)
        self.client, self.base = loopback.client, loopback.base

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        secret: str | None = SECRET,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = Headers()
        if secret is not None:
            sent.setRawHeaders(b"authorization", [f"Bearer {secret}".encode()])
        if content_type is not None:
            sent.setRawHeaders(b"content-type", [content_type.encode()])
        for name, value in (headers or {}).items():
            sent.setRawHeaders(name.encode(), [value.encode("utf-8")])
        response = await self.client.request(method, self.base + path, data=body, headers=sent)
        data = await response.content()
        return Answer(response.code, response.headers, data)

    async def send(self, document: Any, **kw: Any) -> Answer:
        """POST a JSON document to /v1/messages."""
        return await self.request("POST", "/v1/messages", json.dumps(document).encode(), **kw)

    async def raw(self, query: str, data: bytes, **kw: Any) -> Answer:
        kw.setdefault("content_type", "message/rfc822")
        return await self.request("POST", "/v1/messages/raw" + query, data, **kw)
