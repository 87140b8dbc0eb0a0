"""Security regression suite: stdout output, YAML settings and the PROXY header.

Each test is named for its control in docs/security.md (SEC-060 to SEC-069).
The stdout and PROXY tests run over real loopback sockets with real clients;
the configuration tests call the pure loader, as startup does.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import cast

from twisted.internet import defer
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.config import Config, ConfigError, load
from smtpproxy.mime.message import Attachment, Email, Mailbox, parse_message
from smtpproxy.providers.stdout import StdoutProvider, render
from tests.support import (
    RecordingProvider,
    async_test,
    in_thread,
    listen_behind_proxy,
    sendmail,
    start_relay,
    until_ehlo_reply,
)


@dataclass
class PrintingProvider(RecordingProvider):
    """Records each message and prints it with the real stdout provider into C{stream}."""

    stream: io.StringIO = field(default_factory=io.StringIO)

    def send(self, email: Email) -> defer.Deferred[None]:
        super().send(email)
        return StdoutProvider(self.stream).send(email)


# What an attacker would put in a body to make the output show a second
# message: the old separators and rule, this format's frame with a guessed
# marker, and header lines of the summary.
FORGED_BODY = (
    "Hello, see below.\r\n"
    "========================================================================\r\n"
    "----- end 0123456789abcdef -----\r\n"
    "----- smtpproxy message 0123456789abcdef -----\r\n"
    "From: ceo@example.com\r\n"
    "To: finance@example.com\r\n"
    "Envelope-From: <ceo@example.com>\r\n"
    "Subject: Wire the money today\r\n"
    "------------------------------------------------------------------------\r\n"
    "Please pay invoice 42.\r\n"
    "========================================================================\r\n"
)
OPENING = re.compile(r"----- smtpproxy message ([0-9a-f]{16}) -----\Z")


class StdoutOutputTests(TestCase):
    """L4: what the stdout provider prints cannot be forged by the message it prints."""

    @async_test
    async def test_SEC_060_forged_body_stays_inside_one_frame(self) -> None:
        """A body holding separator lines and summary header lines, sent over SMTP, prints
        as exactly one framed message: one opening and one closing line with the same
        fresh marker, one From: line (the real one), and no line of the body unprefixed."""
        provider = PrintingProvider()
        relay = start_relay(self, provider=provider)
        data = (
            "From: app@example.com\r\nTo: b@example.org\r\nSubject: report\r\n\r\n" + FORGED_BODY
        ).encode()
        await in_thread(sendmail, relay.port, "app@example.com", ["b@example.org"], data)
        lines = provider.stream.getvalue().splitlines()

        openings = [match.group(1) for line in lines if (match := OPENING.match(line))]
        self.assertEqual(len(openings), 1, lines)
        marker = openings[0]
        self.assertNotEqual(marker, "0123456789abcdef")
        self.assertEqual(
            (lines[0], lines[-1]),
            (f"----- smtpproxy message {marker} -----", f"----- end {marker} -----"),
        )
        self.assertEqual(sum(marker in line for line in lines), 2)
        self.assertEqual(
            [line for line in lines if line.startswith("From:")], ["From: app@example.com"]
        )
        self.assertEqual(
            [line for line in lines if line.startswith("Subject:")], ["Subject: report"]
        )
        for body_line in FORGED_BODY.split("\r\n"):
            if body_line:
                self.assertNotIn(body_line, lines)
                self.assertIn("| " + body_line, lines)

    def test_SEC_061_terminal_controls_neutralised_everywhere(self) -> None:
        """Escape sequences, carriage returns, C1 controls, Unicode line separators and bidi
        overrides in the subject, display names, file names, content types and body never
        reach the output: no reader's splitlines() and no terminal sees a break or a
        control that the relay did not write."""
        nasty = "x\x1b[2J\r\x9b31m\u2028From: evil\u2029\u202etxt.exe\u2066y"
        email = Email(
            envelope_from="a@example.com",
            envelope_to=("b@example.org",),
            raw=b"",
            from_=(Mailbox(nasty, "a@example.com"),),
            to=(Mailbox("", "b@example.org"),),
            subject=nasty,
            message_id=nasty,
            date=nasty,
            text=nasty,
            attachments=(Attachment(nasty, nasty, b"data"),),
            warnings=(nasty,),
        )
        block = render(email)
        for character in "\x1b\r\x9b\u2028\u2029\u202e\u2066":
            self.assertNotIn(character, block)
        lines = block.split("\n")[:-1]
        self.assertEqual(block.splitlines(), lines)
        self.assertEqual([line for line in lines if line.startswith("From:")], [lines[1]])

    def test_SEC_062_json_lines_valid_for_any_input(self) -> None:
        """STDOUT_FORMAT=json: a message with undecodable bytes, line breaks and escape
        sequences in its headers and body is one line of strict, ASCII-only JSON."""
        raw = (
            b"From: =?utf-8?b?/w==?= <a@example.com>\r\nSubject: caf\xe9\r\n \x1b[2J\r\n"
            b'Content-Type: text/plain; charset=utf-8\r\n\r\nline\xff\xfe\r\n{"forged": 1}\r\n'
        )
        email = parse_message("a@example.com", ["b@example.org"], raw)
        email = Email(
            envelope_from=email.envelope_from,
            envelope_to=email.envelope_to,
            raw=email.raw,
            from_=email.from_,
            subject=email.subject + "\udcff",  # a lone surrogate, as surrogateescape makes
            text=email.text,
        )
        stream = io.BytesIO()
        wrapper = io.TextIOWrapper(stream, encoding="ascii")
        self.successResultOf(StdoutProvider(wrapper, output_format="json").send(email))
        output = stream.getvalue()
        self.assertEqual(output.count(b"\n"), 1)
        record = json.loads(output.decode("ascii"))
        self.assertEqual(record["envelope"], {"from": "a@example.com", "to": ["b@example.org"]})
        self.assertTrue(record["headers"]["subject"].endswith("\ufffd"))
        self.assertIn('{"forged": 1}', record["text"]["excerpt"])


def _load(yaml_text: str) -> Config:
    return load({}, yaml_text, yaml_source="smtpproxy.yaml", fqdn=lambda: "host.example")


class YamlCoercionTests(SynchronousTestCase):
    """L5: a text setting is what the operator wrote, or start-up stops."""

    def test_SEC_063_coerced_yaml_text_refused(self) -> None:
        """Unquoted values that YAML turns into a number (012345, 12:30:00), a boolean (yes)
        or a date (2026-01-01) are refused for text settings with one line naming the
        setting and asking for quotes, never silently converted; quoted they are kept
        verbatim; the environment is text already."""
        cases = {
            "smtp:\n  username: app\n  password: 012345\n": "SMTP_PASSWORD",
            "smtp:\n  hostname: 12:30:00\n": "SMTP_HOSTNAME",
            "smtp:\n  username: yes\n  password: pw\n": "SMTP_USERNAME",
            "smtp:\n  hostname: 2026-01-01\n": "SMTP_HOSTNAME",
        }
        for yaml_text, setting in cases.items():
            with self.assertRaises(ConfigError, msg=yaml_text) as caught:
                _load(yaml_text)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"{setting}: smtpproxy.yaml line "), message)
            self.assertIn("put it in quotes", message)
            self.assertNotIn("\n", message)
            self.assertNotIn("5349", message)
        config = _load(
            "smtp:\n  username: 'yes'\n  password: \"012345\"\n  hostname: '2026-01-01'\n"
        )
        self.assertEqual(
            (config.smtp_username, config.smtp_password, config.smtp_hostname),
            ("yes", "012345", "2026-01-01"),
        )
        self.assertEqual(
            _load("smtp:\n  username: u\n  password: '12:30:00'\n").smtp_password, "12:30:00"
        )
        env = {"SMTP_USERNAME": "yes", "SMTP_PASSWORD": "012345"}
        config = load(env, fqdn=lambda: "host.example")
        self.assertEqual((config.smtp_username, config.smtp_password), ("yes", "012345"))


class ProxyHeaderTests(TestCase):
    """I3: a bad PROXY header ends the connection cleanly; PROXY UNKNOWN is served."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def assertNothingSevere(self) -> None:
        severe = [
            event
            for event in self.events
            if event.get("log_level") in (LogLevel.error, LogLevel.critical)
            or "log_failure" in event
        ]
        self.assertEqual(severe, [])

    def proxy_warnings(self) -> list[LogEvent]:
        return [
            event
            for event in self.events
            if event.get("log_namespace") == "smtpproxy.proxyheader"
            and event.get("log_level") == LogLevel.warn
        ]

    @async_test
    async def test_SEC_064_non_utf8_header_closed_cleanly(self) -> None:
        """A v1 header with bytes that are not UTF-8 gets no greeting and no session; the
        relay logs one warning naming the real peer and nothing at error or critical level
        (no traceback)."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)
        header = b"PROXY TCP4 \xff\xfe\xfd.0.0.1 127.0.0.1 40000 2525\r\nEHLO c\r\n"
        self.assertEqual(await in_thread(until_ehlo_reply, port, header), b"")
        self.assertEqual(relay.factory.sessions, set())
        self.assertNothingSevere()
        [warning] = self.proxy_warnings()
        self.assertIn("127.0.0.1", warning["peer"])

    @async_test
    async def test_SEC_065_proxy_unknown_is_greeted_with_the_peer_address(self) -> None:
        """PROXY UNKNOWN (a balancer's health check), bare or with trailing fields, is a
        valid v1 header: the session starts and uses the connection's own address."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)
        for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ::1 ::1 1 2\r\n"):
            reply = (await in_thread(until_ehlo_reply, port, header + b"EHLO c\r\n")).decode()
            self.assertTrue(reply.startswith("220 relay.test"), reply)
            self.assertIn("[127.0.0.1]", reply)
        self.assertNothingSevere()
        self.assertEqual(self.proxy_warnings(), [])

    @async_test
    async def test_SEC_066_malformed_or_oversize_header_closed_cleanly(self) -> None:
        """Headers with a port that is not a number, a host that is not an address, too
        many fields, or no end within the v1 limit are each closed unheard, with no
        error-level log line; none becomes a session.  Each distinct reason is logged
        once: a repeat from the same address is only counted (SEC-056)."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)
        headers = [
            b"PROXY TCP4 203.0.113.9 127.0.0.1 port 2525\r\n",
            b"PROXY TCP4 evil.example 127.0.0.1 40000 2525\r\n",
            b"PROXY TCP6 203.0.113.9 ::1 40000 2525\r\n",
            b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 2525 extra\r\n",
            b"PROXY TCP4 " + b"9" * 200 + b"\r\n",
        ]
        for header in headers:
            received = await in_thread(until_ehlo_reply, port, header + b"EHLO c\r\n")
            self.assertEqual(received, b"", header)
        self.assertEqual(relay.factory.sessions, set())
        self.assertNothingSevere()
        warnings = self.proxy_warnings()
        reasons = {event["log_format"] for event in warnings}
        self.assertGreaterEqual(len(reasons), 3)
        self.assertEqual(len(warnings), len(reasons))
