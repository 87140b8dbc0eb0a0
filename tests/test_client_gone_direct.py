"""Direct mode (no queue): a client that disconnects while the provider works on its message.

It never heard 250, so it will send the message again.  A send the provider
has not yet handed over is cancelled then (before, it went on, and the
client's retry made the message arrive twice); one already handed over (the
upstream has the final dot) cannot be taken back and is left to finish,
with a warning naming it.  The real twistd process, a client on a raw
smtplib connection in a thread, and the scripted upstream SMTP server of
L{tests.providers.smtp.upstream}, slow on purpose.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, in_thread, message, wait_until
from tests.test_handover_at_stop import CLIENT_GONE, GONE_AFTER_HANDOVER


def _send_then_leave(relay: QueuedRelay, subject: str, ready: Callable[[], bool]) -> None:
    """Send a whole message up to its final dot, wait until C{ready()}, disconnect unanswered."""
    relay.start()
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT)
    client.ehlo("client.test")
    client.mail("a@example.com")
    client.rcpt("rcpt@example.org")
    code, _ = client.docmd("DATA")
    assert code == 354, code
    body = message(subject, Message_ID=f"<{subject}@example.com>")
    client.send(body + b".\r\n")  # message() ends its body with CRLF
    wait_until(ready, "the upstream to be at the expected stage")
    client.close()


class ClientGoneTests(TestCase):
    timeout = 120

    @async_test
    async def test_send_not_handed_over_is_cancelled(self) -> None:
        """The upstream is slow to answer DATA (2 s) and the client leaves meanwhile:
        the upstream transaction is cut before the body, so the upstream never has the
        message (the client's retry is its only copy), and one info line says so."""
        script, relay = await relay_to(self, lambda address: "250 2.1.5 Ok", QUEUE_URL="")
        script.data_delay = 2.0

        def scenario() -> None:
            _send_then_leave(relay, "left-early", lambda: b"DATA" in script.commands)
            time.sleep(script.data_delay + 1.0)  # past the moment the upstream says 354

        await in_thread(scenario)
        self.assertEqual(script.bodies, [])
        [line] = relay.events(CLIENT_GONE)
        self.assertEqual(line["message_id"], "<left-early@example.com>")
        self.assertEqual(line["level"], "info")
        self.assertEqual(relay.events(GONE_AFTER_HANDOVER), [])

    @async_test
    async def test_send_handed_over_is_left_to_finish_and_named(self) -> None:
        """The upstream has the whole body and answers late (1 s); the client leaves
        meanwhile: cancelling could not take the message back, so the send finishes
        (the upstream's 250 is logged as delivered) and a warning names the message."""
        script, relay = await relay_to(self, lambda address: "250 2.1.5 Ok", QUEUE_URL="")
        script.final_delay = 1.0

        def scenario() -> None:
            _send_then_leave(relay, "left-late", lambda: bool(script.bodies))
            wait_until(lambda: bool(relay.events("message delivered")), "the delivery")

        await in_thread(scenario)
        self.assertEqual(len(script.bodies), 1)
        [warning] = relay.events(GONE_AFTER_HANDOVER)
        self.assertEqual(warning["level"], "warn")
        self.assertTrue(warning["id"])
        [delivered] = relay.events("message delivered")
        self.assertEqual(delivered["message_id"], "<left-late@example.com>")
        self.assertEqual(delivered["id"], warning["id"])
        self.assertEqual(relay.events(CLIENT_GONE), [])
