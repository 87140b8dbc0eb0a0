"""L{smtpproxy.delivery}: which delivery events are logged, and the message ids.

At log levels above info the "message delivered" event would only be built
for the filter to drop it, so the realm can be told not to emit it; the
events that matter at warn (a provider refusing or failing) must still be
emitted.  The sessions run over a L{StringTransport} on a L{Clock}; the log
events are caught from the global publisher, before any level filter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, cast

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import providers, tap
from smtpproxy.delivery import RelayRealm, new_message_id
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.policy.guard import Guard
from smtpproxy.providers.result import PartlyRefused, RecipientRefusal
from smtpproxy.smtp.factory import RelayFactory
from tests.support import OPEN, RecordingProvider, session_defaults

TRANSACTION = (
    b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    b"Subject: logged?\r\n\r\nHello.\r\n.\r\n"
)


def send_one(portal: Portal) -> bytes:
    """Run one SMTP transaction through C{portal}'s realm; return what the server wrote."""
    clock = Clock()
    guard = Guard(dataclasses.replace(OPEN, auth_enabled=False), clock)
    factory = RelayFactory(session_defaults(), portal, None, clock, guard)
    session = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
    session.makeConnection(transport)
    session.dataReceived(TRANSACTION)
    session.connectionLost(None)
    written: bytes = transport.value()
    return written


def portal_for(provider: providers.Provider, **realm_options: Any) -> Portal:
    portal = Portal(RelayRealm(provider, Clock(), **realm_options))
    portal.registerChecker(AllowAnonymousAccess())
    return portal


class _EventsCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def named(self, text: str) -> list[LogEvent]:
        """The events from smtpproxy.delivery whose message is C{text}."""
        return [
            event
            for event in self.events
            if event.get("log_namespace") == "smtpproxy.delivery"
            and event.get("log_format") == text
        ]


class DeliveredEventTests(_EventsCase):
    def test_logged_by_default(self) -> None:
        """By default each delivery logs "message delivered" with the id given in the 250."""
        written = send_one(portal_for(RecordingProvider()))
        [event] = self.named("message delivered")
        self.assertIn(f"250 2.0.0 OK: delivered as {event['id']}\r\n".encode(), written)

    def test_not_logged_when_turned_off(self) -> None:
        """log_delivered=False: the message is delivered, and no event is built for it."""
        provider = RecordingProvider()
        written = send_one(portal_for(provider, log_delivered=False))
        self.assertEqual(len(provider.emails), 1)
        self.assertIn(b"250 2.0.0 OK: delivered as ", written)
        self.assertEqual(self.named("message delivered"), [])

    def test_refusal_still_logged_when_turned_off(self) -> None:
        """A provider refusing a message is still a warning with log_delivered=False."""
        provider = RecordingProvider(outcomes=[TransientDeliveryError("mailbox busy")])
        written = send_one(portal_for(provider, log_delivered=False))
        self.assertIn(b"\r\n451 ", written)
        [event] = self.named("message not delivered")
        self.assertEqual(event["outcome"], "deferred")
        self.assertEqual(event["reason"], "mailbox busy")
        self.assertEqual(self.named("message delivered"), [])

    def test_provider_failure_still_logged_when_turned_off(self) -> None:
        """A provider failing unexpectedly is still logged with its traceback."""
        provider = RecordingProvider(outcomes=[RuntimeError("provider bug")])
        written = send_one(portal_for(provider, log_delivered=False))
        self.assertIn(b"\r\n451 4.3.0", written)
        [event] = self.named("provider failed unexpectedly")
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PartlyRefusingProvider:
    """Takes the message for every recipient but C{busy@example.org}, refused with 450."""

    name = "partly"

    def send(self, email: Email) -> defer.Deferred[PartlyRefused | None]:
        refusal = RecipientRefusal("busy@example.org", 450, "4.2.1", "Mailbox busy")
        return defer.succeed(PartlyRefused(("b@example.org",), (refusal,)))

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class PartlyRefusedDirectTests(_EventsCase):
    def test_client_hears_250_and_the_refusal_is_an_error_line(self) -> None:
        """Direct mode: the message went to the accepted recipient, so the client hears
        250 (a 451 would make it send again to those who have it); the refused
        recipient, which nothing will retry without a queue, is named at error level
        with the upstream's reply."""
        written = send_one(portal_for(PartlyRefusingProvider()))
        self.assertIn(b"250 2.0.0 OK: delivered as ", written)
        [event] = self.named("recipients refused and not retried (no queue)")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["refused"], ["<busy@example.org> 450 4.2.1 Mailbox busy"])
        self.assertEqual((event["accepted"], event["temporary"]), (1, 1))
        [delivered] = self.named("message delivered")
        self.assertEqual(delivered["outcome"], "partly delivered")


class TapLogLevelTests(_EventsCase):
    def delivered_events_at(self, level: str) -> int:
        """Build the service as twistd does at LOG_LEVEL=C{level}; count delivered events."""
        provider = RecordingProvider()
        self.patch(providers, "create", lambda name, settings, reactor: provider)
        options = tap.Options(
            environ={
                "LOG_LEVEL": level,
                "SMTP_LISTEN": "127.0.0.1:2525",
                "HTTP_LISTEN": "",
                "SMTP_HOSTNAME": "relay.test",
            }
        )
        options.parseOptions([])
        service = tap.makeService(options)
        self.events.clear()
        send_one(service.factory.portal)
        self.assertEqual(len(provider.emails), 1)
        return len(self.named("message delivered"))

    def test_deliveries_logged_at_info_and_debug(self) -> None:
        """At info and debug, where the event would be shown, it is emitted."""
        self.assertEqual(self.delivered_events_at("info"), 1)
        self.assertEqual(self.delivered_events_at("debug"), 1)

    def test_deliveries_not_logged_at_warn_and_error(self) -> None:
        """At warn and error, where it would be filtered out, it is not built at all."""
        self.assertEqual(self.delivered_events_at("warn"), 0)
        self.assertEqual(self.delivered_events_at("error"), 0)


class MessageIdTests(SynchronousTestCase):
    def test_shape_and_uniqueness(self) -> None:
        """Ids are 12 lowercase hex digits (leading zeros kept), and 10,000 are all distinct."""
        ids = [new_message_id() for _ in range(10_000)]
        for message_id in ids:
            self.assertTrue(re.fullmatch("[0-9a-f]{12}", message_id), message_id)
        self.assertEqual(len(set(ids)), len(ids))
