"""No message can stall the relay while it is parsed (issue 9: H1, H2, M1).

Each attack was a message whose parse held the reactor for tens of
seconds, during which no other session got so much as a greeting.  The
offline tests check that the parser now reads them in linear time (the
bounds are generous: the old code took 20 to 40 times longer); the wire
tests check what a client sees, with a real relay on loopback: a probe
session is greeted promptly while the hostile message is being parsed, and
a parse that runs past its budget is abandoned, the message delivered raw
or refused with 554 5.6.0.
"""

from __future__ import annotations

import io
import socket
import threading
import time

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from smtpproxy import delivery
from smtpproxy.delivery import RelayMessage
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import Email, abandoned, parse_message
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers.graph.payload import MimeSend, plan_delivery
from smtpproxy.providers.stdout import StdoutProvider
from smtpproxy.spool import MessageBody
from tests.support import (
    TIMEOUT,
    RecordingProvider,
    async_test,
    in_thread,
    read_replies,
    start_relay,
)


def h1_message(spaces: int) -> bytes:
    """H1: a field of blanks ending in a bare CR (the old field pattern backtracked)."""
    return b"From: a@example.com\r\nX:" + b" " * spaces + b"\rY\r\n\r\nbody\r\n"


def h2_message(run: int) -> bytes:
    """H2: an angle-bracketed run without '@' (the old salvage pattern was quadratic)."""
    return b"From: a@example.com\r\nTo: <" + b"a" * run + b">\r\n\r\nbody\r\n"


def multipart(parts: list[bytes]) -> bytes:
    """A multipart/mixed message with the given parts (headers and body each)."""
    head = b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    return head + b"".join(b"--b\r\n" + part + b"\r\n" for part in parts) + b"--b--\r\n"


def m1_message(parts: int, semicolons: int) -> bytes:
    """M1: parts whose MIME headers are long runs of empty parameters."""
    part = (
        b"Content-Type: text/plain" + b";" * semicolons + b"\r\n"
        b"Content-Disposition: attachment" + b";" * semicolons + b"\r\n\r\nhello"
    )
    return multipart([part] * parts)


def slow_message(parts: int) -> bytes:
    """Linear but slow to parse: the most expensive MIME headers within every limit.

    Each part costs the standard library some 20 ms, so the whole message
    takes seconds however linear the rest of the parser is: only slicing
    and the budget keep the relay responsive.
    """
    value = b"; x=" + b"a " * 1900
    part = b"Content-Type: text/plain" + value + b"\r\nContent-Disposition: attachment" + value
    return multipart([part + b"\r\n\r\nhello"] * parts)


