"""Direct mode end to end: smtplib -> the real twistd (PROVIDER=smtp, no queue) -> upstream.

The upstream is the scripted SMTP server of L{tests.providers.smtp.upstream}
on a loopback socket (offering PIPELINING, so the relay's DATA is already
on its way when a recipient is deferred); the relay is the real twistd
process of L{tests.queue.refusing_upstream} with C{QUEUE_URL} empty.
"""

from __future__ import annotations

import smtplib

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to
from tests.support import TIMEOUT, async_test, in_thread, message

OK, BUSY, GONE = "ok@example.org", "busy@example.org", "gone@example.org"


def _send(port: int, recipients: list[str]) -> tuple[int, str]:
    """One message with smtplib: the code and text of the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        for recipient in recipients:
            code, _ = client.rcpt(recipient)
            assert code == 250, code
        code, text = client.data(message("Partial", "Body of the message.\r\n"))
    return code, text.decode()


class DeferredRecipientTests(TestCase):
    timeout = 120

    @async_test
    async def test_client_hears_451_then_retry_delivers_once_to_everyone(self) -> None:
        """The upstream defers busy@ (450 4.2.1) and takes ok@: the client hears 451 4.2.1
        naming busy@, and the upstream received no message at all (before the fix the
        client heard 250 and busy@ never got it).  The client retries once the upstream
        takes both: 250, and the upstream has exactly one message, for both recipients."""
        deferring = {"on": True}
        answers: list[tuple[str, str]] = []

        def rcpt(address: str) -> str:
            answer = "450 4.2.1 Mailbox busy" if deferring["on"] and address == BUSY else "250 Ok"
            answers.append((address, answer))
            return answer

        script, relay = await relay_to(self, rcpt, QUEUE_URL="")

        def scenario() -> tuple[tuple[int, str], list[bytes], tuple[int, str]]:
            relay.start()
            first = _send(relay.port, [OK, BUSY])
            relay.wait_for("message not delivered")
            after_first = list(script.bodies)
            deferring["on"] = False
            answers.clear()
            second = _send(relay.port, [OK, BUSY])
            return first, after_first, second

        (code, text), after_first, (code2, text2) = await in_thread(scenario)
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith("4.2.1 "), text)
        self.assertIn("deferred 1 of 2 recipients", text)
        self.assertIn(f"<{BUSY}> 450 4.2.1 Mailbox busy", text)
        self.assertEqual(after_first, [])
        self.assertEqual(code2, 250, text2)
        self.assertIn("OK: delivered as ", text2)
        # One message after the retry, and in its transaction each recipient was taken.
        self.assertEqual(len(script.bodies), 1)
        self.assertEqual(sorted(answers), [(BUSY, "250 Ok"), (OK, "250 Ok")])
        [line] = relay.events("message not delivered")
        self.assertEqual((line["outcome"], line["reply"]), ("deferred", "451 4.2.1"))
        [held] = relay.events("upstream deferred some recipients, message not sent")
        self.assertEqual(held["refused"], [f"<{BUSY}> 450 4.2.1 Mailbox busy"])
        self.assertEqual(relay.events("recipients refused and not retried (no queue)"), [])
        self.assertEqual(len(relay.events("message delivered")), 1)

    @async_test
    async def test_permanent_refusal_is_named_in_the_250(self) -> None:
        """The upstream refuses gone@ for good (550 5.1.1) and takes ok@: ok@ gets the
        message once, and the client's 250 says so (to 1 of 2 recipients) and names
        gone@ with the upstream's reply; an error line names it too."""
        script, relay = await relay_to(
            self,
            lambda address: "550 5.1.1 No such user" if address == GONE else "250 Ok",
            QUEUE_URL="",
        )

        def scenario() -> tuple[int, str]:
            relay.start()
            return _send(relay.port, [OK, GONE])

        code, text = await in_thread(scenario)
        self.assertEqual(code, 250, text)
        self.assertIn("to 1 of 2 recipients; not delivered to: ", text)
        self.assertIn(f"<{GONE}> 550 5.1.1 No such user", text)
        self.assertEqual(len(script.bodies), 1)
        [line] = relay.events("recipients refused and not retried (no queue)")
        self.assertEqual((line["accepted"], line["temporary"]), (1, 0))
