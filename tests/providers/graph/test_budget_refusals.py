"""Which attempts of a sending request make a message count against its budget.

docs/graph.md ("What counts"): an attempt Graph accepted (2xx) or that may have
taken effect (a lost answer, a 500/502/504) makes the message count, and it
keeps counting whatever later attempts see; attempts Graph refused plainly
(429, 503, a 4xx) or that never connected (refused, or timed out while
connecting) do not.  Each test uses test_budget_handover's harness: two
recipients a day, then messages are sent until one is held back.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import DeliveryError, reply_for_failure
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from smtpproxy.providers.graph.retry import Tuning
from tests.fakegraph import Fault
from tests.providers.graph.test_budget_handover import _Harness
from tests.providers.graph.test_review6_budget import _Blackhole

SERVER_BUSY = Fault(503, "ServiceUnavailable")
LOST_ANSWER = Fault(drop=True)
GATEWAY = Fault(502, "BadGateway")


def _behind_blackhole(h: _Harness) -> _Blackhole:
    """Put a L{_Blackhole} between C{h}'s provider and the fake (30 s request timeout)."""
    blackhole = _Blackhole(cast(HTTPRequester, h.stub))
    tuning = Tuning(request_timeout=30.0)
    http = cast(HTTPRequester, blackhole)
    h.provider = GraphProvider(h.config, h.clock, http, tuning=tuning, jitter=lambda: 0.0)
    return blackhole


class AttemptSequenceTests(SynchronousTestCase):
    def outcome(self, d: Deferred[None]) -> str:
        """C{"sent"}, or the enhanced status the message failed with."""
        results: list[object] = []
        d.addBoth(results.append)
        result = results[0]
        if isinstance(result, Failure):
            error = result.value
            assert isinstance(error, DeliveryError)
            return reply_for_failure(error).status
        return "sent"

    def room(self, h: _Harness) -> int:
        """How many more one-recipient messages go out before one is held back (4.7.0)."""
        for room in range(5):
            d = h.send_next()
            h.run()
            status = self.outcome(d)
            if status != "sent":
                self.assertEqual(status, "4.7.0")
                return room
        raise AssertionError("never held back")

    def send_with(self, *faults: Fault) -> tuple[str, int]:
        """One message whose sendMail attempts meet C{faults} (then succeed): its
        outcome, and the room left in the day's two recipients."""
        h = _Harness()
        h.fake.script("sendMail", *faults)
        d = h.send_next()
        h.run()
        return self.outcome(d), self.room(h)

    def test_refusals_then_success_counts(self) -> None:
        """503 twice, then 202: sent, and counted once (one recipient left)."""
        self.assertEqual(self.send_with(SERVER_BUSY, SERVER_BUSY), ("sent", 1))

    def test_refusals_only_give_the_charge_back(self) -> None:
        """503 on every attempt: a 503 says the request was not carried out, so the
        failed message gives its recipient back (both left)."""
        self.assertEqual(self.send_with(*[SERVER_BUSY] * 4), ("4.4.5", 2))

    def test_lost_answer_between_refusals_keeps_the_charge(self) -> None:
        """503, a lost answer, then 503 twice: the second attempt may have sent the
        message, and the refusals after it do not undo that (one left)."""
        faults = (SERVER_BUSY, LOST_ANSWER, SERVER_BUSY, SERVER_BUSY)
        self.assertEqual(self.send_with(*faults), ("4.4.5", 1))

    def test_refusal_lost_answer_then_success_counts_once(self) -> None:
        """503, a lost answer, then 202: sent (perhaps twice, as the docs warn), and
        charged once (one left)."""
        self.assertEqual(self.send_with(SERVER_BUSY, LOST_ANSWER), ("sent", 1))

    def test_gateway_error_keeps_the_charge(self) -> None:
        """502 on every attempt: a gateway error may hide a request Graph carried out,
        so the message keeps its charge (one left)."""
        self.assertEqual(self.send_with(*[GATEWAY] * 4), ("4.3.0", 1))

    def test_connect_timeout_is_retried(self) -> None:
        """The first attempt times out while connecting: like a refused connection it is
        retried at once within the message's budget, and the second attempt sends the
        message, which counts once (one left)."""
        h = _Harness()
        blackhole = _behind_blackhole(h)
        blackhole.failing = 1
        d = h.send_next()
        h.run()
        self.assertEqual(self.outcome(d), "sent")
        self.assertEqual(len(h.fake.routes("sendMail")), 1)
        self.assertEqual(self.room(h), 1)
