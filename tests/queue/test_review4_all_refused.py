"""Review 4: a recipient refused with 5xx is retried when every recipient was refused.

L{smtpproxy.queue.policy} promises per-recipient outcomes: a 5xx recipient
is "failed for good" and never sent to again.  But when the upstream refuses
every recipient of an attempt, some 4xx and some 5xx,
L{smtpproxy.providers.smtp.wire.outcome} raises one temporary error for the
whole message ("a temporary refusal wins"), so the worker retries the whole
envelope: the 5xx recipient is asked for again at every retry until the
others are taken, and if they never are it ends "expired" days later
instead of failed at once.
"""

from __future__ import annotations

import signal

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to, send
from tests.support import async_test, in_thread


class AllRefusedMixedTests(TestCase):
    @async_test
    async def test_permanent_recipient_not_retried_when_all_refused(self) -> None:
        """First attempt: busy@ 450, gone@ 550 (nobody accepted).  Second attempt: busy@
        takes it.  gone@ was refused for good at the first attempt and must not be asked
        for again; the message ends dead for gone@ alone."""
        seen: list[str] = []

        def rcpt(address: str) -> str:
            seen.append(address)
            if address.startswith("gone"):
                return "550 5.1.1 No such user"
            if seen.count(address) == 1:
                return "450 4.2.1 Mailbox busy"
            return "250 2.1.5 Ok"

        script, relay = await relay_to(self, rcpt, QUEUE_RETRY_MIN_INTERVAL="1")

        def scenario() -> object:
            send(relay, ["busy@example.org", "gone@example.org"], "Mixed", "Body.\r\n")
            [dead] = relay.wait_for("message dead", timeout=60)
            shown = relay.command("show", dead["id"])
            relay.kill(signal.SIGTERM)
            return shown

        shown = await in_thread(scenario)
        assert isinstance(shown, dict), shown
        self.assertEqual((shown["state"], shown["recipients"]), ("dead", ["gone@example.org"]))
        self.assertEqual(len(script.bodies), 1)
        self.assertEqual(seen.count("gone@example.org"), 1, seen)
