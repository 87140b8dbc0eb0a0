"""`smtpproxy probe` and `send` against a real Postfix smtpd (a private instance).

The relay is one server; Postfix is the reference implementation most
operators compare with, so the tools are shown to read its EHLO reply,
negotiate its STARTTLS with a certificate they verify, and deliver to it.
Skips with the reason when Postfix cannot run here (.ci/run installs it).
"""

from __future__ import annotations

from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy import tls
from tests.postfix import PrivatePostfix, missing
from tests.test_twistd import free_port
from tests.tools.test_end_to_end import tool, tool_json, write

# A receiving smtpd that offers STARTTLS with a self-signed certificate.
PROBED_LINES = (
    "mynetworks = 127.0.0.0/8",
    "smtputf8_enable = yes",
    "smtpd_tls_security_level = may",
    "smtpd_tls_cert_file = $config_directory/cert.pem",
    "smtpd_tls_key_file = $config_directory/key.pem",
)


class PostfixProbeTests(TestCase):
    def test_probe_and_send_to_postfix(self) -> None:
        """Postfix's smtpd on loopback: the probe parses its capabilities, negotiates
        STARTTLS and verifies its certificate (OK, exit 0); `send` over STARTTLS with a
        body of dot lines and two recipients gets Postfix's 250 (exit 0)."""
        why_not = missing()
        if why_not is not None:
            raise SkipTest(why_not)
        port = free_port()
        cert, key = tls.self_signed("postfix.test")
        postfix = PrivatePostfix(PROBED_LINES, port=port, files={"cert.pem": cert, "key.pem": key})
        self.addCleanup(postfix.stop)
        postfix.start()
        ca = str(postfix.conf / "cert.pem")

        status, report = tool_json("probe", f"127.0.0.1:{port}", "--starttls", "--ca-file", ca)
        self.assertEqual(status, 0, report["verdict"])
        self.assertEqual(report["greeting"]["lines"][0].split()[0], "postfix.test")
        before = report["ehlo"]
        self.assertTrue(before["starttls"])
        for flag in ("pipelining", "8bitmime", "dsn", "smtputf8", "chunking"):
            self.assertTrue(before[flag], flag)
        self.assertEqual(before["size"], 10_240_000)  # Postfix's message_size_limit default
        self.assertFalse(report["ehlo_after_tls"]["starttls"])
        self.assertTrue(report["tls"]["verified"])
        self.assertEqual(report["tls"]["chain"][0]["subject"], "CN=postfix.test")

        body = write(str(postfix.base), "body.txt", b"one\n.\n..two\n.three\n")
        status, out, err = tool(
            "send",
            "--server",
            f"127.0.0.1:{port}",
            "--starttls",
            "--ca-file",
            ca,
            "--from",
            "tools@example.com",
            "--to",
            "a@example.org",
            "--cc",
            "b@example.org",
            "--body-file",
            body,
        )
        self.assertEqual(status, 0, out + err + postfix.log())
        self.assertIn("queued as", out.splitlines()[-1])
