"""A message counts against its budget only once its sending request may have reached Graph.

docs/graph.md ("What counts"): a message that fails before its sendMail
(or sendDraft) request could reach Graph gives its charge back; one whose
request may have been carried out keeps it.  Each test uses a budget of two
recipients a day: after the case under test, messages are sent until one
is held back, which shows whether the failed message still counts.  HTTP
runs in memory (StubTreq over the fake Graph), time on a Clock; refused
connections and proxy tunnels come from a thin requester in front of the
fake that fails the requests to Graph's host as the real agent would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from smtpproxy.providers.graph.retry import Tuning
from smtpproxy.providers.graph.tunnel import ProxyTunnelError
from tests.fakegraph import Fault, make_email
from tests.providers.graph import test_provider as tp


class _Unreachable:
    """Fails the next C{failing} requests to Graph's host with C{error()}; passes the rest on."""

    def __init__(self, inner: HTTPRequester, error: Callable[[], Exception]) -> None:
        self._inner = inner
        self._error = error
        self.failing = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.failing and urlsplit(url).hostname == "graph.test":
            self.failing -= 1
            return fail(self._error())
        result: Deferred[Any] = self._inner.request(method, url, **kwargs)
        return result


class _Harness(tp.Harness):
    """test_provider's harness with two recipients a day, before an L{_Unreachable}."""

    def __init__(
        self, error: Callable[[], Exception] = ConnectionRefusedError, concurrency: int = 4
    ) -> None:
        # One exchange may use the whole message budget (a slow answer then
        # holds its slot until the message's deadline).
        tuning = Tuning(request_timeout=1000.0)
        super().__init__(concurrency=concurrency, tuning=tuning)
        self.http = _Unreachable(cast(HTTPRequester, self.stub), error)
        budgets = {
            "graph_mailbox_messages_per_minute": 0,
            "graph_mailbox_recipients_per_day": 2,
        }
        self.config = replace(
            self.config, provider_settings={**self.config.provider_settings, **budgets}
        )
        self.provider = GraphProvider(
            self.config,
            self.clock,
            cast(HTTPRequester, self.http),
            tuning=tuning,
            jitter=lambda: 0.0,
        )
        self.sent = 0

    def send_next(self) -> Deferred[None]:
        """Send a message to one new recipient."""
        self.sent += 1
        to = (f"r{self.sent}@x.example",)
        return self.send(make_email(to, to=to))


class HandoverTests(SynchronousTestCase):
    def _failed(self, d: Deferred[None]) -> str:
        error = self.failureResultOf(d, TransientDeliveryError).value
        return reply_for_failure(error).status

    def assertRoomFor(self, h: _Harness, messages: int) -> None:
        """C{messages} more one-recipient messages go out, and the next is held back."""
        for _ in range(messages):
            ok = h.send_next()
            h.run()
            self.assertIsNone(self.successResultOf(ok))
        held = h.send_next()
        h.run()
        self.assertEqual(self._failed(held), "4.7.0")

    def test_refused_connection_gives_the_charge_back(self) -> None:
        """Graph refuses every connection (four attempts): nothing was sent, so the
        message's recipient is given back and two more messages fit the day's two."""
        h = _Harness()
        h.http.failing = 4
        d = h.send_next()
        h.run()
        self.assertEqual(self._failed(d), "4.4.2")
        self.assertEqual(h.fake.routes("sendMail"), [])
        self.assertRoomFor(h, 2)

    def test_refused_proxy_tunnel_gives_the_charge_back(self) -> None:
        """The proxy will not open the tunnel (four attempts): as a refused connection."""
        h = _Harness(lambda: ProxyTunnelError("proxy answered 403"))
        h.http.failing = 4
        d = h.send_next()
        h.run()
        self.assertEqual(self._failed(d), "4.4.2")
        self.assertRoomFor(h, 2)

    def test_request_that_may_have_reached_graph_keeps_its_charge(self) -> None:
        """A connection cut after the request left (four times): Graph may have sent the
        message, so it still counts and only one more message fits."""
        h = _Harness()
        h.fake.script("sendMail", *[Fault(drop=True)] * 4)
        d = h.send_next()
        h.run()
        self.assertEqual(self._failed(d), "4.4.2")
        self.assertEqual(len(h.fake.routes("sendMail")), 4)
        self.assertRoomFor(h, 1)

    def test_slot_wait_timeout_gives_the_charge_back(self) -> None:
        """One slot, held by a message whose answer never comes: the second message
        runs out of time before its request and gives its charge back; the first, whose
        request reached Graph, keeps it."""
        h = _Harness(concurrency=1)
        h.fake.script("sendMail", Fault(delay=10_000.0))
        first = h.send_next()
        second = h.send_next()
        h.run(horizon=200)
        self.assertEqual(self._failed(first), "4.4.1")
        self.assertEqual(self._failed(second), "4.4.7")
        self.assertEqual(len(h.fake.routes("sendMail")), 1)
        self.assertRoomFor(h, 1)

    def test_cancelled_before_the_request_gives_the_charge_back(self) -> None:
        """A message cancelled while it waits for a slot (the client went away, the relay
        stops) sent nothing and gives its charge back."""
        h = _Harness(concurrency=1)
        h.fake.script("sendMail", Fault(delay=10_000.0))
        first = h.send_next()
        second = h.send_next()
        h.clock.advance(1)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        h.run(horizon=200)
        self.assertEqual(self._failed(first), "4.4.1")
        self.assertRoomFor(h, 1)


class NoResponseCountTests(SynchronousTestCase):
    def test_refused_and_timed_out_attempts_count_as_status_0(self) -> None:
        """/metrics' Graph request counter: four refused connections and one attempt
        that timed out are five attempts without a response (status 0), beside the
        token request and the sendMail that were answered."""
        from twisted.logger import globalLogPublisher

        from smtpproxy.web.metrics import Metrics

        metrics = Metrics()
        globalLogPublisher.addObserver(metrics.observer)
        self.addCleanup(globalLogPublisher.removeObserver, metrics.observer)
        h = _Harness()
        # The provider keeps the counts; /metrics reads them at scrape time.
        metrics.watch_graph_requests(lambda: h.provider.request_statuses)
        h.http.failing = 4
        refused = h.send_next()
        h.run()
        self.failureResultOf(refused, TransientDeliveryError)
        h.fake.script("sendMail", Fault(delay=10_000.0))
        timed_out = h.send_next()
        h.run(horizon=200)
        self.failureResultOf(timed_out, TransientDeliveryError)
        ok = h.send_next()
        h.run()
        self.successResultOf(ok)

        def count(status: str) -> float | None:
            labels = {"status": status}
            return metrics.registry.get_sample_value("smtpproxy_graph_requests_total", labels)

        self.assertEqual((count("0"), count("200"), count("202")), (5.0, 1.0, 1.0))
