"""Operator tools: what they must never do with the secrets they are given.

Each test is named for its control in docs/security.md (SEC-116, SEC-117):
C{smtpproxy doctor} checks the upstream SMTP server with C{RELAY_PASSWORD},
so it must not hand that password to a server whose certificate does not
verify, and must not print it.  The upstream is a private Postfix
(tests/postfix.py) with AUTH checked by a Dovecot-protocol socket that
records every attempt.
"""

from __future__ import annotations

from tests.providers.smtp.upstream import authority
from tests.support import in_thread
from tests.tools.test_doctor_checks import UPSTREAM_PASSWORD, UPSTREAM_USER, UpstreamFixture
from tests.tools.test_end_to_end import tool, tool_json, write


class DoctorUpstreamSecretTests(UpstreamFixture):
    async def test_SEC_116_unverified_upstream_gets_no_password(self) -> None:
        """A RELAY_CA_FILE that did not issue Postfix's certificate: the TLS check fails
        naming OpenSSL's verification problem (exit 1), and AUTH is not tried, so the
        password never reached the unverified server."""
        postfix, auth, _ = await self.upstream()
        other = write(self.directory, "other-ca.pem", authority().ca_pem)
        status, report = await in_thread(
            tool_json, "doctor", env=self.env(postfix, other, UPSTREAM_PASSWORD)
        )
        self.assertEqual(status, 1, report)
        found = dict((c["check"], (c["status"], c["detail"])) for c in report["checks"])
        self.assertEqual(found["upstream"][0], "PASS")
        self.assertEqual(found["upstream tls"][0], "FAIL")
        # Both test CAs have the same name, so OpenSSL finds the issuer by name
        # and then the signature does not match; a CA of another name would be
        # "unable to get local issuer certificate".
        self.assertIn(
            f"does not verify against RELAY_CA_FILE {other}: the chain does not verify: "
            "certificate signature failure",
            found["upstream tls"][1],
        )
        self.assertNotIn("upstream auth", found)
        self.assertEqual(auth.attempts, [])
        self.assertTrue(report["line"].startswith("FAIL: 1 of "), report["line"])

    async def test_SEC_117_upstream_password_never_printed(self) -> None:
        """A wrong RELAY_PASSWORD: TLS passes, AUTH fails with Postfix's 535 reply (exit 1);
        neither password is printed."""
        postfix, auth, ca_file = await self.upstream()
        status, out, _ = await in_thread(
            tool, "doctor", env=self.env(postfix, ca_file, "not the password")
        )
        self.assertEqual(status, 1, out)
        self.assertIn("PASS  upstream tls", out)
        self.assertIn(f"FAIL  upstream auth AUTH PLAIN as {UPSTREAM_USER} refused: 535", out)
        self.assertEqual(auth.attempts, [UPSTREAM_USER])
        self.assertNotIn("not the password", out)
        self.assertNotIn(UPSTREAM_PASSWORD, out)
