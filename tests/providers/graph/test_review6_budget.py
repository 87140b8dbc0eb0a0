"""Review 6: which failed sends give their budget charge back (provider.py _HANDOVER)."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import DeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from smtpproxy.providers.graph.retry import Tuning
from tests.fakegraph import Fault
from tests.providers.graph.test_budget_handover import _Harness


def _never_connects() -> Deferred[Any]:
    """A request whose TCP connection never completes (a firewall dropping SYNs to
    Graph): cancelling it fails it as twisted.web's Agent does while connecting."""
    return Deferred(lambda d: d.errback(ConnectingCancelledError(None)))


class _Blackhole:
    """The next C{failing} requests to Graph's host never connect; the rest pass."""

    def __init__(self, inner: HTTPRequester) -> None:
        self._inner = inner
        self.failing = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.failing and urlsplit(url).hostname == "graph.test":
            self.failing -= 1
            return _never_connects()
        result: Deferred[Any] = self._inner.request(method, url, **kwargs)
        return result


class RefusedSendTests(SynchronousTestCase):
    def _status(self, d: Deferred[None]) -> str:
        return reply_for_failure(self.failureResultOf(d, DeliveryError).value).status

    def _room(self, h: _Harness) -> int:
        """How many more one-recipient messages go out before one is held back (4.7.0)."""
        for room in range(5):
            d = h.send_next()
            h.run()
            outcome: list[object] = []
            d.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                error = outcome[0].value
                assert isinstance(error, DeliveryError)
                self.assertEqual(reply_for_failure(error).status, "4.7.0")
                return room
        raise AssertionError("never held back")

    def test_throttled_send_gives_the_charge_back(self) -> None:
        """Graph answers every sendMail attempt 429 (throttled, four times): Graph said
        plainly it did not take the message, so nothing was sent.  The message still
        keeps its charge, because _note_handed_over marks any answered sendMail as
        reached: under throttling each queue retry uses the day's budget again, and the
        budget (two recipients here) is spent on messages nobody received, holding good
        mail back for the rest of the day.  Right: only a 2xx, or an ambiguous failure
        (no answer, a timeout), keeps the charge; a definite refusal gives it back, so
        two more messages fit."""
        h = _Harness()
        h.fake.script("sendMail", *[Fault(429, "ApplicationThrottled", retry_after="1")] * 4)
        d = h.send_next()
        h.run()
        self.assertTrue(self._status(d).startswith("4."))
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(self._room(h), 2)

    def test_refused_recipient_gives_the_charge_back(self) -> None:
        """sendMail answered 400 ErrorInvalidRecipients: refused for good, nothing sent;
        the charge is kept all the same (same cause).  Right: given back (room for 2)."""
        h = _Harness()
        h.fake.script("sendMail", Fault(400, "ErrorInvalidRecipients"))
        d = h.send_next()
        h.run()
        self.failureResultOf(d, DeliveryError)
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(self._room(h), 2)

    def test_connection_that_never_opens_gives_the_charge_back(self) -> None:
        """Graph unreachable by timeout (SYNs dropped, the usual firewall outage): the
        request timer fires while the connection is still being made, so the request
        never left.  _exchange's `if expired:` branch comes before the check for
        ConnectingCancelledError and marks the sendMail as handed over (and the attempt
        as connected), so the message keeps its charge: during such an outage every
        queue retry spends the budget again on mail nobody received.  A refused
        connection already gives it back.  Right: a timeout while connecting counts as
        not sent (room for two more)."""
        h = _Harness()
        blackhole = _Blackhole(cast(HTTPRequester, h.stub))
        h.provider = GraphProvider(
            h.config,
            h.clock,
            cast(HTTPRequester, blackhole),
            tuning=Tuning(request_timeout=30.0),
            jitter=lambda: 0.0,
        )
        blackhole.failing = 4
        d = h.send_next()
        h.run()
        self.assertTrue(self._status(d).startswith("4."))
        self.assertEqual(h.fake.routes("sendMail"), [])
        self.assertEqual(self._room(h), 2)
