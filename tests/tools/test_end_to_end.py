"""`smtpproxy probe`, `send` and `doctor` as real processes against real servers.

The relay is the real `twistd smtpproxy` (tests.test_twistd.Relay) with its
certificate in files, implicit TLS on SMTPS_LISTEN and AUTH on; the tools
run as `python -m smtpproxy.cli`, as an operator runs them, and what they
print is read back as JSON.  The byte-exact delivery test listens with the
relay's factory in this process so the stored bytes can be hashed; the
doctor runs against the Graph fake over loopback HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy import tls
from tests.fakegraph import FakeGraph, client_certificate
from tests.support import PASSWORD, USER, in_thread, start_relay
from tests.test_twistd import Relay, base_env, free_port, json_lines

reactor: Any = _reactor
RELAY_USER = "tools-user"
RELAY_PASSWORD = "Tööls-pa55 word"  # a space and UTF-8: a file's line, taken whole


def tool(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> tuple[int, str, str]:
    """Run `python -m smtpproxy.cli ARGS` to completion; (status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "smtpproxy.cli", *args],
        env=env or base_env(),
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def tool_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    status, out, err = tool(*args, "--json", env=env)
    try:
        document = json.loads(out)
    except ValueError:
        raise AssertionError(f"not JSON (status {status}):\n{out}\n{err}") from None
    assert isinstance(document, dict)
    return status, document


def write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class FilesMixin:
    """A directory with the relay's certificate, key and the password file."""

    def files(self, case: SynchronousTestCase) -> tuple[str, str, str, str]:
        directory = os.path.abspath(case.mktemp())
        os.makedirs(directory)
        cert, key = tls.self_signed("relay.test")
        return (
            directory,
            write(directory, "cert.pem", cert),
            write(directory, "key.pem", key),
            write(directory, "password", RELAY_PASSWORD.encode() + b"\n"),
        )


