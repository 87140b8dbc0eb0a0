"""Review 5: direct mode at a forced shutdown, when the upstream answers just after it.

The real twistd process, smtplib (or curl, for the HTTP API) in a thread and
the scripted upstream SMTP server of L{tests.providers.smtp.upstream}, as in
C{tests/test_shutdown_direct.py} and C{tests/web/api/test_twistd_shutdown.py}.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SkipTest, TestCase

from tests.queue.refusing_upstream import relay_to
from tests.support import async_test, in_thread
from tests.test_shutdown_direct import STOP_BOUND, _stop_while_busy
from tests.test_twistd import free_port
from tests.web.api.test_twistd_shutdown import CURL, SECRET, submit_while_busy


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
        the handover grace (1.5 s by default) for a commit under way and tells the client the
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


class HttpHandedOverTests(TestCase):
    timeout = 120

    @async_test
    async def test_http_submission_answer_due_right_after_the_give_up_is_waited_for(
        self,
    ) -> None:
        """The HTTP API's twin of the SMTP case above: the upstream has the whole body of
        a raw submission and answers 250 half a second after the stop gives up on it.
        The client must hear 200 delivered, not 503 shutting_down.

        L{drain.Flight.give_up} cancels the provider's send at the timeout
        whatever stage it is in; past the hand-over that only cuts the
        upstream's answer off, and the client's retry after the 503 is a
        duplicate.  Right: past the hand-over the give-up waits (within
        the handover grace and L{drain.GIVE_UP_MARGIN}) for the provider's answer.
        """
        if CURL is None:
            raise SkipTest("curl is not installed")
        http = free_port()
        script, relay = await relay_to(
            self,
            lambda address: "250 2.1.5 Ok",
            QUEUE_URL="",
            SMTP_SHUTDOWN_TIMEOUT="1",
            HTTP_LISTEN=f"127.0.0.1:{http}",
            HTTP_API_KEYS=f"e2e:{SECRET}",
        )
        script.final_delay = 1.5

        seen = await in_thread(submit_while_busy, relay, http, lambda: bool(script.bodies), "soon")
        self.assertEqual(len(script.bodies), 1)  # the upstream has the message
        code, _, body = seen["reply"]
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["status"], "delivered")
        self.assertEqual(seen["exit"], 0)
        self.assertLess(seen["took"], STOP_BOUND)