class OfflineTests(SynchronousTestCase):
    """The hostile messages parse in time linear in their size, without a reactor."""

    def assert_quick(self, raw: bytes, bound: float) -> None:
        started = time.process_time()  # CPU time: a busy machine does not fail this
        email = parse_message("a@example.com", ["b@example.com"], raw)
        elapsed = time.process_time() - started
        self.assertIs(email.raw, raw)
        self.assertLess(elapsed, bound, f"{len(raw)} bytes took {elapsed:.2f} s")

    def test_SEC_033_blank_run_before_bare_cr(self) -> None:
        """H1: 20 KB of blanks then a bare CR in a header parses in under 1 s (was 22 s)."""
        self.assert_quick(h1_message(20_000), 1.0)

    def test_SEC_034_long_address_without_at(self) -> None:
        """H2: a To header of 160,000 characters without '@' parses in under 1 s (was 36 s)."""
        raw = h2_message(160_000)
        self.assert_quick(raw, 1.0)
        email = parse_message("a@example.com", ["b@example.com"], raw)
        self.assertEqual(email.to, ())

    def test_SEC_069_runs_of_comments_in_mime_headers(self) -> None:
        """1,000 parts whose MIME headers hold 300 comments each parse in under 2 s.

        Found by the property tests after issue 9's fixes: the standard
        library re-reads a value for every comment, so this message took 13 s
        (and 75 ms for one 4 KB header, a step too long for the reactor).
        Such headers are kept as raw bytes with a warning, like runs of ';'.
        """
        run = "(a)" * 300
        part = f"Content-Type: text/plain; {run}\r\nContent-Disposition: attachment; {run}"
        body = "".join(f"--p\r\n{part}\r\n\r\nb\r\n" for _ in range(1000))
        raw = f"Content-Type: multipart/mixed; boundary=p\r\n\r\n{body}--p--\r\n".encode()
        self.assert_quick(raw, 2.0)
        email = parse_message("a@example.com", ["b@example.com"], raw)
        self.assertEqual(len(email.attachments), 1000)
        self.assertTrue(any("comments" in warning for warning in email.warnings))

    def test_SEC_035_runs_of_empty_mime_parameters(self) -> None:
        """M1: 150 parts with 8 KB (and 4 KB) of semicolons per MIME header: under 2 s each.

        The attack's 8 KB took 36 s; 4 KB, under the length limit, took 8 s.
        The parts are kept as raw bytes with a warning each, not dropped.
        """
        for semicolons in (8000, 4000):
            raw = m1_message(150, semicolons)
            self.assert_quick(raw, 2.0)
            email = parse_message("a@example.com", ["b@example.com"], raw)
            self.assertEqual(len(email.attachments), 150)
            self.assertIn("kept as raw bytes", email.warnings[0])


def capture_delivery_log(case: SynchronousTestCase) -> list[LogEvent]:
    """Send the delivery module's log events to a list for the rest of the test.

    Also keeps them from trial's own observer, which mistakes an event with
    a C{warning} field (one per message warning) for a Python warning.
    """
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    case.patch(delivery, "log", Logger(namespace="smtpproxy.delivery", observer=observe))
    return events