class ProbeTwistdTests(FilesMixin, TestCase):
    def test_probe_the_relay(self) -> None:
        """Against `twistd smtpproxy`: STARTTLS and implicit TLS both verify against the
        relay's certificate given as --ca-file, AUTH PLAIN succeeds with the password from a
        file (OK, exit 0); a wrong password is FAIL (exit 1); without --ca-file the
        self-signed certificate is WARN (exit 3); --tls on the STARTTLS port is FAIL."""
        directory, cert, key, password = self.files(self)
        smtps = free_port()
        relay = Relay(
            self,
            SMTPS_LISTEN=f"127.0.0.1:{smtps}",
            TLS_CERT_FILE=cert,
            TLS_KEY_FILE=key,
            SMTP_USERNAME=RELAY_USER,
            SMTP_PASSWORD=RELAY_PASSWORD,
        )
        relay.wait_listening()
        auth = ["--user", RELAY_USER, "--password-file", password, "--ca-file", cert]
        port = f"127.0.0.1:{relay.smtp_port}"

        status, starttls = tool_json("probe", port, "--starttls", *auth)
        self.assertEqual(status, 0, starttls["verdict"])
        self.assertEqual(starttls["verdict"]["status"], "OK")
        self.assertTrue(starttls["ehlo"]["starttls"])
        self.assertEqual(starttls["ehlo"]["auth"], [])  # AUTH only inside TLS
        self.assertEqual(starttls["ehlo_after_tls"]["auth"], ["PLAIN", "LOGIN"])
        for flag in ("pipelining", "smtputf8", "chunking", "8bitmime", "dsn"):
            self.assertTrue(starttls["ehlo_after_tls"][flag], flag)
        self.assertEqual(starttls["ehlo_after_tls"]["size"], 26_214_400)
        self.assertIn(starttls["tls"]["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(starttls["tls"]["verified"])
        self.assertEqual(starttls["tls"]["chain"][0]["subject"], "CN=relay.test")
        self.assertEqual(starttls["auth"]["mechanism"], "PLAIN")
        self.assertTrue(starttls["auth"]["reply"].startswith("235"))
        steps = [step["step"] for step in starttls["steps"]]
        self.assertEqual(
            steps, ["connect", "greeting", "ehlo", "starttls", "tls", "ehlo", "auth", "quit"]
        )
        self.assertTrue(all(step["ms"] >= 0 for step in starttls["steps"]))
        shown = json.dumps(starttls)
        self.assertNotIn("pa55", shown)

        status, implicit = tool_json("probe", f"127.0.0.1:{smtps}", "--tls", *auth)
        self.assertEqual(status, 0, implicit["verdict"])
        self.assertEqual(implicit["tls"]["how"], "implicit TLS")
        self.assertEqual([s["step"] for s in implicit["steps"]][:3], ["connect", "tls", "greeting"])

        wrong = write(directory, "wrong", b"not it\n")
        status, refused = tool_json(
            "probe", port, "--starttls", "--user", RELAY_USER, "--password-file", wrong
        )
        self.assertEqual(status, 1)
        self.assertTrue(refused["verdict"]["line"].startswith("FAIL: AUTH PLAIN failed: 535"))

        status, out, _ = tool("probe", port, "--starttls")
        self.assertEqual(status, 3, out)
        last = out.splitlines()[-1]
        self.assertTrue(last.startswith("WARN: the certificate does not verify"), last)
        self.assertIn("self-signed", last)

        status, out, _ = tool("probe", port, "--tls", "--timeout", "5")
        self.assertEqual(status, 1, out)
        self.assertIn("TLS handshake failed", out.splitlines()[-1])

    def test_password_never_from_argv(self) -> None:
        """There is no --password option; --user without a password file and without a
        terminal is a usage error (exit 2), not an empty password."""
        status, _, err = tool("probe", "127.0.0.1:9", "--password", "x")
        self.assertEqual(status, 2)
        self.assertIn("unrecognized arguments", err)
        status, _, err = tool("probe", "127.0.0.1:9", "--user", "u")
        self.assertEqual(status, 2)
        self.assertIn("--password-file", err)


BODY = "Hello,\n.a line starting with a dot\n.\n..two dots\n...\nthe end.\n"


class SendTwistdTests(FilesMixin, TestCase):
    def test_send_to_ten_recipients_with_attachments(self) -> None:
        """`smtpproxy send` over STARTTLS with AUTH delivers one message to 10 recipients
        (To, Cc and Bcc) in one transaction; the relay's stdout shows the envelope, the
        body with every dot line as written, each attachment with its SHA-256 and type, and
        the message's size as the sender counted it."""
        directory, cert, key, password = self.files(self)
        relay = Relay(
            self,
            TLS_CERT_FILE=cert,
            TLS_KEY_FILE=key,
            SMTP_USERNAME=RELAY_USER,
            SMTP_PASSWORD=RELAY_PASSWORD,
            STDOUT_FORMAT="json",
        )
        relay.wait_listening()
        attachments = {
            "blob.bin": os.urandom(100_000),
            "notes.txt": b"plain text\n.dotted\n",
            "report.pdf": b"%PDF-1.4\n" + os.urandom(5000),
        }
        paths = [write(directory, name, data) for name, data in attachments.items()]
        body_file = write(directory, "body.txt", BODY.encode())
        to = [f"to{i}@example.org" for i in range(4)]
        cc = [f"cc{i}@example.org" for i in range(3)]
        bcc = [f"bcc{i}@example.net" for i in range(3)]
        args = ["send", "--server", f"127.0.0.1:{relay.smtp_port}", "--starttls"]
        args += ["--ca-file", cert, "--user", RELAY_USER, "--password-file", password]
        args += ["--from", "Tools Test <tools@example.com>", "--subject", "Zehn Empfänger"]
        args += ["--body-file", body_file]
        for option, addresses in (("--to", to), ("--cc", cc), ("--bcc", bcc)):
            for address in addresses:
                args += [option, address]
        for path in paths:
            args += ["--attach", path]
        status, sent = tool_json(*args)
        out, err = relay.stop()
        self.assertEqual(status, 0, sent)
        self.assertEqual(sent["status"], "sent")
        self.assertEqual(sent["result"]["accepted"], 10)
        self.assertEqual([r["code"] for r in sent["recipients"]], [250] * 10)
        commands = [line["line"] for line in sent["transcript"] if line["from"] == "C"]
        self.assertEqual(sum(1 for c in commands if c.startswith("MAIL FROM")), 1)
        self.assertEqual(sum(1 for c in commands if c.startswith("RCPT TO")), 10)
        self.assertNotIn("pa55", json.dumps(sent))
        [record] = [r for r in json_lines(out) if "envelope" in r]
        self.assertEqual(record["envelope"]["from"], "tools@example.com")
        self.assertEqual(record["envelope"]["to"], to + cc + bcc)
        self.assertEqual(record["headers"]["subject"], "Zehn Empfänger")
        self.assertEqual(record["headers"]["message_id"], sent["message_id"])
        self.assertEqual(record["headers"]["bcc"], [])
        self.assertEqual(record["size"], sent["size"])
        self.assertEqual(record["text"]["excerpt"].replace("\r\n", "\n"), BODY)
        kinds = {
            "blob.bin": "application/octet-stream",
            "notes.txt": "text/plain",
            "report.pdf": "application/pdf",
        }
        self.assertEqual(
            sorted((a["filename"], a["content_type"], a["sha256"]) for a in record["attachments"]),
            sorted(
                (name, kinds[name], hashlib.sha256(data).hexdigest())
                for name, data in attachments.items()
            ),
        )
        self.assertNotIn(b"pa55", err)


class SendExactBytesTests(TestCase):
    async def test_bytes_arrive_exactly(self) -> None:
        """What the relay stores is byte for byte the message `smtpproxy send` built
        (its SHA-256 and size), for a body of dot lines with one on the 16 KiB boundary
        where Twisted's stock stuffing would miss it."""
        relay = start_relay(self, auth=True)
        directory = self.mktemp()
        os.makedirs(directory)
        password = write(directory, "password", PASSWORD.encode() + b"\n")
        filler = "x" * 70 + "\n"
        body = filler * 250 + ".\n" + (".dot\n" + filler) * 200 + ".\n"
        body_file = write(directory, "body.txt", body.encode())
        blob = write(directory, "blob.bin", os.urandom(50_000))
        args = ["send", "--server", f"127.0.0.1:{relay.port}", "--starttls", "--no-verify"]
        args += ["--user", USER, "--password-file", password, "--from", "a@example.com"]
        args += ["--to", "b@example.org", "--body-file", body_file, "--attach", blob]
        status, sent = await in_thread(tool_json, *args)
        self.assertEqual(status, 0, sent)
        [email] = relay.provider.emails
        self.assertEqual(len(email.raw), sent["size"])
        self.assertEqual(hashlib.sha256(email.raw).hexdigest(), sent["sha256"])
        self.assertEqual((email.text or "").replace("\r\n", "\n"), body)


class DoctorGraphTests(FilesMixin, TestCase):
    def setUp(self) -> None:
        self.fake = FakeGraph(
            reactor, mailboxes=("relay@contoso.example", "alerts@contoso.example")
        )
        port = self.fake.listen(reactor)
        self.addCleanup(port.stopListening)

    def env(self, secret: str, cert: str, key: str) -> dict[str, str]:
        return base_env(
            SMTP_LISTEN=f"127.0.0.1:{free_port()}",
            HTTP_LISTEN=f"127.0.0.1:{free_port()}",
            SMTP_HOSTNAME="relay.test",
            TLS_CERT_FILE=cert,
            TLS_KEY_FILE=key,
            GRAPH_TENANT_ID=self.fake.tenant,
            GRAPH_CLIENT_ID=self.fake.client_id,
            GRAPH_CLIENT_SECRET=secret,
            GRAPH_SENDER="relay@contoso.example,alerts@contoso.example",
            GRAPH_AUTHORITY_HOST=self.fake.endpoint,
            GRAPH_ENDPOINT=self.fake.endpoint,
        )

    async def test_good_credential_and_send_test(self) -> None:
        """With the right secret every check passes (exit 0): both listen addresses bind,
        the certificate loads and names SMTP_HOSTNAME, a token is obtained, and each
        GRAPH_SENDER mailbox sends one test message that Graph accepts."""
        _, cert, key, _ = self.files(self)
        assert self.fake.client_secret is not None
        env = self.env(self.fake.client_secret, cert, key)
        status, report = await in_thread(
            tool_json, "doctor", "--send-test-to", "ops@example.org", env=env
        )
        self.assertEqual(status, 0, report)
        self.assertEqual(report["status"], "OK")
        checks = [(c["check"], c["status"]) for c in report["checks"]]
        self.assertEqual(
            checks,
            [
                ("settings", "PASS"),
                ("listen", "PASS"),
                ("listen", "PASS"),
                ("certificate", "PASS"),
                ("queue", "SKIP"),
                ("graph token", "PASS"),
                ("graph send", "PASS"),
                ("graph send", "PASS"),
            ],
        )
        self.assertEqual(
            sorted(d.mailbox for d in self.fake.deliveries),
            ["alerts@contoso.example", "relay@contoso.example"],
        )
        self.assertTrue(all(d.recipients == ("ops@example.org",) for d in self.fake.deliveries))
        self.assertEqual(self.fake.violations, [])
        self.assertNotIn(self.fake.client_secret, json.dumps(report))

    async def test_broken_secret(self) -> None:
        """A wrong secret fails the token check with Entra's hint (exit 1); the send test
        is skipped, nothing is delivered, and the secret is not printed."""
        _, cert, key, _ = self.files(self)
        env = self.env("not-the-secret", cert, key)
        status, out, _ = await in_thread(
            tool, "doctor", "--send-test-to", "ops@example.org", env=env
        )
        self.assertEqual(status, 1, out)
        self.assertIn("FAIL  graph token", out)
        self.assertIn("AADSTS7000215", out)
        self.assertIn("GRAPH_CLIENT_SECRET is wrong", out)
        self.assertIn("SKIP  graph send", out)
        self.assertTrue(out.splitlines()[-1].startswith("FAIL: 1 of "), out)
        self.assertEqual(self.fake.deliveries, [])
        self.assertNotIn("not-the-secret", out)

    async def test_certificate_near_its_end(self) -> None:
        """GRAPH_CLIENT_CERTIFICATE_FILE whose certificate ends in five days: Entra still
        issues a token (PASS), and the doctor warns with the date and thumbprint (exit 3)."""
        _, cert, key, _ = self.files(self)
        pem, registered = client_certificate("doctor", valid_days=5)
        fake = FakeGraph(
            reactor,
            mailboxes=("relay@contoso.example",),
            certificate=registered,
            client_secret=None,
        )
        port = fake.listen(reactor)
        self.addCleanup(port.stopListening)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(pem)
        env = self.env("unused", cert, key)
        del env["GRAPH_CLIENT_SECRET"]
        env.update(
            GRAPH_CLIENT_CERTIFICATE_FILE=path,
            GRAPH_SENDER="relay@contoso.example",
            GRAPH_AUTHORITY_HOST=fake.endpoint,
            GRAPH_ENDPOINT=fake.endpoint,
        )
        status, report = await in_thread(tool_json, "doctor", env=env)
        checks = {(c["check"], c["status"]): c["detail"] for c in report["checks"]}
        self.assertIn(("graph token", "PASS"), checks, report)
        warning = checks[("graph credential", "WARN")]
        self.assertIn("expires on", warning)
        self.assertRegex(warning, r"in [45] days")
        self.assertEqual((status, report["status"]), (3, "WARN"), report)

    async def test_listen_address_taken(self) -> None:
        """A listen address already in use fails the listen check and says so."""
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        env = base_env(SMTP_LISTEN=f"127.0.0.1:{taken.getHost().port}", HTTP_LISTEN="")
        status, out, _ = await in_thread(tool, "doctor", env=env)
        self.assertEqual(status, 1, out)
        self.assertIn("FAIL  listen", out)
        self.assertIn("in use", out)
