"""The submission API at shutdown, end to end: curl -> the real twistd, SIGTERM mid-request.

The HTTP listener is the last thing the relay stops, so submissions can
arrive or still be under way while the provider and the queue close
behind it.  These tests hold the relay to the SMTP side's rule: from the
moment the stop begins new submissions are refused (503, Retry-After,
the API's JSON error) while the probes keep answering; those in flight
are waited for within SMTP_SHUTDOWN_TIMEOUT; and every answer is true
(202/200 only for what was stored or delivered, never 503 for something
that was then stored).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.fakegraph import Fault
from tests.providers.graph.test_twistd_graph import NEUTRAL
from tests.queue.test_e2e import QueuedRelay, fake_graph, graph_settings
from tests.support import TIMEOUT, async_test, in_thread, wait_until
from tests.test_twistd import free_port

SECRET = "shutdown-" + "k" * 40
CURL = shutil.which("curl")
STOPPING = "shutting down: no new connections, finishing messages in flight"


def raw(subject: str) -> bytes:
    return (
        "From: Relay <relay@contoso.example>\r\n"
        "To: Alice <alice@fabrikam.example>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject}@contoso.example>\r\n"
        "\r\n"
        "Body.\r\n"
    ).encode()


def curl(port: int, path: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with curl (blocking): status, headers (lower-case names), body.

    Status 0 when no HTTP answer came (the listener already closed).
    """
    assert CURL is not None
    command = [CURL, "-sS", "-D", "-", "-o", "-", "-w", "\n%{http_code}"]
    if data is not None:
        command += [
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {SECRET}",
            "-H",
            "Content-Type: message/rfc822",
            "--data-binary",
            "@-",
        ]
    command.append(f"http://127.0.0.1:{port}{path}")
    done = subprocess.run(command, input=data or b"", capture_output=True, timeout=TIMEOUT)
    output, _, code = done.stdout.rpartition(b"\n")
    head, _, body = output.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(code or b"0"), headers, body


SUBMIT = "/v1/messages/raw?from=relay@contoso.example&to=alice@fabrikam.example"


def submit_while_busy(
    relay: QueuedRelay, http: int, busy: Callable[[], bool], subject: str
) -> dict[str, Any]:
    """Start C{relay}, submit with curl, SIGTERM once C{busy()}: the answer, exit and stop time.

    Blocking: run it in a thread.  C{reply} is curl's (status, headers, body).
    """
    relay.start()
    seen: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: seen.__setitem__("reply", curl(http, SUBMIT, raw(subject)))
    )
    sender.start()
    wait_until(busy, "the provider to have the message")
    started = time.monotonic()
    seen["exit"] = relay.kill(signal.SIGTERM)
    seen["took"] = time.monotonic() - started
    sender.join(TIMEOUT)
    return seen


def api_relay(case: TestCase, **settings: str) -> tuple[QueuedRelay, int]:
    if CURL is None:
        raise SkipTest("curl is not installed")
    http = free_port()
    relay = QueuedRelay(
        case, HTTP_LISTEN=f"127.0.0.1:{http}", HTTP_API_KEYS=f"e2e:{SECRET}", **settings
    )
    return relay, http


