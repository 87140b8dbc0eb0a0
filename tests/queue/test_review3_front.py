"""Review 3: the queue's front door against a store that is slow to commit.

The real twistd process with a real SQLite queue; the test holds SQLite's
write lock from its own connection (as the operator command may, or a
slow disk would) so that an enqueue is in flight when the relay stops.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import time

from twisted.trial.unittest import TestCase

from tests.queue.refusing_upstream import relay_to, send
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, in_thread


def _read_reply(sock: socket.socket, deadline: float) -> bytes:
    """Bytes up to and including the first complete reply line (or what came before EOF)."""
    data = b""
    while b"\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_until(sock: socket.socket, code: bytes, deadline: float) -> bytes:
    """Replies up to and including the first line that starts with C{code}; fails on
    anything else that ends the exchange (EOF, the deadline)."""
    data = b""
    while time.monotonic() < deadline:
        if any(line.startswith(code) for line in data.split(b"\r\n")[:-1]):
            return data
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"no {code!r} reply; got {data!r}")


class InFlightAtShutdownTests(TestCase):
    @async_test
    async def test_421_not_accepted_means_not_queued(self) -> None:
        """A message whose enqueue is still waiting for the store when the shutdown
        timeout forces the session closed hears "421 ... message not accepted"; it
        must then not be queued (and delivered later), or the client's retry is a
        duplicate.  Today the store commits it once the lock goes, after the 421."""
        relay = QueuedRelay(self, SMTP_SHUTDOWN_TIMEOUT="1")

        def scenario() -> tuple[bytes, dict[str, int]]:
            relay.start()
            # The 220 comes before the store is open; a lock taken earlier made the
            # open itself wait, and the relay stopped (421) before the 354.
            relay.wait_for("queue opened")
            lock = sqlite3.connect(relay.dir / "queue.db", isolation_level=None, timeout=30)
            try:
                lock.execute("BEGIN IMMEDIATE")
                with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
                    wait = time.monotonic() + 30
                    _read_until(sock, b"220 ", wait)
                    sock.sendall(b"EHLO c\r\n")
                    _read_until(sock, b"250 ", wait)
                    sock.sendall(
                        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                    )
                    # Each reply read before the next step: on a loaded machine fixed
                    # waits were too short and the body went out before the 354.
                    _read_until(sock, b"354 ", wait)
                    sock.sendall(b"Subject: in flight\r\n\r\nBody of in flight.\r\n.\r\n")
                    time.sleep(0.5)  # the enqueue now waits for the lock
                    assert relay.process is not None
                    relay.process.send_signal(signal.SIGTERM)
                    reply = _read_reply(sock, time.monotonic() + 15)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            relay.kill(signal.SIGTERM)
            stats = relay.command("stats")
            return reply, stats

        reply, stats = await in_thread(scenario)
        self.assertTrue(reply.startswith(b"421"), reply)
        self.assertEqual(
            (stats["queued"], stats["delivering"]),
            (0, 0),
            f"the client heard {reply!r} but the message was queued",
        )


class PartlyRefusedTests(TestCase):
    @async_test
    async def test_recipient_refused_for_now_is_retried_not_dropped(self) -> None:
        """Queue mode, PROVIDER=smtp: the upstream takes one recipient and answers
        "450 mailbox busy" for the other.  The client heard 250 for both, so the
        relay owns the message: the busy recipient must be retried (and get it once
        the upstream takes it) and the accepted one must not get it twice.  Issue 15
        also says refused recipients are recorded on the queued message.  Today the
        message counts as delivered: the busy recipient is logged and dropped."""
        seen: list[str] = []

        def rcpt(address: str) -> str:
            seen.append(address)
            if address == "busy@example.org" and seen.count(address) == 1:
                return "450 4.2.1 Mailbox busy, try later"
            return "250 2.1.5 Ok"

        script, relay = await relay_to(
            self, rcpt, QUEUE_RETRY_MIN_INTERVAL="1", QUEUE_RETRY_MAX_INTERVAL="2"
        )

        def scenario() -> None:
            send(
                relay,
                ["ok@example.org", "busy@example.org"],
                "Partly refused",
                "Body of partly refused.\r\n",
            )
            relay.wait_for("message delivered")
            deadline = time.monotonic() + 10
            while seen.count("busy@example.org") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            relay.kill(signal.SIGTERM)

        await in_thread(scenario)
        self.assertEqual(
            (seen.count("busy@example.org"), seen.count("ok@example.org"), len(script.bodies)),
            (2, 1, 2),
            f"RCPTs the upstream saw: {seen}; bodies: {len(script.bodies)}",
        )
