"""The provider against a scripted upstream on real loopback sockets.

Each test makes the upstream answer one way (refusing recipients, failing
temporarily, offering or withholding STARTTLS, PIPELINING, SIZE) and checks
what the provider sent and what our client would be told.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import cast

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.mail.smtp import ESMTPClient
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    reply_for_failure,
)
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import PartlyRefused, RecipientRefusal, SendCancelledError
from smtpproxy.providers.smtp.client import RelayClient
from smtpproxy.providers.smtp.provider import SmtpProvider
from smtpproxy.providers.smtp.trust import client_tls
from tests.providers.smtp.upstream import Script, authority, listen, port_of, relay_settings
from tests.support import async_test

RAW = b"From: a@example.com\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


def message(*recipients: str, raw: bytes = RAW) -> Email:
    return Email("a@example.com", recipients or ("b@example.org",), raw)


class Case(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def logged(self, text: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_format") == text]

    async def upstream(
        self, script: Script, implicit: bool = False, **settings: object
    ) -> SmtpProvider:
        port = await listen(script, script.starttls if implicit else None)
        self.addCleanup(port.stopListening)
        provider = SmtpProvider(relay_settings(port_of(port), **settings), reactor)
        self.addCleanup(provider.close)
        return provider

    async def failure_of(self, d: defer.Deferred[PartlyRefused | None]) -> DeliveryError:
        try:
            await d
        except DeliveryError as e:
            return e
        self.fail("delivery did not fail")

    def ca_file(self, pem: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(pem)
        return str(path)


class TransactionTests(Case):
    @async_test
    async def test_pipelined_and_reused(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA leave in one write; three messages share
        one connection with RSET before each reused transaction; the body arrives unchanged."""
        script = Script()
        provider = await self.upstream(script)
        for _ in range(3):
            await provider.send(message("b@example.org", "c@example.org"))
        self.assertEqual(script.connections, 1)
        self.assertEqual(script.bodies, [RAW] * 3)
        groups = [p for p in script.packets if p.startswith((b"MAIL", b"RSET"))]
        self.assertEqual(len(groups), 3)
        self.assertEqual(groups[0].count(b"\r\n"), 4)  # MAIL, 2 RCPT, DATA
        self.assertTrue(groups[1].startswith(b"RSET\r\nMAIL FROM:<a@example.com>"))
        self.assertIn(b"SIZE=", groups[0])

    @async_test
    async def test_without_pipelining_one_command_at_a_time(self) -> None:
        """Without PIPELINING each command waits for the reply to the one before."""
        script = Script(capabilities=["8BITMIME"])
        provider = await self.upstream(script)
        await provider.send(message("b@example.org", "c@example.org"))
        commands = [p for p in script.packets if p[:4] in (b"MAIL", b"RCPT", b"DATA")]
        self.assertEqual(len(commands), 4)
        self.assertEqual(script.bodies, [RAW])

    @async_test
    async def test_some_recipients_refused(self) -> None:
        """For a caller that retries recipients one by one (the queue), refused
        recipients are logged with the upstream's reply, and send fires with them, each
        with its reply (the caller decides what they are owed); the others get the
        message.  (Direct mode: tests/providers/smtp/test_partial_direct.py.)"""

        def rcpt(address: str) -> str:
            if address.startswith("gone"):
                return "550 5.1.1 <x>: unknown"
            if address.startswith("busy"):
                return "450 Mailbox busy"
            return "250 2.1.5 Ok"

        provider = await self.upstream(script := Script(rcpt=rcpt))
        email = message("b@example.org", "gone@example.org", "busy@example.org")
        result = await provider.send(dataclasses.replace(email, per_recipient_retry=True))
        self.assertEqual(
            result,
            PartlyRefused(
                ("b@example.org",),
                (
                    RecipientRefusal("gone@example.org", 550, "5.1.1", "<x>: unknown"),
                    RecipientRefusal("busy@example.org", 450, "", "Mailbox busy"),
                ),
            ),
        )
        assert result is not None
        self.assertEqual([r.permanent for r in result.refused], [True, False])
        self.assertEqual(result.refused[1].reply, "450 Mailbox busy")
        self.assertEqual(script.bodies, [RAW])
        [event] = self.logged("upstream refused some recipients")
        self.assertEqual(event["accepted"], 1)
        self.assertEqual(
            event["refused"],
            ["<gone@example.org> 550 5.1.1 <x>: unknown", "<busy@example.org> 450 Mailbox busy"],
        )

    @async_test
    async def test_all_recipients_refused(self) -> None:
        """Every recipient refused: no body sent, and our client hears the upstream's 550."""
        script = Script(rcpt=lambda a: "550 5.1.1 mailbox unavailable")
        provider = await self.upstream(script)
        error = await self.failure_of(provider.send(message()))
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertIn("mailbox unavailable", reply.text)
        self.assertEqual(script.bodies, [])

    @async_test
    async def test_temporary_failure_after_the_body(self) -> None:
        """A 4xx after the body becomes our 451 with the upstream's status and text; the next
        message on the same connection still goes through."""
        script = Script(final="452 4.3.1 Insufficient system storage")
        provider = await self.upstream(script)
        error = await self.failure_of(provider.send(message()))
        self.assertIsInstance(error, TransientDeliveryError)
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (451, "4.3.1"))
        self.assertIn("Insufficient system storage", reply.text)
        script.final = "250 2.0.0 Ok"
        await provider.send(message())
        self.assertEqual(script.connections, 1)

    @async_test
    async def test_over_size_never_sent(self) -> None:
        """A message over the upstream's SIZE is refused 552 without a MAIL command."""
        script = Script(capabilities=["PIPELINING", "SIZE 100"])
        provider = await self.upstream(script)
        error = await self.failure_of(provider.send(message(raw=b"x" * 200 + b"\r\n")))
        self.assertIsInstance(error, PermanentDeliveryError)
        self.assertEqual(reply_for_failure(error).code, 552)
        self.assertFalse([c for c in script.commands if c.startswith(b"MAIL")])

    @async_test
    async def test_pool_is_bounded(self) -> None:
        """Ten messages at once over at most two connections, all delivered."""
        script = Script()
        provider = await self.upstream(script, max_connections=2)
        await defer.gatherResults([provider.send(message()) for _ in range(10)])
        self.assertEqual(len(script.bodies), 10)
        self.assertLessEqual(script.connections, 2)

    @async_test
    async def test_connection_dropped_while_idle(self) -> None:
        """An idle connection the upstream closes is forgotten; the next message opens another."""
        script = Script()
        provider = await self.upstream(script)
        await provider.send(message())
        [client] = provider.pool._idle
        client[0].transport.loseConnection()  # type: ignore[union-attr]
        await deferLater(reactor, 0.1, lambda: None)
        await provider.send(message())
        self.assertEqual((script.connections, len(script.bodies)), (2, 2))

    @async_test
    async def test_greeting_timeout(self) -> None:
        """An upstream that never greets is a temporary failure naming what was awaited."""
        script = Script(greeting="")
        provider = await self.upstream(script, timeout=0.3)
        error = await self.failure_of(provider.send(message()))
        self.assertIsInstance(error, TransientDeliveryError)
        self.assertIn("greeting", error.reason)