class DirectModeTests(TestCase):
    timeout = 120

    @async_test
    async def test_in_flight_finished_new_refused_probes_answer(self) -> None:
        """Direct mode, Graph slow to answer (2 s): SIGTERM while a submission waits on
        it.  The submission is waited for and answered 200 (delivered once); a new one
        during the stop gets 503 with Retry-After and code shutting_down; /readyz says
        503 stopping and /healthz still answers.  Before the fix the relay stopped
        without waiting (the first client got no answer) and took the new one."""
        fake = fake_graph(self)
        fake.script("sendMail", Fault(delay=2.0))
        relay, http = api_relay(
            self, QUEUE_URL="", SMTP_SHUTDOWN_TIMEOUT="10", **NEUTRAL, **graph_settings(fake)
        )

        def scenario() -> dict[str, Any]:
            relay.start()
            seen: dict[str, Any] = {}
            first = threading.Thread(
                target=lambda: seen.__setitem__("first", curl(http, SUBMIT, raw("first")))
            )
            first.start()
            wait_until(lambda: bool(fake.routes("sendMail")), "Graph to have the first message")
            assert relay.process is not None
            started = time.monotonic()
            relay.process.send_signal(signal.SIGTERM)
            relay.wait_for(STOPPING)
            seen["second"] = curl(http, SUBMIT, raw("second"))
            seen["ready"] = curl(http, "/readyz")
            seen["health"] = curl(http, "/healthz")
            first.join(TIMEOUT)
            seen["exit"] = relay.process.wait(TIMEOUT)  # the one SIGTERM's stop
            seen["took"] = time.monotonic() - started
            return seen

        seen = await in_thread(scenario)
        code, _, body = seen["first"]
        self.assertEqual((code, json.loads(body)["status"]), (200, "delivered"), body)
        code, headers, body = seen["second"]
        self.assertEqual((code, json.loads(body)["error"]["code"]), (503, "shutting_down"), body)
        self.assertEqual(headers.get("retry-after"), "30")
        code, _, body = seen["ready"]
        self.assertEqual(code, 503)
        self.assertIn(b"stopping", body)
        self.assertIn(seen["health"][0], (200, 503))
        self.assertEqual(len(fake.received_by("alice@fabrikam.example")), 1)
        self.assertEqual(seen["exit"], 0)
        self.assertLess(seen["took"], 10 + 7)

    @async_test
    async def test_past_the_timeout_a_send_on_the_wire_gets_no_answer(self) -> None:
        """Direct mode, Graph answering only after 6 s, SMTP_SHUTDOWN_TIMEOUT 1: the
        sendMail request is on the wire when the stop gives up, so a real Graph may
        have the message.  The client is not told 503 shutting_down (its retry would be
        a duplicate of a delivered message, review 5); the send is waited for within
        the grace, and when no answer comes the stop goes on and the request gets no
        HTTP answer; one warning names the message as possibly delivered; the stop
        stays bounded.  (Before review 5: 503 and a cancelled request.)"""
        fake = fake_graph(self)
        fake.script("sendMail", Fault(delay=6.0))
        relay, http = api_relay(
            self, QUEUE_URL="", SMTP_SHUTDOWN_TIMEOUT="1", **NEUTRAL, **graph_settings(fake)
        )

        seen = await in_thread(
            submit_while_busy, relay, http, lambda: bool(fake.routes("sendMail")), "slow"
        )
        code, _, body = seen["reply"]
        self.assertEqual(code, 0, body)  # no HTTP answer at all
        [line] = relay.events(
            "delivery cancelled at shutdown after the provider had the message: "
            "it may be delivered, and the client got no reply"
        )
        self.assertEqual(line["message_id"], "<slow@contoso.example>")
        self.assertEqual(seen["exit"], 0)
        self.assertLess(seen["took"], 1 + 7)


class QueueModeTests(TestCase):
    timeout = 120

    @async_test
    async def test_burst_answers_are_true(self) -> None:
        """Queue mode (SQLite, stdout provider), 40 submissions at once and SIGTERM in
        the middle: every answer is 202 or 503 shutting_down (or no answer at all once
        the listener has closed), and the messages stored are exactly those answered
        202: none answered 503 and stored anyway, none answered 202 and lost."""
        relay, http = api_relay(self, SMTP_SHUTDOWN_TIMEOUT="5")

        def scenario() -> list[tuple[int, dict[str, str], bytes]]:
            relay.start()
            results: list[tuple[int, dict[str, str], bytes]] = []
            lock = threading.Lock()

            def one(n: int) -> None:
                answer = curl(http, SUBMIT, raw(f"burst-{n}"))
                with lock:
                    results.append(answer)

            threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
            for n, thread in enumerate(threads):
                thread.start()
                if n == 15:
                    assert relay.process is not None
                    relay.process.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(TIMEOUT)
            relay.kill(signal.SIGTERM)
            return results

        results = await in_thread(scenario)
        self.assertEqual(len(results), 40)
        accepted = set()
        for code, _, body in results:
            if code == 202:
                accepted.add(json.loads(body)["id"])
            elif code == 503:
                self.assertEqual(json.loads(body)["error"]["code"], "shutting_down", body)
            else:
                self.assertEqual(code, 0, body)
        stored = {event["id"] for event in relay.events("message queued")}
        self.assertEqual(accepted, stored)
        self.assertLess(len(accepted), 40)
