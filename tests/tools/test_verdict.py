"""The probe's verdict rules, certificate checks and target parsing, without sockets."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import tls
from smtpproxy.tools import certs
from smtpproxy.tools.connect import Target, UsageError, parse_target
from smtpproxy.tools.dialogue import Reply, parse_ehlo
from smtpproxy.tools.probe import AuthReport, ProbeReport, TLSReport, judge

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def chain(hostname: str = "relay.test", made: datetime = NOW) -> list[x509.Certificate]:
    cert_pem, _ = tls.self_signed(hostname, now=made)
    return x509.load_pem_x509_certificates(cert_pem)


def good_report(**changes: object) -> ProbeReport:
    """What a healthy STARTTLS relay with a verified certificate and AUTH gives."""
    found = chain()
    report = ProbeReport(
        "relay.test:587",
        "starttls",
        greeting=Reply(220, ("relay.test ESMTP",)),
        ehlo=parse_ehlo(["relay.test", "STARTTLS", "SIZE 100"]),
        ehlo_after_tls=parse_ehlo(["relay.test", "AUTH PLAIN LOGIN", "SIZE 100"]),
        tls=TLSReport(
            "STARTTLS",
            "TLSv1.3",
            "TLS_AES_256_GCM_SHA384",
            256,
            tuple(certs.describe(c) for c in found),
            certs.verify(found, "relay.test", ca=found, ca_name="ca.pem", now=NOW),
        ),
        auth=AuthReport("PLAIN", True, "235 2.7.0 ok"),
        auth_wanted=True,
    )
    for name, value in changes.items():
        setattr(report, name, value)
    return report


class VerdictTests(SynchronousTestCase):
    def test_ok(self) -> None:
        """Everything works: OK, exit 0, and the line says TLS verified and AUTH accepted."""
        verdict = judge(good_report(), NOW)
        self.assertEqual((verdict.status, verdict.exit_code), ("OK", 0))
        self.assertIn("STARTTLS TLSv1.3", verdict.line)
        self.assertIn("AUTH PLAIN accepted", verdict.line)

    def test_failures(self) -> None:
        """A stop (no connection, STARTTLS refused...) or a refused AUTH fails, exit 1, and
        the verdict line starts with the reason."""
        stopped = judge(good_report(stopped="connect: refused"), NOW)
        self.assertEqual((stopped.status, stopped.exit_code), ("FAIL", 1))
        self.assertEqual(stopped.line, "FAIL: connect: refused")
        refused = judge(good_report(auth=AuthReport("LOGIN", False, "535 5.7.8 no")), NOW)
        self.assertEqual(refused.line, "FAIL: AUTH LOGIN failed: 535 5.7.8 no")

    def test_certificate_warnings(self) -> None:
        """A chain that does not verify, or expires within two weeks, warns (exit 3) and
        says why."""
        report = good_report()
        assert report.tls is not None
        bad = certs.Verification(False, "the system CA store", "self-signed certificate")
        unverified = judge(good_report(tls=dataclasses.replace(report.tls, verification=bad)), NOW)
        self.assertEqual((unverified.status, unverified.exit_code), ("WARN", 3))
        self.assertIn("self-signed certificate", unverified.line)
        soon = NOW + tls.SELF_SIGNED_LIFETIME - timedelta(days=3)
        self.assertIn("expires in 3 days", judge(report, soon).line)
        old = judge(good_report(tls=dataclasses.replace(report.tls, version="TLSv1")), NOW)
        self.assertIn("TLSv1 was negotiated", old.line)

    def test_clear_text_warnings(self) -> None:
        """Without TLS: AUTH offered in clear text, or no STARTTLS at all, warns."""
        plain = good_report(
            mode="plain",
            tls=None,
            ehlo_after_tls=None,
            auth=None,
            auth_wanted=False,
            ehlo=parse_ehlo(["mx.test", "AUTH LOGIN"]),
        )
        verdict = judge(plain, NOW)
        self.assertEqual(verdict.status, "WARN")
        self.assertEqual(len(verdict.warnings), 2)
        self.assertIn("AUTH is offered without TLS", verdict.warnings[0])
        self.assertIn("no STARTTLS", verdict.warnings[1])


class CertificateTests(SynchronousTestCase):
    def test_verifies_for_its_names_against_the_given_ca(self) -> None:
        """The relay's certificate verifies for each of its names and addresses when it is
        the trusted CA, and not for another name (the reason lists the names it holds)."""
        found = chain()
        for host in ("relay.test", "localhost", "127.0.0.1", "::1"):
            self.assertTrue(certs.verify(found, host, ca=found, now=NOW).ok, host)
        other = certs.verify(found, "mail.example.com", ca=found, now=NOW)
        self.assertFalse(other.ok)
        self.assertIn("relay.test, localhost, 127.0.0.1, ::1", other.reason)

    def test_untrusted_and_expired(self) -> None:
        """A self-signed certificate fails against the system store; an expired one fails
        with OpenSSL's reason even when trusted."""
        found = chain()
        system = certs.verify(found, "relay.test", now=NOW)
        self.assertFalse(system.ok)
        self.assertEqual(system.trust, "the system CA store")
        later = NOW + timedelta(days=400)
        expired = certs.verify(found, "relay.test", ca=found, now=later)
        self.assertFalse(expired.ok)
        self.assertIn("expired", expired.reason)

    def test_description(self) -> None:
        """The description names subject, issuer, SANs, key and validity."""
        info = certs.describe(chain()[0])
        self.assertEqual(info.subject, "CN=relay.test")
        self.assertEqual(info.issuer, "CN=relay.test")
        self.assertEqual(info.names, ("relay.test", "localhost", "127.0.0.1", "::1"))
        self.assertEqual(info.key, "EC secp256r1 256")
        self.assertAlmostEqual(info.days_left(NOW), 365, delta=1)


class TargetTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """HOST, HOST:PORT, [IPv6]:PORT and a bare IPv6 address; the default port is 25,
        or 465 for implicit TLS."""
        self.assertEqual(parse_target("mx.test", implicit_tls=False), Target("mx.test", 25))
        self.assertEqual(parse_target("mx.test", implicit_tls=True), Target("mx.test", 465))
        self.assertEqual(parse_target("mx.test:587", implicit_tls=True), Target("mx.test", 587))
        self.assertEqual(parse_target("[::1]:2525", implicit_tls=False), Target("::1", 2525))
        self.assertEqual(parse_target("2001:db8::1", implicit_tls=False).port, 25)
        self.assertEqual(str(Target("::1", 25)), "[::1]:25")

    def test_refused(self) -> None:
        """No host, a port out of range or not a number: a usage error naming the input."""
        for text in ("", ":25", "mx.test:0", "mx.test:65536", "mx.test:smtp", "[::1"):
            with self.assertRaises(UsageError):
                parse_target(text, implicit_tls=False)