def _probe_greeting(port: int) -> float:
    """Seconds from connecting until the whole 220 greeting has arrived."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        greeting = read_replies(sock, 1)
        sock.sendall(b"QUIT\r\n")
    assert greeting and greeting[0].startswith("220"), greeting
    return time.perf_counter() - started


def _attack_and_probe(port: int, raw: bytes) -> tuple[str, float]:
    """Send C{raw} as a message; once the final dot is out, time a probe's greeting.

    Returns the reply to the message and the probe's wait.  Blocking.
    """
    sent = threading.Event()
    probe: list[float] = []

    def probe_when_sent() -> None:
        sent.wait(TIMEOUT)
        time.sleep(0.05)  # let the relay start parsing
        probe.append(_probe_greeting(port))

    prober = threading.Thread(target=probe_when_sent)
    prober.start()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO attacker\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        read_replies(sock, 3)
        sock.sendall(b"DATA\r\n")
        read_replies(sock, 1)
        sock.sendall(raw + b".\r\n")
        sent.set()
        reply = read_replies(sock, 1)
        sock.sendall(b"QUIT\r\n")
    prober.join(120)
    return (reply[0] if reply else ""), probe[0]


class WireTests(TestCase):
    """A real relay on loopback keeps greeting other clients during a hostile parse."""

    def setUp(self) -> None:
        self.events = capture_delivery_log(self)

    @async_test
    async def test_SEC_036_probe_greeted_during_hostile_parse(self) -> None:
        """H1 over SMTP: a probe connecting meanwhile is greeted within 2 s (was 12.5 s+)."""
        relay = start_relay(self, tls_enabled=False)
        reply, waited = await in_thread(_attack_and_probe, relay.port, h1_message(20_000))
        self.assertTrue(reply.startswith("250"), reply)
        self.assertLess(waited, 2.0)
        self.assertEqual(len(relay.provider.emails), 1)

    @async_test
    async def test_SEC_037_long_parse_sliced_and_abandoned_raw(self) -> None:
        """A parse of many seconds is sliced (probe greeted within 2 s) and given up at its budget.

        With a 1 s budget and a provider that sends raw MIME, the message is
        delivered as its raw bytes, marked abandoned.
        """
        provider = RecordingProvider(accepts_raw_mime=True)
        from twisted.internet import reactor

        parser = MessageParser(reactor, timeout=1.0)
        relay = start_relay(self, tls_enabled=False, provider=provider, parser=parser)
        raw = slow_message(300)
        reply, waited = await in_thread(_attack_and_probe, relay.port, raw)
        self.assertTrue(reply.startswith("250"), reply)
        self.assertLess(waited, 2.0)
        [email] = provider.emails
        self.assertTrue(email.abandoned)
        self.assertEqual(email.raw, raw)
        self.assertIn("parsing abandoned", email.warnings[0])
        [logged] = [e for e in self.events if e["log_format"] == "message parse abandoned"]
        self.assertEqual(logged["outcome"], "sent raw")

    @async_test
    async def test_SEC_038_abandoned_parse_refused_without_raw_provider(self) -> None:
        """An abandoned parse with a provider that needs the parse is answered 554 5.6.0."""
        from twisted.internet import reactor

        parser = MessageParser(reactor, timeout=0.0, slice_seconds=0.0)
        relay = start_relay(self, tls_enabled=False, parser=parser)
        reply, _ = await in_thread(_attack_and_probe, relay.port, slow_message(2))
        self.assertTrue(reply.startswith("554 5.6.0"), reply)
        self.assertEqual(relay.provider.emails, [])
        [logged] = [e for e in self.events if e["log_format"] == "message parse abandoned"]
        self.assertEqual(logged["outcome"], "rejected")


class AbandonedDeliveryTests(SynchronousTestCase):
    """What becomes of a message whose parse ran out of time, driven by a Clock."""

    def test_SEC_039_abandoned_parse_printed_raw_by_stdout(self) -> None:
        """The stdout provider takes an abandoned parse: envelope, size, warning; no body."""
        capture_delivery_log(self)
        clock = Clock()
        stream = io.StringIO()
        parser = MessageParser(clock, timeout=5.0, slice_seconds=0.0)
        message = RelayMessage(
            StdoutProvider(stream),
            clock,
            "a@example.com",
            ["b@example.com"],
            "c",
            None,
            parser=parser,
        )
        raw = multipart([b"Content-Type: text/plain\r\n\r\nsecret body text"] * 3)
        body = MessageBody()
        body.write(raw)
        message.bodyReceived(body)
        delivered = message.eomReceived()
        self.assertNoResult(delivered)
        clock.advance(6.0)  # past the budget before the next slice runs
        self.assertEqual(self.successResultOf(delivered), message.id)
        printed = stream.getvalue()
        self.assertIn("Envelope-To: <b@example.com>", printed)
        self.assertIn("parsing abandoned", printed)
        self.assertNotIn("secret body text", printed)


class GraphRawPlanTests(SynchronousTestCase):
    """Graph sends an abandoned parse as raw MIME only, or refuses it for good."""

    def abandoned(self, to: str = "b@example.com") -> Email:
        raw = f"From: a@example.com\r\nTo: {to}\r\n\r\nbody\r\n".encode()
        return abandoned("a@example.com", ["b@example.com"], raw, "test")

    def test_mime_when_allowed(self) -> None:
        """In auto and mime modes the raw bytes go as one MIME request."""
        for mode in ("auto", "mime"):
            plan = plan_delivery(self.abandoned(), ["relay@example.com"], mode)
            self.assertIsInstance(plan, MimeSend)

    def test_refused_otherwise(self) -> None:
        """JSON mode, or To/Cc naming people outside the envelope: 554 5.6.0, no JSON attempt."""
        for email, mode in ((self.abandoned(), "json"), (self.abandoned("x@example.net"), "auto")):
            with self.assertRaises(PermanentDeliveryError) as raised:
                plan_delivery(email, ["relay@example.com"], mode)
            self.assertEqual((raised.exception.code, raised.exception.status), (554, "5.6.0"))
