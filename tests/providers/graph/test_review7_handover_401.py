"""Review 7: a sendMail that Graph refuses with 401 did not hand the message over.

The Graph provider marks its caller's L{Handover} as soon as a send
request is on the wire, and clears it when Graph refuses the request
definitely (a 503 before a retry).  A 401 (the access token refused) is a
definite refusal too, but it takes the renew-and-retry branch, which
skips the clear: while the new token is fetched the send still reads
"handed over".  A forced stop then waits the handover grace for an answer and,
if the token fetch is slow, closes the session with no reply and logs
the message as "may be delivered", where 421 ("not accepted") was true.
Real HTTP on loopback against the fake Graph, as in L{test_handover.HandoverTests}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.trial.unittest import TestCase

from smtpproxy.providers.graph.provider import GraphProvider
from smtpproxy.providers.result import watched
from tests.fakegraph import FakeGraph, Fault, make_email
from tests.providers.graph import test_handover, test_loopback


class Handover401Tests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fake = FakeGraph(test_loopback.reactor)
        port = self.fake.listen(test_loopback.reactor)
        self.addCleanup(port.stopListening)

    def provider(self) -> GraphProvider:
        # The loopback tests' provider (same fake, same settings), as test_handover has it.
        make = cast(Callable[[object], GraphProvider], test_loopback.LoopbackTests.provider)
        return make(self)

    async def test_cleared_when_graph_refuses_the_token(self) -> None:
        """The first sendMail is answered 401 and the renewed token is slow to come:
        while the provider waits for it, Graph does not have the message, so the
        send must not read as handed over (right: clear it, as after a 503)."""
        provider = self.provider()
        # One message through, so that the provider holds a token Graph will refuse.
        await provider.send(make_email(("a@example.org",)))
        self.fake.expire_tokens()
        self.fake.script("token", Fault(delay=1.0))
        sending, handover = watched(lambda: provider.send(make_email(("b@example.org",))))
        self.addCleanup(lambda: sending)  # the send ends before the fake stops
        until = test_handover.HandoverTests.until
        await until(cast(test_handover.HandoverTests, self), self._renewing)
        self.assertEqual(len(self.fake.routes("sendMail")), 2)
        self.assertFalse(handover.handed_over, "still 'handed over' after Graph's 401")
        await sending
        self.assertEqual(len(self.fake.deliveries), 2)

    def _renewing(self) -> bool:
        return len(self.fake.routes("token")) == 2