class TlsTests(Case):
    @async_test
    async def test_starttls_verified_and_login(self) -> None:
        """STARTTLS against the test CA, then AUTH PLAIN: the message arrives."""
        ca = authority()
        script = Script(starttls=ca.server_options(), login=("app", "s3cret"))
        provider = await self.upstream(
            script,
            tls="starttls",
            ca_file=self.ca_file(ca.ca_pem),
            username="app",
            password="s3cret",
        )
        await provider.send(message())
        self.assertEqual(script.bodies, [RAW])
        self.assertIn(b"STARTTLS", script.commands)

    @async_test
    async def test_refused_login_is_tried_once(self) -> None:
        """Defect: Twisted answers a refused AUTH PLAIN with a second attempt.  Here one
        attempt, and our client hears a temporary failure (the operator's settings are wrong,
        not the message)."""
        ca = authority()
        script = Script(starttls=ca.server_options(), login=("app", "right"))
        provider = await self.upstream(
            script,
            tls="starttls",
            ca_file=self.ca_file(ca.ca_pem),
            username="app",
            password="wrong",
        )
        error = await self.failure_of(provider.send(message()))
        self.assertIsInstance(error, TransientDeliveryError)
        self.assertEqual(error.status, "4.7.8")
        self.assertEqual(len([c for c in script.commands if c.startswith(b"AUTH")]), 1)
        self.assertFalse([c for c in script.commands if c.startswith(b"MAIL")])

    @async_test
    async def test_starttls_required(self) -> None:
        """RELAY_TLS=starttls and an upstream without STARTTLS: temporary failure, nothing sent
        in the clear."""
        script = Script()
        provider = await self.upstream(script, tls="starttls", tls_verify=False)
        error = await self.failure_of(provider.send(message()))
        self.assertIsInstance(error, TransientDeliveryError)
        self.assertIn("STARTTLS", error.reason)
        self.assertFalse([c for c in script.commands if c.startswith(b"MAIL")])

    @async_test
    async def test_implicit_tls(self) -> None:
        """RELAY_TLS=implicit: TLS from the first byte, verified against the test CA."""
        ca = authority()
        script = Script(starttls=ca.server_options())
        provider = await self.upstream(
            script, implicit=True, tls="implicit", ca_file=self.ca_file(ca.ca_pem)
        )
        await provider.send(message())
        self.assertEqual(script.bodies, [RAW])
        self.assertNotIn(b"STARTTLS", script.commands)

    @async_test
    async def test_untrusted_certificate(self) -> None:
        """A certificate from another CA: temporary failure (4.7.5) and a log line saying so."""
        script = Script(starttls=authority().server_options())
        provider = await self.upstream(
            script, tls="starttls", ca_file=self.ca_file(authority().ca_pem)
        )
        error = await self.failure_of(provider.send(message()))
        self.assertIsInstance(error, TransientDeliveryError)
        self.assertEqual(error.status, "4.7.5")
        [event] = self.logged("upstream TLS certificate not accepted")
        self.assertIn("certificate verify failed", event["problem"])
        self.assertFalse([c for c in script.commands if c.startswith(b"MAIL")])

    @async_test
    async def test_wrong_name(self) -> None:
        """A trusted certificate for another name: refused, the log line names the mismatch."""
        ca = authority(names=("other.test",))
        script = Script(starttls=ca.server_options())
        provider = await self.upstream(script, tls="starttls", ca_file=self.ca_file(ca.ca_pem))
        error = await self.failure_of(provider.send(message()))
        self.assertEqual(error.status, "4.7.5")
        [event] = self.logged("upstream TLS certificate not accepted")
        self.assertIn("does not match", event["problem"])

    @async_test
    async def test_unverified_when_asked(self) -> None:
        """RELAY_TLS_VERIFY=false: any certificate, encrypted anyway, and a warning at start."""
        script = Script(starttls=authority(names=("other.test",)).server_options())
        provider = await self.upstream(script, tls="starttls", tls_verify=False)
        await provider.send(message())
        self.assertEqual(len(script.bodies), 1)
        self.assertTrue(self.logged("upstream certificate not checked"))


