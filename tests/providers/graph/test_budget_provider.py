"""The Graph provider's sending budgets against a fake Graph that enforces Exchange's limits.

The fake bounces (after a 202) what goes over a mailbox's limits, as
Exchange Online does; these tests show that without budgets the relay
would report such mail delivered and lose it, and with budgets it holds the
mail back with a 451 that says when to retry, and loses none.  HTTP runs
in memory (StubTreq) and time on a Clock.
"""

from __future__ import annotations

from typing import cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.mime.message import Email
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from tests.fakegraph import FakeGraph, make_email

EPOCH = 1_700_000_000.0
A, B, C = "a@contoso.example", "b@contoso.example", "c@contoso.example"


class Harness:
    """A provider with budgets (0: off) and a fake Graph with Exchange's limits."""

    def __init__(
        self,
        senders: tuple[str, ...] = (A,),
        *,
        per_minute: int = 3,
        per_day: int = 10_000,
        exchange_per_minute: int | None = 3,
        exchange_per_day: int | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.fake = FakeGraph(
            self.clock,
            mailboxes=senders,
            messages_per_minute=exchange_per_minute,
            recipients_per_day=exchange_per_day,
        )
        self.stub = StubTreq(self.fake.resource)
        config = Config.build(
            graph_tenant_id=self.fake.tenant,
            graph_client_id=self.fake.client_id,
            graph_client_secret=self.fake.client_secret,
            graph_sender=senders,
            graph_authority_host="http://login.test",
            graph_endpoint="http://graph.test",
            graph_mailbox_messages_per_minute=per_minute,
            graph_mailbox_recipients_per_day=per_day,
        )
        self.provider = GraphProvider(
            config, self.clock, cast(HTTPRequester, self.stub), jitter=lambda: 0.0
        )

    def send(self, email: Email) -> Deferred[None]:
        d = self.provider.send(email)
        for _ in range(5):
            self.stub.flush()
            self.clock.advance(0)
        return d


def _email(n: int, from_: str = "App <app@example.org>", to: int = 1) -> Email:
    recipients = tuple(f"r{n}-{i}@x.example" for i in range(to))
    return make_email(recipients, to=recipients, from_=from_, subject=f"message {n}")


class BudgetTests(SynchronousTestCase):
    def test_without_budgets_exchange_bounces_what_the_relay_called_sent(self) -> None:
        """Budgets off: five messages in a second all "succeed", and Exchange bounces two
        of them (the relay would have answered 250 for mail that is lost)."""
        h = Harness(per_minute=0)
        results = [h.send(_email(n)) for n in range(5)]
        for d in results:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(h.fake.deliveries), 3)
        self.assertEqual([b.status for b in h.fake.bounced], ["5.2.0", "5.2.0"])

    def test_budget_holds_back_and_loses_nothing(self) -> None:
        """Budgets on (3 a minute): the fourth and fifth messages fail with 451 4.7.0
        naming the time to retry and carrying retry_after; retried then, they are
        delivered, and Exchange bounced nothing."""
        h = Harness()
        results = [h.send(_email(n)) for n in range(5)]
        for d in results[:3]:
            self.assertIsNone(self.successResultOf(d))
        for d in results[3:]:
            error = self.failureResultOf(d, TransientDeliveryError).value
            reply = reply_for_failure(error)
            self.assertEqual((reply.code, reply.status), (451, "4.7.0"))
            self.assertIn("messages a minute", reply.text)
            self.assertIn("try again after 2023-11-14 22:14:21 UTC (in 61 s)", reply.text)
            self.assertEqual((error.retry_after, error.not_attempted), (61.0, True))
        self.assertEqual(len(h.fake.routes("sendMail")), 3)  # the held ones never went
        h.clock.advance(61)
        for n in (3, 4):
            self.assertIsNone(self.successResultOf(h.send(_email(n))))
        self.assertEqual(len(h.fake.deliveries), 5)
        self.assertEqual(h.fake.bounced, [])

    def test_recipients_per_day(self) -> None:
        """The day's recipients: a message that would pass the limit is held back until
        the day-old bucket leaves the window; Exchange bounces nothing."""
        h = Harness(per_minute=0, per_day=10, exchange_per_minute=None, exchange_per_day=10)
        self.assertIsNone(self.successResultOf(h.send(_email(1, to=8))))
        h.clock.advance(3600)
        error = self.failureResultOf(h.send(_email(2, to=3)), TransientDeliveryError).value
        self.assertIn("recipients a day", error.reason)
        # The first message's one-minute bucket ends 40 s after it (EPOCH is 20 s into
        # a minute) and leaves the window a day after that.
        self.assertEqual(error.retry_after, 40 + 86_400 - 3600)
        self.assertIsNone(self.successResultOf(h.send(_email(3, to=2))))
        self.assertEqual(h.fake.bounced, [])

    def test_unmatched_from_goes_to_the_least_used_mailbox(self) -> None:
        """Three mailboxes, From naming none: six messages go two from each, not all
        from the first; all three busy, the next waits."""
        h = Harness((A, B, C), per_minute=2, exchange_per_minute=2)
        for n in range(6):
            self.assertIsNone(self.successResultOf(h.send(_email(n))))
        self.assertEqual(sorted(d.mailbox for d in h.fake.deliveries), [A, A, B, B, C, C])
        self.failureResultOf(h.send(_email(6)), TransientDeliveryError)
        self.assertEqual(h.fake.bounced, [])

    def test_matched_from_stays_with_its_mailbox(self) -> None:
        """From naming B: the message goes from B, and waits for B's budget even while A
        and C have room (moving it would change its From)."""
        h = Harness((A, B, C), per_minute=1, exchange_per_minute=1)
        self.assertIsNone(self.successResultOf(h.send(_email(0, from_=f"B <{B}>"))))
        failure = self.failureResultOf(h.send(_email(1, from_=B)), TransientDeliveryError)
        self.assertIn(B, failure.value.reason)
        self.assertNotIn(A, failure.value.reason)
        self.assertEqual([d.mailbox for d in h.fake.deliveries], [B])
        # Mail for anyone still goes, from a mailbox with room.
        self.assertIsNone(self.successResultOf(h.send(_email(2))))
        self.assertEqual(h.fake.deliveries[-1].mailbox, A)
