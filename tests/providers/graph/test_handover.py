"""When the Graph provider hands a message over, as its caller sees it (L{watched}).

Review 5: a forced stop waits for a send that is on the wire instead of
cancelling it.  The Graph provider says so once its send request is being
written (not while it fetches a token), and takes it back when Graph answers
that it did not take the message (a 503 before a retry).  Real HTTP on
loopback against the fake Graph, as in L{tests.providers.graph.test_loopback}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.result import watched
from tests.fakegraph import FakeGraph, Fault, make_email
from tests.providers.graph import test_loopback


class HandoverTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake = FakeGraph(test_loopback.reactor)
        port = self.fake.listen(test_loopback.reactor)
        self.addCleanup(port.stopListening)

    def provider(self) -> GraphProvider:
        # The loopback tests' provider (same fake, same settings), without their tests.
        make = cast(Callable[[object], GraphProvider], test_loopback.LoopbackTests.provider)
        return make(self)

    async def until(self, condition: Callable[[], bool]) -> None:
        for _ in range(300):
            if condition():
                return
            await deferLater(test_loopback.reactor, 0.01, lambda: None)
        self.fail("condition not reached in 3 s")

    async def test_marked_once_the_send_request_is_on_the_wire(self) -> None:
        """Not while the token is being fetched; as soon as sendMail is being written,
        before Graph answers it."""
        self.fake.script("token", Fault(delay=0.3))
        self.fake.script("sendMail", Fault(delay=0.5))
        provider = self.provider()
        sending, handover = watched(lambda: provider.send(make_email(("b@example.org",))))
        await self.until(lambda: bool(self.fake.routes("token")))
        self.assertFalse(handover.handed_over, "marked during the token fetch")
        await self.until(lambda: bool(self.fake.routes("sendMail")))
        self.assertTrue(handover.handed_over)
        self.assertFalse(sending.called)
        await sending
        self.assertEqual(len(self.fake.deliveries), 1)

    async def test_cleared_when_graph_refuses_before_a_retry(self) -> None:
        """Graph answers the first sendMail 503 (Retry-After 1): it does not have the
        message, so while the provider waits to retry the send is not handed over (a
        forced stop then cancels it and says 421, rightly)."""
        self.fake.script("sendMail", Fault(status=503, retry_after="1"))
        provider = self.provider()
        sending, handover = watched(lambda: provider.send(make_email(("b@example.org",))))
        await self.until(lambda: bool(self.fake.routes("sendMail")))
        await self.until(lambda: not handover.handed_over)
        self.assertEqual(len(self.fake.routes("sendMail")), 1)
        await sending
        self.assertTrue(handover.handed_over)
        self.assertEqual(len(self.fake.deliveries), 1)
