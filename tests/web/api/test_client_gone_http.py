"""HTTP API, direct mode: a client that disconnects before its answer, as the SMTP side handles it.

It never heard 200, so it will send the message again.  A send the provider
has not yet handed over is cancelled then, or the retry makes the message
arrive twice; one already handed over (the upstream has the final dot)
cannot be taken back and is left to finish, with a warning naming it.  The
real twistd process, a raw HTTP client on a plain socket that sends a whole
submission and closes without reading, and the scripted upstream SMTP
server of L{tests.providers.smtp.upstream}, slow on purpose (the SMTP
twin is C{tests/test_client_gone_direct.py}).
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable

from twisted.trial.unittest import TestCase

from tests.providers.smtp import upstream
from tests.queue.refusing_upstream import relay_to
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, in_thread, wait_until
from tests.test_handover_at_stop import CLIENT_GONE, GONE_AFTER_HANDOVER
from tests.test_twistd import free_port
from tests.web.api.test_twistd_shutdown import SECRET, SUBMIT, raw

#: The counter a cancelled HTTP submission must show up in (the provider is the upstream's).
CANCELLED = 'smtpproxy_messages_total{front_door="http",outcome="cancelled",provider="smtp"}'


def _submit_then_leave(http: int, subject: str, ready: Callable[[], bool]) -> None:
    """POST a whole raw submission, wait until C{ready()}, close the socket unanswered."""
    body = raw(subject)
    head = (
        f"POST {SUBMIT} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{http}\r\n"
        f"Authorization: Bearer {SECRET}\r\n"
        "Content-Type: message/rfc822\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("ascii")
    client = socket.create_connection(("127.0.0.1", http), timeout=TIMEOUT)
    try:
        client.sendall(head + body)
        wait_until(ready, "the upstream to be at the expected stage")
    finally:
        client.close()


def _metric(http: int, name: str) -> float:
    """One sample of the relay's /metrics (0 when it is not there yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=TIMEOUT) as answer:
        text: str = answer.read().decode("utf-8")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


class HttpClientGoneTests(TestCase):
    timeout = 120

    async def _relay(self) -> tuple[upstream.Script, QueuedRelay, int]:
        """A direct-mode relay (API on) in front of the scripted upstream; not started."""
        http = free_port()
        script, relay = await relay_to(
            self,
            lambda address: "250 2.1.5 Ok",
            QUEUE_URL="",
            HTTP_LISTEN=f"127.0.0.1:{http}",
            HTTP_API_KEYS=f"e2e:{SECRET}",
        )
        return script, relay, http

    @async_test
    async def test_send_not_handed_over_is_cancelled(self) -> None:
        """The upstream is slow to answer DATA (2 s) and the HTTP client closes its socket
        meanwhile: the upstream transaction is cut before the body, so the upstream never
        has the message (the client's retry is its only copy); one info line with
        front_door http says so, and /metrics counts it as cancelled.  Before, the send
        went on and the upstream got the message although the client never heard 200."""
        script, relay, http = await self._relay()
        script.data_delay = 2.0

        def scenario() -> float:
            relay.start()
            _submit_then_leave(http, "http-left-early", lambda: b"DATA" in script.commands)
            time.sleep(script.data_delay + 1.0)  # past the moment the upstream says 354
            return _metric(http, CANCELLED)

        counted = await in_thread(scenario)
        self.assertEqual(script.bodies, [])
        [line] = relay.events(CLIENT_GONE)
        self.assertEqual(line["message_id"], "<http-left-early@contoso.example>")
        self.assertEqual(line["front_door"], "http")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["ended_by"], "cancel")
        self.assertEqual(relay.events(GONE_AFTER_HANDOVER), [])
        self.assertEqual(relay.events("message delivered"), [])
        self.assertEqual(counted, 1.0)

    @async_test
    async def test_send_handed_over_is_left_to_finish_and_named(self) -> None:
        """The upstream has the whole body and answers late (1 s); the HTTP client closes
        meanwhile: cancelling could not take the message back, so the send finishes (the
        upstream's 250 is logged as delivered, once) and a warning names the message."""
        script, relay, http = await self._relay()
        script.final_delay = 1.0

        def scenario() -> None:
            relay.start()
            _submit_then_leave(http, "http-left-late", lambda: bool(script.bodies))
            wait_until(lambda: bool(relay.events("message delivered")), "the delivery")

        await in_thread(scenario)
        self.assertEqual(len(script.bodies), 1)
        [warning] = relay.events(GONE_AFTER_HANDOVER)
        self.assertEqual(warning["level"], "warn")
        self.assertEqual(warning["front_door"], "http")
        self.assertTrue(warning["request_id"])
        [delivered] = relay.events("message delivered")
        self.assertEqual(delivered["message_id"], "<http-left-late@contoso.example>")
        self.assertEqual(delivered["id"], warning["id"])
        self.assertEqual(relay.events(CLIENT_GONE), [])
