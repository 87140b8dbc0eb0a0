"""Two real relay processes on one real PostgreSQL queue, delivering to one fake Graph.

The issue's proof for the shared queue: 2,000 messages sent through both
relays (smtplib, half to each), every one delivered exactly once, and Graph's
per-mailbox concurrency never exceeded counting both relays' requests
together.  The fake Graph runs in this test's reactor and holds each
C{sendMail} a little while, so both relays' workers are busy at the same time
and the cap is what limits them; it records the most requests it ever had in
flight for the mailbox.
"""

from __future__ import annotations

import collections
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import TestCase

from tests.fakegraph import Fault
from tests.queue import pgserver
from tests.queue.test_e2e import MAILBOX, QUEUED, QueuedRelay, _subjects, fake_graph, graph_settings
from tests.support import TIMEOUT, async_test, in_thread, message

MESSAGES = 2_000
#: Sessions per relay; each sends its share over one connection.
SESSIONS = 10
#: GRAPH_MAX_CONCURRENCY for both relays: the cap the fake must never see passed.
CAP = 3
#: How long the fake holds each sendMail before answering.
HOLD = 0.01


class TwoReplicasTests(TestCase):
    timeout = 600

    @async_test
    async def test_two_relays_one_postgresql_each_message_once_cap_held(self) -> None:
        """2,000 messages through two twistd relays sharing one PostgreSQL queue: each
        reaches Graph exactly once, both relays deliver, and no more than
        GRAPH_MAX_CONCURRENCY sendMail requests for the mailbox are ever in flight at
        once over both relays (and the cap is reached, so the limit was tested)."""
        server = pgserver.server()
        dsn = await in_thread(server.new_database)
        fake = fake_graph(self)
        fake.script("sendMail", *[Fault(delay=HOLD)] * MESSAGES)
        settings = {
            "QUEUE_URL": dsn,
            "QUEUE_CONCURRENCY": "8",
            "GRAPH_MAX_CONCURRENCY": str(CAP),
            # Exchange's sending limits (30 a minute) would hold most of the
            # 2,000 for an hour: this test is about the queue, not budgets.
            "GRAPH_MAILBOX_MESSAGES_PER_MINUTE": "0",
            "GRAPH_MAILBOX_RECIPIENTS_PER_DAY": "0",
            **graph_settings(fake),
            "GRAPH_SEND_TIMEOUT": "30",
        }
        relays = [QueuedRelay(self, **settings), QueuedRelay(self, **settings)]
        subjects = [f"replica test {n:04}" for n in range(MESSAGES)]

        def session(port: int, share: list[str]) -> int:
            sent = 0
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT * 6) as client:
                client.ehlo("client.test")
                for subject in share:
                    client.mail("app@example.com")
                    client.rcpt("someone@example.org")
                    code, reply = client.data(message(subject, f"Body of {subject}.\r\n"))
                    assert code == 250 and QUEUED in reply.decode(), (code, reply)
                    sent += 1
            return sent

        def scenario() -> int:
            for relay in relays:
                relay.start()
            shares = [subjects[n :: 2 * SESSIONS] for n in range(2 * SESSIONS)]
            with ThreadPoolExecutor(2 * SESSIONS) as pool:
                futures = [
                    pool.submit(session, relays[n % 2].port, share)
                    for n, share in enumerate(shares)
                ]
                sent = sum(f.result() for f in futures)
            deadline = time.monotonic() + 400
            while len(fake.deliveries) < MESSAGES and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # a duplicate, if any were coming, would show by now
            for relay in relays:
                self.assertEqual(relay.kill(15), 0)
            return sent

        sent = await in_thread(scenario)
        self.assertEqual(sent, MESSAGES)
        counts = collections.Counter(_subjects(fake.deliveries))
        self.assertEqual(set(counts), set(subjects))
        self.assertEqual([s for s, n in counts.items() if n != 1], [])
        delivered_by = [len(relay.events("message delivered")) for relay in relays]
        self.assertEqual(sum(delivered_by), MESSAGES)
        self.assertTrue(all(delivered_by), delivered_by)
        peak = fake.max_in_flight[MAILBOX.casefold()]
        self.assertLessEqual(peak, CAP)
        self.assertEqual(peak, CAP)
        self.assertEqual(fake.violations, [])