class LogTests(SynchronousTestCase):
    def test_no_session_log(self) -> None:
        """Defect: Twisted's client logs every line it sends (AUTH included) and prints that
        log in its errors; ours keeps none."""
        stock = ESMTPClient(b"secret", None, b"relay.test")
        stock.makeConnection(StringTransport())
        stock.sendLine(b"AUTH PLAIN AGFwcABzM2NyZXQ=")
        self.assertIn(b"AUTH PLAIN", stock.log.str())
        ours = RelayClient("relay.test", "app", "s3cret", None, False, 10.0)
        ours.ready.addErrback(lambda failure: None)  # the session ends before it was ready
        ours.makeConnection(StringTransport())
        ours.sendLine(b"AUTH PLAIN AGFwcABzM2NyZXQ=")
        ours.connectionLost()
        self.assertNotIn(b"AUTH", ours.log.str())

    def test_bad_ca_file_refused_at_start(self) -> None:
        """An unreadable CA file stops the provider from being built (not every message)."""
        from smtpproxy.config import ConfigError

        settings = relay_settings(25, tls="starttls", ca_file="/nonexistent/ca.pem")
        self.assertRaises(ConfigError, client_tls, settings)


class CancelTests(Case):
    async def cancel_when(
        self, script: Script, ready: Callable[[], bool]
    ) -> tuple[SmtpProvider, BaseException]:
        """Send one message, cancel the send once C{ready()}; the provider and the error."""
        provider = await self.upstream(script)
        sending = provider.send(message())
        for _ in range(200):
            if ready():
                break
            await deferLater(reactor, 0.01, lambda: None)
        sending.cancel()
        try:
            await sending
        except BaseException as e:
            return provider, e
        self.fail("the cancelled send succeeded")

    @async_test
    async def test_cancelled_before_the_body_sends_nothing(self) -> None:
        """The upstream is slow to answer DATA: cancelling the send cuts the transaction
        before the body leaves, says nothing was handed over, and the upstream, even once
        it answers, never gets the message; the provider is not left with a half-done
        session (a new message goes through on a fresh connection)."""
        script = Script(data_delay=0.5)
        provider, error = await self.cancel_when(script, lambda: b"DATA" in script.commands)
        self.assertIsInstance(error, SendCancelledError)
        assert isinstance(error, SendCancelledError)
        self.assertFalse(error.handed_over)
        await deferLater(reactor, 0.7, lambda: None)
        self.assertEqual(script.bodies, [])
        script.data_delay = 0.0
        self.assertIsNone(await provider.send(message()))
        self.assertEqual((len(script.bodies), script.connections), (1, 2))

    @async_test
    async def test_cancelled_after_the_body_is_unknown(self) -> None:
        """The upstream has the whole body and answers late: cancelling then says the
        message was handed over (it may be delivered)."""
        script = Script(final_delay=0.5)
        _, error = await self.cancel_when(script, lambda: bool(script.bodies))
        self.assertIsInstance(error, SendCancelledError)
        assert isinstance(error, SendCancelledError)
        self.assertTrue(error.handed_over)
