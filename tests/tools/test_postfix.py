"""`smtpproxy probe` and `send` against a real Postfix smtpd (a private instance).

The relay is one server; Postfix is the reference implementation most
operators compare with, so the tools are shown to read its EHLO reply,
negotiate its STARTTLS with a certificate they verify, and deliver to it.
Skips with the reason when Postfix cannot run here (.ci/run installs it).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy import tls
from tests.test_real_clients import POSTFIX_MASTER_CF, PostfixInstance, postfix_missing
from tests.test_twistd import free_port
from tests.tools.test_end_to_end import tool, tool_json, write

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {base}/conf
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
mynetworks = 127.0.0.0/8
smtputf8_enable = yes
smtpd_tls_security_level = may
smtpd_tls_cert_file = {base}/cert.pem
smtpd_tls_key_file = {base}/key.pem
"""


class PostfixProbeTests(TestCase):
    def test_probe_and_send_to_postfix(self) -> None:
        """Postfix's smtpd on loopback: the probe parses its capabilities, negotiates
        STARTTLS and verifies its certificate (OK, exit 0); `send` over STARTTLS with a
        body of dot lines and two recipients gets Postfix's 250 (exit 0)."""
        why_not = postfix_missing()
        if why_not is not None:
            raise SkipTest(why_not)
        port = free_port()
        postfix = PostfixInstance(port)
        self.addCleanup(postfix.stop)
        cert, key = tls.self_signed("postfix.test")
        write(str(postfix.base), "cert.pem", cert)
        write(str(postfix.base), "key.pem", key)
        os.chmod(postfix.base / "key.pem", 0o600)
        (postfix.conf / "main.cf").write_text(MAIN_CF.format(base=postfix.base))
        (postfix.conf / "master.cf").write_text(
            POSTFIX_MASTER_CF + f"127.0.0.1:{port} inet n - n - - smtpd\n"
        )
        postfix.start()
        ca = str(postfix.base / "cert.pem")

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
