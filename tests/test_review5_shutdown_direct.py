"""Review 5: direct mode at a forced shutdown, when the upstream answers just after it.

The real twistd process, smtplib in a thread and the scripted upstream SMTP
server of L{tests.providers.smtp.upstream}, as in
C{tests/test_shutdown_direct.py}.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to
from tests.support import async_test, in_thread
from tests.test_shutdown_direct import STOP_BOUND, _stop_while_busy


class HandedOverTests(TestCase):
    timeout = 120

    @async_test
    async def test_upstream_answer_due_right_after_the_force_is_waited_for(self) -> None:
        """The upstream has the whole body and answers 250 half a second after the
        forced stop: the client must hear that 250, not 421.

        Once the final dot has left, cancelling cannot take the message back
        (RFC 5321 4.1.1.4: the upstream commits at the dot), so answering 421
        at once and cutting the connection makes the client's retry a
        duplicate of a message the upstream delivers.  Queue mode waits
        COMMIT_GRACE (1.5 s) for a commit under way and tells the client the
        real outcome; direct mode, past the hand-over, should likewise wait a
        bounded grace for the provider's answer (L{Closing.force_close} sends
        421 and L{RelayMessage.cancel} cuts the transaction instead).
        """
        script, relay = await relay_to(
            self, lambda address: "250 2.1.5 Ok", QUEUE_URL="", SMTP_SHUTDOWN_TIMEOUT="1"
        )
        # Forced at about 1 s after SIGTERM; the upstream answers at 1.5 s.
        script.final_delay = 1.5

        def scenario() -> tuple[tuple[int, bytes], int, float]:
            return _stop_while_busy(relay, lambda: bool(script.bodies), "answer-soon")

        (reply, text), code, took = await in_thread(scenario)
        self.assertEqual(len(script.bodies), 1)  # the upstream has the message
        self.assertEqual((reply, code), (250, 0), text)
        self.assertLess(took, STOP_BOUND)
