"""A Graph client certificate near or past its end is announced, not found out by failed mail."""

from __future__ import annotations

from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.providers.graph.credentials import (
    CERTIFICATE_WARNING_DAYS,
    ClientSecret,
    credential_warning,
    expiry_warning,
    load_certificate,
)
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from tests.fakegraph import FakeGraph, client_certificate

DAY = 86400.0


class ExpiryWarningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(client_certificate()[0])
        self.certificate = load_certificate(self.path, None)
        self.end = self.certificate.not_after

    def test_far_from_its_end(self) -> None:
        """More than the warning period left: nothing to say."""
        now = self.end - (CERTIFICATE_WARNING_DAYS + 1) * DAY
        self.assertIsNone(expiry_warning(self.certificate, now))

    def test_near_its_end(self) -> None:
        """Within the warning period: the date, the days left and the thumbprint the Entra
        portal lists, so the operator knows which upload to replace."""
        warning = expiry_warning(self.certificate, self.end - 10 * DAY)
        assert warning is not None
        self.assertIn("in 10 days", warning)
        self.assertIn(self.certificate.sha1_hex, warning)
        self.assertRegex(warning, r"expires on \d{4}-\d\d-\d\d")

    def test_past_its_end(self) -> None:
        """Expired: said plainly, with what Entra will do about it."""
        warning = expiry_warning(self.certificate, self.end + DAY)
        assert warning is not None
        self.assertIn("expired on", warning)
        self.assertIn("Entra refuses", warning)

    def test_only_certificates_have_an_end_the_relay_knows(self) -> None:
        """A client secret has no date the relay can read: no warning, whatever the time."""
        secret = ClientSecret("c-1", "s" * 40, "http://login.test/token", "scope")
        self.assertIsNone(credential_warning(secret, 4_000_000_000.0))


def _provider(clock: Clock, path: str) -> GraphProvider:
    fake = FakeGraph(clock, mailboxes=("relay@contoso.example",))
    config = Config.build(
        graph_tenant_id=fake.tenant,
        graph_client_id=fake.client_id,
        graph_client_certificate_file=path,
        graph_sender=("relay@contoso.example",),
        graph_authority_host="http://login.test",
        graph_endpoint="http://graph.test",
    )
    return GraphProvider(config, clock, cast(HTTPRequester, StubTreq(fake.resource)))


class StartUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(client_certificate()[0])
        self.end = load_certificate(self.path, None).not_after
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def attention(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_format") == "Graph credential needs attention"]

    def test_expired_certificate_is_a_warning_at_start(self) -> None:
        """The provider starts (a certificate renewed in place is read at the next token
        request) but says at warn level that the one it has is expired."""
        clock = Clock()
        clock.advance(self.end + DAY)
        _provider(clock, self.path)
        (warned,) = self.attention()
        self.assertEqual(warned["log_level"].name, "warn")
        self.assertIn("expired on", warned["problem"])

    def test_valid_certificate_is_not(self) -> None:
        """A year left: the start-up log has no such line."""
        clock = Clock()
        clock.advance(self.end - 300 * DAY)
        _provider(clock, self.path)
        self.assertEqual(self.attention(), [])
