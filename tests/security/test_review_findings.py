"""Defects found in the adversarial review of issues 9 and 10; each test failed before its fix.

Every test names its finding in its docstring and says what went wrong
before the fix; docs/security.md lists them as SEC-070 to SEC-072.  The tests prove
behaviour, not timing: where time matters they run on a L{Clock}, or allow
several times the bound that the code promises.
"""

from __future__ import annotations

import dataclasses
import socket
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.smtp.test_implicit_tls import listen_implicit
from tests.smtp.test_protocol_edges import Harness, reply_lines
from tests.support import OPEN, TIMEOUT, async_test, in_thread, read_replies, start_relay

START = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"


class ShutdownDuplicateTests(SynchronousTestCase):
    def test_SEC_070_message_told_not_accepted_is_never_delivered(self) -> None:
        """Review finding 1, fixed; before the fix: a spooled body waiting for the in-flight budget
        when shutdown forces its session closed gets "421 ... message not accepted", yet once the
        budget frees (here: the other session ends too) it is handed to the provider anyway: the
        client retries and the message is delivered twice. The queued claim is never cancelled
        when its session ends (_end_of_data hands the body to _complete, out of reach of
        _abandon_message)."""
        harness = Harness(spool_threshold=1000, max_inflight_bytes=100)
        holder, _ = harness.connect()
        holder.dataReceived(START + b"DATA\r\n" + b"x" * 80)  # 80 bytes held in memory
        sender, sender_wire = harness.connect()
        body = b"Subject: big\r\n\r\n" + b"y" * 200 + b"\r\n"
        sender.dataReceived(START + b"DATA\r\n" + body + b".\r\n")
        # Spilled (the budget had no room) and now queued for the read-back.
        self.assertEqual(harness.factory.spool.budget.waiting, 1)
        self.assertEqual(harness.provider.emails, [])

        harness.factory.shutdown(5.0)
        harness.clock.advance(5.0)  # shutdown timeout: force_close on both
        said = sender_wire.value().decode()
        self.assertIn("421 4.3.2 Shutting down, message not accepted", said)
        # Nothing follows the 421: the given-up delivery's answer is not sent.
        self.assertTrue(said.endswith("message not accepted, try later\r\n"), said[-200:])
        # The transports close: the waiting client's first, then the other.
        sender.connectionLost(None)
        holder.connectionLost(None)
        harness.clock.advance(5.0)

        self.assertEqual(
            harness.provider.emails,
            [],
            "a message the client was told was not accepted reached the provider",
        )
        self.assertEqual(harness.factory.spool.budget.held, 0)


class BdatDesyncTests(SynchronousTestCase):
    def check_chunk_not_run(self, bdat_line: bytes) -> None:
        harness = Harness()
        protocol, wire = harness.connect()
        chunk = b"NOOP\r\nNOOP\r\nNOOP\r\n"
        protocol.dataReceived(START + bdat_line.replace(b"%d", b"%d" % len(chunk)) + chunk)
        after = reply_lines(wire)[4:]  # past 220, EHLO, MAIL, RCPT
        self.assertFalse(
            [line for line in after if line.startswith("250 2.0.0 OK")],
            f"chunk bytes answered as commands after {bdat_line[:30]!r}: {after}",
        )

    def test_SEC_071_unreadable_bdat_line_closes_the_connection(self) -> None:
        """Review finding 2, fixed; before the fix: a BDAT line turned down before do_BDAT runs
        (over 510 octets, a tab after the verb, malformed UTF-8, a bare CR) is answered 500/501
        and the session goes on in command mode, so the octets of its chunk are run as commands
        (the smuggling shape chunking.py closes the connection for when the size is unreadable).
        Only the reply to the BDAT line may follow it."""
        for line in (
            b"BDAT %d LAST" + b" " * 600 + b"\r\n",
            b"BDAT\t%d LAST\r\n",
            b"BDAT %d LAST \xff\r\n",
            b"BDAT %d LAST\rX\r\n",
        ):
            self.check_chunk_not_run(line)


class ImplicitTlsRefusalTests(TestCase):
    @async_test
    async def test_SEC_072_refused_smtps_connection_without_handshake_is_cut_quickly(self) -> None:
        """Review finding 3, fixed; before the fix: on an implicit-TLS listener a refused connection
        (over the caps, a banned or disallowed address) that never sends a ClientHello is kept
        for the whole CLOSE_GRACE (10 s), uncounted by any cap, while an admitted one is cut at
        the greeting timeout (here 1 s). A client over the cap can so hold any number of
        descriptors (its connection rate x 10 s), and each refusal costs a full handshake when it
        does send one; on plain SMTP the same refusal is written and closed at once. The refused
        connection must end within the greeting timeout plus a second."""
        relay = start_relay(
            self, greeting_timeout=1.0, guard=dataclasses.replace(OPEN, max_connections_per_ip=1)
        )
        port = listen_implicit(self, relay)
        extra = 20

        def client() -> tuple[int, float]:
            held = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
            refused: list[socket.socket] = []
            try:
                read_replies(held, 1)  # the one admitted session: the cap is full
                for _ in range(extra):
                    refused.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
                started = time.monotonic()
                time.sleep(2.5)
                open_now = 0
                for sock in refused:
                    sock.setblocking(False)
                    try:
                        open_now += sock.recv(1) != b""
                    except BlockingIOError:
                        open_now += 1  # nothing to read, not closed: still held
                    except ConnectionResetError:
                        pass
                return open_now, time.monotonic() - started
            finally:
                held.close()
                for sock in refused:
                    sock.close()

        sessions_before = len(relay.factory.sessions)
        self.assertEqual(sessions_before, 0)
        still_open, waited = await in_thread(client)
        self.assertGreater(waited, 2.0)
        self.assertEqual(relay.factory.guard.connections.total, 0)
        self.assertEqual(
            still_open,
            0,
            f"{still_open} of {extra} refused SMTPS connections still open after {waited:.1f} s",
        )
