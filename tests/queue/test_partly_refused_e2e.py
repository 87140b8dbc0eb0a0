"""Queue mode with PROVIDER=smtp against an upstream that refuses some recipients.

The real twistd process, a real SQLite queue, the upstream fake of
L{tests.providers.smtp.upstream} on a loopback socket, and the real
operator command reading the result back.
"""

from __future__ import annotations

import signal

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to, send
from tests.support import async_test, in_thread


class RecordedOnTheMessageTests(TestCase):
    @async_test
    async def test_refusals_recorded_and_shown(self) -> None:
        """One recipient accepted, one refused with 550: the client heard 250, the
        message is dead for the refused recipient alone, and `smtpproxy queue show`
        names the refusal with the upstream's reply (issue 15: with a queue, refused
        recipients are recorded on the message); the accepted one got it once."""
        seen: list[str] = []

        def rcpt(address: str) -> str:
            seen.append(address)
            return "550 5.1.1 No such user" if address.startswith("gone") else "250 2.1.5 Ok"

        script, relay = await relay_to(self, rcpt)

        def scenario() -> tuple[object, object]:
            send(relay, ["ok@example.org", "gone@example.org"], "Partly dead", "Body.\r\n")
            [dead] = relay.wait_for("message dead")
            shown = relay.command("show", dead["id"])
            listed = relay.command("list")
            relay.kill(signal.SIGTERM)
            return shown, listed

        shown, listed = await in_thread(scenario)
        assert isinstance(shown, dict), shown
        self.assertEqual((shown["state"], shown["recipients"]), ("dead", ["gone@example.org"]))
        [attempt] = shown["history"]
        self.assertEqual(
            attempt["refused"], [{"address": "gone@example.org", "reply": "550 5.1.1 No such user"}]
        )
        self.assertIn("delivered to 1 of 2 recipients", attempt["reply"])
        self.assertEqual((seen.count("ok@example.org"), len(script.bodies)), (1, 1))
        self.assertEqual(len(listed), 1)
