"""Sending budgets end to end: `twistd -n smtpproxy`, smtplib, and a fake Graph that bounces
like Exchange Online past a mailbox's sending limits.

The limits are tiny and the windows short (through
C{GRAPH_MAILBOX_MESSAGE_WINDOW}), so a test sees the budget run out, the
mail held back and then delivered within seconds:

  - direct mode: the message past the budget is answered C{451 4.7.0}
    with the time to retry; sent again after it, it is delivered;
  - queue mode (SQLite): every message is queued (250), the ones past the
    budget stay queued until it frees and are then delivered, and a
    restarted relay still knows what was sent before it stopped.

In every case the fake bounced nothing: no mail was lost.
"""

from __future__ import annotations

import signal
import smtplib
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from tests.fakegraph import FakeGraph
from tests.providers.graph.test_twistd_graph import NEUTRAL
from tests.queue.test_e2e import QueuedRelay, _subjects
from tests.support import TIMEOUT, async_test, in_thread, message
from tests.test_twistd import Relay, json_lines

reactor: Any = _reactor
MAILBOX = "relay@contoso.example"
LIMIT = 3
#: The relay's window, in seconds.  The fake counts each message when its
#: request arrives, a moment after the relay charged it; its window is
#: shorter by a margin for that latency (a busy test machine's, not Graph's).
WINDOW = 4.0
MARGIN = 0.5


class BudgetTwistdTests(TestCase):
    timeout = 120

    def fake(self, window: float) -> FakeGraph:
        fake = FakeGraph(
            reactor, mailboxes=(MAILBOX,), messages_per_minute=LIMIT, minute=window - MARGIN
        )
        port = fake.listen(reactor)
        self.addCleanup(port.stopListening)
        return fake

    def settings(self, fake: FakeGraph, window: float) -> dict[str, str]:
        return {
            **NEUTRAL,
            "GRAPH_TENANT_ID": fake.tenant,
            "GRAPH_CLIENT_ID": fake.client_id,
            "GRAPH_CLIENT_SECRET": fake.client_secret or "",
            "GRAPH_SENDER": MAILBOX,
            "GRAPH_AUTHORITY_HOST": fake.endpoint,
            "GRAPH_ENDPOINT": fake.endpoint,
            "GRAPH_MAILBOX_MESSAGES_PER_MINUTE": str(LIMIT),
            "GRAPH_MAILBOX_MESSAGE_WINDOW": str(window),
        }

    @async_test
    async def test_direct_mode_answers_451_with_the_time_to_retry(self) -> None:
        """Three messages go; the fourth gets 451 4.7.0 saying when to retry and is not
        sent to Graph; sent again after that time it is delivered; nothing bounced."""
        fake = self.fake(WINDOW)
        relay = Relay(self, (), **self.settings(fake, WINDOW))

        def send(client: smtplib.SMTP, n: int) -> tuple[int, bytes]:
            client.mail("app@example.org")
            client.rcpt("a@x.example")
            return client.data(message(f"budget {n}", "Numbers.\r\n", To="a@x.example"))

        def scenario() -> tuple[list[tuple[int, bytes]], float, tuple[int, bytes], bytes]:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                client.ehlo("client.test")
                first = [send(client, n) for n in range(LIMIT + 1)]
                held_at = time.time()
                wait = float(first[-1][1].split(b"(in ", 1)[1].split(b" s)")[0])
                time.sleep(wait)
                again = send(client, LIMIT)
            _, err = relay.stop()
            return first, held_at + wait, again, err

        first, retry_at, again, err = await in_thread(scenario)
        self.assertEqual([code for code, _ in first], [250] * LIMIT + [451])
        text = first[-1][1]
        self.assertTrue(text.startswith(b"4.7.0 sending limit (messages a minute) reached"), text)
        self.assertIn(b"try again after ", text)
        self.assertLessEqual(float(text.split(b"(in ", 1)[1].split(b" s)")[0]), WINDOW + 1)
        self.assertEqual(again[0], 250, again)
        self.assertEqual(len(fake.deliveries), LIMIT + 1)
        self.assertEqual(len(fake.routes("sendMail")), LIMIT + 1)
        self.assertEqual(fake.bounced, [])
        self.assertEqual(fake.violations, [])
        held = [e for e in json_lines(err) if str(e.get("msg")).startswith("sending budget used")]
        self.assertEqual(len(held), 1)
        self.assertEqual(held[0]["limit"], "GRAPH_MAILBOX_MESSAGES_PER_MINUTE")
        self.assertGreater(retry_at, 0)

    @async_test
    async def test_queue_holds_until_the_budget_frees_and_keeps_it_over_a_restart(self) -> None:
        """QUEUE_URL=sqlite: three messages delivered, the relay stopped and started
        again, three more queued at once: the restarted relay still counts the first
        three, holds the new ones (deferred with 451 4.7.0) until the window has
        passed, then delivers them; six delivered, none bounced."""
        window = 10.0
        fake = self.fake(window)
        relay = QueuedRelay(
            self, QUEUE_RETRY_MIN_INTERVAL="1", QUEUE_CONCURRENCY="2", **self.settings(fake, window)
        )
        subjects = [f"queued {n}" for n in range(2 * LIMIT)]

        def scenario() -> tuple[float, float]:
            relay.start()
            for subject in subjects[:LIMIT]:
                relay.send(subject)
            relay.wait_for("message delivered", count=LIMIT)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)
            relay.start()
            restarted = time.time()
            for subject in subjects[LIMIT:]:
                relay.send(subject)
            relay.wait_for("message delivered", count=2 * LIMIT, timeout=60)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)
            return restarted, time.time()

        restarted, _ = await in_thread(scenario)
        first_sent = fake.routes("sendMail")[0].time
        self.assertLess(restarted - first_sent, window, "the restart took longer than the window")
        self.assertEqual(sorted(_subjects(fake.deliveries)), sorted(subjects))
        self.assertEqual(fake.bounced, [])
        later = [seen.time for seen in fake.routes("sendMail")[LIMIT:]]
        self.assertGreaterEqual(min(later) - first_sent, window - MARGIN)
        deferred = relay.events("message delivery deferred")
        self.assertGreater(len(deferred), 0)
        self.assertTrue(all(e["reply"].startswith("451 4.7.0 sending limit") for e in deferred))
        held = relay.events("sending budget used up; message held back")
        self.assertGreater(len(held), 0)
