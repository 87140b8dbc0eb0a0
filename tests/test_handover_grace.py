"""SMTP_SHUTDOWN_HANDOVER_GRACE through the real twistd: a slow upstream's answer at a forced stop.

Direct mode, the scripted upstream SMTP server of
L{tests.providers.smtp.upstream} answering the final dot 3.5 s late (an
upstream with slow content filtering), C{SMTP_SHUTDOWN_TIMEOUT} 1 s and
SIGTERM once the upstream has the whole body: the stop is forced at about
1 s, when the upstream already has the message.  With the default grace
(1.5 s) its answer comes too late, so the client gets no reply, as before
the setting existed; with a grace of 5 s the upstream's 250 reaches the
client, over SMTP (smtplib) and over the HTTP API (curl).  The same
decisions on a Clock are in C{tests/test_handover_at_stop.py}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.queue.refusing_upstream import relay_to
from tests.support import async_test, in_thread
from tests.test_shutdown_direct import SHUTDOWN_TIMEOUT, STOP_BOUND, UNANSWERED, _stop_while_busy
from tests.test_twistd import free_port
from tests.web.api.test_twistd_shutdown import CURL, SECRET, submit_while_busy

#: When the upstream answers the final dot: past the default grace's end
#: (forced at 1 s, + 1.5 s), well inside a grace of 5 s.
ANSWER_DELAY = 3.5
LONG_GRACE = 5.0


async def _slow_upstream(case: TestCase, **settings: str) -> tuple[Any, Any]:
    """A direct-mode relay (not started) to an upstream that answers the final dot late."""
    script, relay = await relay_to(
        case,
        lambda address: "250 2.1.5 Ok",
        QUEUE_URL="",
        SMTP_SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
        **settings,
    )
    script.final_delay = ANSWER_DELAY
    return script, relay


class SmtpGraceTests(TestCase):
    timeout = 120

    @async_test
    async def test_longer_grace_lets_the_upstream_answer_reach_the_client(self) -> None:
        """With SMTP_SHUTDOWN_HANDOVER_GRACE=5 the session waits past the forced stop for
        the upstream that has the message; its 250 (3.5 s after the dot) is what the
        client hears, no warning says the message may be lost, the process exits 0
        within the timeout, the grace and the usual few seconds."""
        script, relay = await _slow_upstream(self, SMTP_SHUTDOWN_HANDOVER_GRACE=str(LONG_GRACE))

        def scenario() -> tuple[tuple[int, bytes], int, float]:
            return _stop_while_busy(relay, lambda: bool(script.bodies), "slow-filter")

        (reply, text), code, took = await in_thread(scenario)
        self.assertEqual(len(script.bodies), 1)
        self.assertEqual((reply, code), (250, 0), text)
        self.assertEqual(relay.events(UNANSWERED), [])
        self.assertGreater(took, ANSWER_DELAY - 1.0)  # it did wait for the answer
        self.assertLess(took, STOP_BOUND + LONG_GRACE)

    @async_test
    async def test_default_grace_is_unchanged(self) -> None:
        """Without the setting the grace is 1.5 s as before: the same late upstream's
        answer does not come in time, so the client gets no reply at all and one
        warning names the message as possibly delivered; the stop stays as short."""
        script, relay = await _slow_upstream(self)

        def scenario() -> tuple[tuple[int, bytes], int, float]:
            return _stop_while_busy(relay, lambda: bool(script.bodies), "default-grace")

        (reply, text), code, took = await in_thread(scenario)
        self.assertEqual((reply, code), (0, 0), text)
        self.assertIn(b"SMTPServerDisconnected", text)
        [line] = relay.events(UNANSWERED)
        self.assertEqual(line["message_id"], "<default-grace@example.com>")
        self.assertLess(took, STOP_BOUND)


class HttpGraceTests(TestCase):
    timeout = 120

    @async_test
    async def test_longer_grace_lets_the_upstream_answer_reach_the_http_client(self) -> None:
        """The HTTP API's twin: a raw submission whose upstream has the whole body at the
        forced stop gets the upstream's answer as 200 delivered when the grace is 5 s,
        not a dropped request."""
        if CURL is None:
            raise SkipTest("curl is not installed")
        http = free_port()
        script, relay = await _slow_upstream(
            self,
            SMTP_SHUTDOWN_HANDOVER_GRACE=str(LONG_GRACE),
            HTTP_LISTEN=f"127.0.0.1:{http}",
            HTTP_API_KEYS=f"e2e:{SECRET}",
        )

        seen = await in_thread(
            submit_while_busy, relay, http, lambda: bool(script.bodies), "filtered"
        )
        self.assertEqual(len(script.bodies), 1)
        code, _, body = seen["reply"]
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["status"], "delivered")
        self.assertEqual(relay.events(UNANSWERED), [])
        self.assertEqual(seen["exit"], 0)
        self.assertLess(seen["took"], STOP_BOUND + LONG_GRACE)
