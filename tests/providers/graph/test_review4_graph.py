"""Review 4: defects found in the Graph provider's second round (issue 13).

Each test fails on the code as reviewed and says in its docstring what is
wrong and what is expected.  HTTP runs in memory (StubTreq over the fake
Graph) and time on a Clock, as in test_budget_provider.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from tests.fakegraph import Fault
from tests.providers.graph.test_budget_provider import Harness, _email


class BudgetChargeWithoutRequestTests(SynchronousTestCase):
    def test_token_failure_does_not_use_up_the_sending_budget(self) -> None:
        """A message that fails before any request reaches Graph must give its
        budget charge back.

        docs/graph.md ("What counts") says a message is charged "when the relay
        hands it to Graph"; one refused before any request gives its charge
        back.  But GraphProvider._send charges in _choose_mailbox and gives back
        only when plan_delivery raises: when the token cannot be had (Entra
        refuses the credential, is down, the certificate file is unreadable)
        no request ever reaches Graph, yet each attempt is charged.  With
        2 messages a minute, two such failures leave the mailbox "out of
        budget" and the next message, with a working token, is held back with
        451 4.7.0 although nothing was sent.  Under a queue that retries
        through an Entra outage the phantom charges eat the day's recipients
        budget and hold real mail for up to 24 h after Entra recovers.

        Expected: the third message goes out (charge returned on failures
        that never reached Graph).
        """
        h = Harness(per_minute=2, exchange_per_minute=2)
        h.fake.script(
            "token",
            Fault(400, "invalid_client", "bad secret"),
            Fault(400, "invalid_client", "bad secret"),
        )
        for n in range(2):
            error = self.failureResultOf(h.send(_email(n)), TransientDeliveryError).value
            self.assertEqual(reply_for_failure(error).status, "4.3.5")
        self.assertEqual(h.fake.routes("sendMail"), [])
        # Entra works again: nothing has been sent this minute.
        self.assertIsNone(self.successResultOf(h.send(_email(2))))
        self.assertEqual(len(h.fake.deliveries), 1)
