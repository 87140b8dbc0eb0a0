"""Unmodified mail clients against the relay as an operator runs it.

Each test drives one real client program through STARTTLS and AUTH into a
C{twistd smtpproxy} process (the stdout provider, printing JSON) and then
reads what the relay printed:

- Postfix as a relayhost client, in a private instance the test builds and
  starts: the set-up of docs/clients.md (the two settings nobody wrote down,
  TLS connection reuse through C{tlsproxy}), a cron-like message with a raw
  UTF-8 subject and an 8-bit body for 100 recipients;
- msmtp, as a sendmail replacement configured by file;
- curl (C{smtp://} with C{--ssl-reqd}) and swaks (C{--tls --pipeline}), as
  scripts use them;
- nodemailer, as a Node.js application sending an attachment.

One relay serves all of them (it is started by the first test that needs it
and killed when the test process exits); the tests stay independent because
each finds its own message by a marker in the subject.  A test whose program
is missing skips and names the package; C{.ci/run} installs all of them.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests import postfix as private
from tests.support import PASSWORD, USER, async_test, in_thread
from tests.test_twistd import ROOT, TWISTD, base_env, free_port

CLIENTS = ROOT / "tests" / "clients"

# Upper bounds: a client run, Postfix's delivery of all recipients, and how
# long the relay may take to print a message a client was told was accepted.
CLIENT_TIMEOUT = 60
DELIVERY_TIMEOUT = 60
RECORD_TIMEOUT = 10


# --- the shared relay ----------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the test process dies.

    The relay outlives a single test on purpose; this keeps it from outliving
    a test run that was killed before its C{atexit} hook could run.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


class SharedRelay:
    """One C{twistd smtpproxy} for this module: AUTH required, JSON on stdout.

    Its stdout and stderr go to files in a directory under trial's working
    directory, so they are there to read after a failed run.
    """

    _current: SharedRelay | None = None

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="real-clients-relay-", dir=os.getcwd()))
        self.stdout = self.workdir / "stdout.jsonl"
        self.stderr = self.workdir / "stderr.jsonl"
        env = base_env(
            SMTP_LISTEN=f"127.0.0.1:{self.port}",
            HTTP_LISTEN="",
            SMTP_HOSTNAME="relay.test",
            SMTP_USERNAME=USER,
            SMTP_PASSWORD=PASSWORD,
            STDOUT_FORMAT="json",
        )
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy"],
                env=env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        atexit.register(self.kill)

    @classmethod
    def get(cls) -> SharedRelay:
        """The module's relay, started on first use; a relay that died fails the test."""
        if cls._current is None:
            cls._current = cls()
        relay = cls._current
        if relay.process.poll() is not None:
            raise AssertionError(f"the shared relay exited:\n{relay.log_tail()}")
        return relay

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=CLIENT_TIMEOUT)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr.read_text(errors="replace").splitlines()[-lines:])

    def wait_listening(self) -> None:
        """Poll until the relay greets (bounded); blocking, run in a thread."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"relay did not start:\n{self.log_tail()}")

    def printed(self, marker: str, count: int = 1) -> list[dict[str, Any]]:
        """The JSON records whose subject holds C{marker}, once C{count} are there.

        Blocking and bounded: returns what is there after L{RECORD_TIMEOUT}.
        """
        deadline = time.monotonic() + RECORD_TIMEOUT
        while True:
            found = []
            for line in self.stdout.read_bytes().splitlines(keepends=True):
                if line.endswith(b"\n") and line.strip():
                    record = json.loads(line)
                    if marker in (record["headers"]["subject"] or ""):
                        found.append(record)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise SkipTest(f"{', '.join(missing)} not installed (.ci/run installs it)")


def marker() -> str:
    return uuid.uuid4().hex[:10]


Sent = tuple[subprocess.CompletedProcess[bytes], list[dict[str, Any]]]


async def send_with(
    relay: SharedRelay, tag: str, command: list[str], stdin: bytes = b"", **options: Any
) -> Sent:
    """Run one client program against the relay (bounded) and return how it ended
    and what the relay printed for C{tag} (nothing when the client failed)."""

    def scenario() -> Sent:
        relay.wait_listening()
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
            **options,
        )
        return result, relay.printed(tag) if result.returncode == 0 else []

    sent: Sent = await in_thread(scenario)
    return sent


# --- Postfix as a relayhost client ---------------------------------------------

# The lines docs/clients.md tells an operator to add to main.cf for a relayhost
# that needs STARTTLS and AUTH; test_docs_show_the_tested_settings keeps the
# page and this list in step.  127.0.0.1 stands for the relay's host name.
POSTFIX_RELAY_SETTINGS = (
    "smtp_tls_security_level = encrypt",
    "smtp_sasl_auth_enable = yes",
    "smtp_sasl_security_options = noanonymous",
    "smtp_tls_connection_reuse = yes",
)


# A private instance (tests/postfix.py): no listening socket (mail comes in
# through sendmail/postdrop as from cron) and a relayhost.  The extra smtp_*
# lines make the connection reuse deterministic for the test: one delivery at
# a time, and every connection to the relay kept for the next one.
def postfix_main_cf(base: str, port: str, user: str, password: str) -> str:
    """main.cf for an instance living in C{base} that relays to 127.0.0.1:C{port}."""
    return private.main_cf(base, "postfix.test", relayhost_lines(port, user, password))


def relayhost_lines(port: str, user: str, password: str) -> list[str]:
    """The main.cf lines, after the common ones, of a relayhost client of the relay."""
    return [
        "myorigin = $myhostname",
        f"relayhost = [127.0.0.1]:{port}",
        *POSTFIX_RELAY_SETTINGS,
        f"smtp_sasl_password_maps = static:{user}:{password}",
        "smtp_tls_loglevel = 1",
        "smtp_destination_concurrency_limit = 1",
        "smtp_connection_cache_destinations = 127.0.0.1",
        "smtp_connection_cache_time_limit = 10s",
    ]


def postfix_missing() -> str | None:
    """Why a private relayhost client cannot run here, or None."""
    return private.missing(("postfix", "postqueue", "sendmail"), sasl=True)


class PostfixInstance(private.PrivatePostfix):
    """A relayhost client of the relay on C{relay_port}, stopped by the test's cleanup."""

    def __init__(self, relay_port: int) -> None:
        super().__init__(relayhost_lines(str(relay_port), USER, PASSWORD))

    def wait_sent(self, count: int) -> list[str]:
        """The maillog's C{status=sent} lines once there are C{count} (bounded).

        Stops early when Postfix gives up on a recipient or defers it: the
        relay does not retry, so a deferral here is a failure.
        """
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while True:
            lines = self.log().splitlines()
            sent = [line for line in lines if "status=sent" in line]
            trouble = [
                line for line in lines if "status=deferred" in line or "status=bounced" in line
            ]
            if len(sent) >= count or trouble or time.monotonic() > deadline:
                return sent
            time.sleep(0.1)


class PostfixRelayhostTests(TestCase):
    timeout = 180

    @async_test
    async def test_postfix_relays_a_cron_message_to_100_recipients(self) -> None:
        """Postfix with the documented relayhost settings delivers a cron-style message.

        The message has a raw UTF-8 subject (Postfix flags it SMTPUTF8), an
        8-bit body and 100 envelope recipients.  The relay requires AUTH, so
        delivery proves Postfix authenticated with PLAIN inside TLS
        (C{smtp_sasl_security_options = noanonymous}).  Postfix splits the
        recipients into two transactions of 50; its log shows
        C{status=sent} via the relay for each of the 100, and the second
        transaction reused the first one's TLS connection through
        C{tlsproxy}.  The relay printed both transactions with the subject
        and body unchanged and, together, exactly the 100 recipients.
        """
        why_not = postfix_missing()
        if why_not:
            raise SkipTest(why_not)
        tag = marker()
        subject = f"Grüße vom Cron {tag}"
        body = "Die nächtliche Sicherung ist fertig: 3 Dateien, 12 MB, Prüfsumme in Ordnung.\n"
        recipients = [f"user{n:03d}@example.org" for n in range(1, 101)]
        # What cron hands to sendmail: LF line ends, an unqualified From.
        text = (
            "From: root (Cron Daemon)\n"
            "To: ops@example.org\n"
            f"Subject: {subject}\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=UTF-8\n"
            "Content-Transfer-Encoding: 8bit\n"
            "\n" + body
        ).encode()

        relay = SharedRelay.get()
        postfix = PostfixInstance(relay.port)
        self.addCleanup(in_thread, postfix.stop)

        def scenario() -> tuple[list[str], str, list[dict[str, Any]]]:
            relay.wait_listening()
            postfix.start()
            conf = str(postfix.conf)
            submit = ["sendmail", "-C", conf, "-B", "8BITMIME", "-f", "root", "--", *recipients]
            postfix.must(*submit, stdin=text)
            postfix.must("postqueue", "-c", conf, "-f")
            sent = postfix.wait_sent(len(recipients))
            printed = relay.printed(tag, count=2) if len(sent) == len(recipients) else []
            return sent, postfix.log(), printed

        sent, log, printed = await in_thread(scenario)
        self.assertEqual(len(sent), len(recipients), log)
        via = f"relay=127.0.0.1[127.0.0.1]:{relay.port},"
        delivered = set()
        for line in sent:
            self.assertIn(via, line)
            delivered.add(line.split(" to=<", 1)[1].split(">", 1)[0])
        self.assertEqual(delivered, set(recipients))
        self.assertIn("TLS connection established to 127.0.0.1", log)
        self.assertIn("TLS connection reused to 127.0.0.1", log)
        self.assertTrue(any("conn_use=2" in line for line in sent), log)

        self.assertEqual(len(printed), 2, printed)
        envelope: list[str] = []
        for record in printed:
            self.assertEqual(record["envelope"]["from"], "root@postfix.test")
            self.assertEqual(record["headers"]["subject"], subject)
            self.assertEqual(record["headers"]["from"][0]["address"], "root@postfix.test")
            self.assertEqual(record["text"]["excerpt"], body.replace("\n", "\r\n"))
            envelope += record["envelope"]["to"]
        self.assertEqual(sorted(envelope), recipients)

    def test_docs_show_the_tested_settings(self) -> None:
        """docs/clients.md gives the main.cf lines an operator needs and, verbatim, the
        main.cf and master.cf of the instance this test runs (with its paths, port and
        credentials as placeholders), so the page cannot drift from what is tested."""
        page = (ROOT / "docs" / "clients.md").read_text()
        for line in POSTFIX_RELAY_SETTINGS:
            self.assertIn(f"\n{line}\n", page)
        main_cf = postfix_main_cf("<dir>", "<port>", "<user>", "<password>")
        self.assertIn(f"```text\n{main_cf}```", page)
        self.assertIn(f"```text\n{private.MASTER_CF}```", page)


# --- msmtp ---------------------------------------------------------------------


class MsmtpTests(TestCase):
    timeout = 120

    @async_test
    async def test_msmtp_starttls_and_auth(self) -> None:
        """msmtp, configured by file as docs/clients.md shows (STARTTLS, AUTH with the
        password read by passwordeval), sends a message the relay prints with its
        envelope and 8-bit body intact."""
        require("msmtp")
        tag = marker()
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        secret = home / "relay-password"
        secret.write_text(PASSWORD)
        secret.chmod(0o600)
        body = "Festplatte /srv zu 91 % belegt.\n"
        text = (
            f"From: monitor@example.com\nTo: ops@example.org\nSubject: msmtp {tag}\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
            "Content-Transfer-Encoding: 8bit\n\n" + body
        ).encode()

        relay = SharedRelay.get()
        config = home / "msmtprc"
        config.write_text(
            "defaults\n"
            "tls on\n"
            "tls_starttls on\n"
            "tls_certcheck off\n"
            "auth on\n"
            "\n"
            "account relay\n"
            "host 127.0.0.1\n"
            f"port {relay.port}\n"
            "from monitor@example.com\n"
            f"user {USER}\n"
            f'passwordeval "cat {secret}"\n'
            "\n"
            "account default : relay\n"
        )
        config.chmod(0o600)  # msmtp refuses a config file others may read
        command = ["msmtp", "--file", str(config), "--", "ops@example.org", "audit@example.org"]
        env = {**base_env(), "HOME": str(home)}
        result, printed = await send_with(relay, tag, command, text, env=env)
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        [record] = printed
        self.assertEqual(record["envelope"]["from"], "monitor@example.com")
        self.assertEqual(record["envelope"]["to"], ["ops@example.org", "audit@example.org"])
        self.assertEqual(record["text"]["excerpt"], body.replace("\n", "\r\n"))


# --- curl and swaks ------------------------------------------------------------


class CommandLineClientTests(TestCase):
    timeout = 120

    @async_test
    async def test_curl_smtp_with_ssl_reqd(self) -> None:
        """curl C{smtp://} with C{--ssl-reqd} (STARTTLS or nothing), C{--user} and
        C{--crlf} sends a text file as docs/clients.md shows; the relay prints it for
        both recipients with CRLF line ends."""
        require("curl")
        tag = marker()
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        mail = workdir / "mail.txt"
        # Written as an editor would, with LF line ends: --crlf converts them.
        mail.write_text(
            f"From: backup@example.com\nTo: ops@example.org\nSubject: curl {tag}\n"
            "\nBackup finished.\n"
        )
        relay = SharedRelay.get()

        command = [
            "curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT),
            "--url", f"smtp://127.0.0.1:{relay.port}", "--ssl-reqd", "--insecure", "--crlf",
            "--user", f"{USER}:{PASSWORD}",
            "--mail-from", "backup@example.com",
            "--mail-rcpt", "ops@example.org", "--mail-rcpt", "audit@example.org",
            "--upload-file", str(mail),
        ]  # fmt: skip
        result, printed = await send_with(relay, tag, command)
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        [record] = printed
        self.assertEqual(record["envelope"]["to"], ["ops@example.org", "audit@example.org"])
        self.assertEqual(record["text"]["excerpt"], "Backup finished.\r\n")

    @async_test
    async def test_swaks_pipelining_over_starttls(self) -> None:
        """swaks C{--tls --pipeline} with AUTH LOGIN: the relay answers the pipelined
        MAIL/RCPT/DATA batch in order and prints the message."""
        require("swaks")
        tag = marker()
        relay = SharedRelay.get()

        command = [
            "swaks", "--server", f"127.0.0.1:{relay.port}", "--tls", "--pipeline",
            "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", "alerts@example.com", "--to", "ops@example.org,audit@example.org",
            "--header", f"Subject: swaks {tag}", "--timeout", str(CLIENT_TIMEOUT),
        ]  # fmt: skip
        result, printed = await send_with(relay, tag, command)
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace"))
        self.assertIn(b"250-PIPELINING", result.stdout)
        [record] = printed
        self.assertEqual(record["envelope"]["to"], ["ops@example.org", "audit@example.org"])


# --- nodemailer ------------------------------------------------------------------


def nodemailer_missing() -> str | None:
    if shutil.which("node") is None:
        return "node not installed (Debian package nodejs; .ci/run installs it)"
    if not (CLIENTS / "node_modules" / "nodemailer" / "package.json").exists():
        return "nodemailer not installed: npm ci --prefix tests/clients (.ci/run does this)"
    return None


class NodemailerTests(TestCase):
    timeout = 120

    @async_test
    async def test_nodemailer_attachment_survives(self) -> None:
        """nodemailer (STARTTLS required, AUTH) sends a UTF-8 subject and an attachment
        with a non-ASCII file name; the relay prints the subject decoded and the
        attachment with its name and the SHA-256 of the original bytes."""
        why_not = nodemailer_missing()
        if why_not:
            raise SkipTest(why_not)
        tag = marker()
        subject = f"Monatsbericht für März — {tag}"
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        attachment = workdir / "bericht.pdf"
        content = os.urandom(150_000)
        attachment.write_bytes(content)

        relay = SharedRelay.get()

        job = {
            "host": "127.0.0.1",
            "port": relay.port,
            "user": USER,
            "pass": PASSWORD,
            "from": "Reports <reports@example.com>",
            "to": "ops@example.org",
            "subject": subject,
            "text": "Der Bericht hängt an.",
            "filename": "Bericht März.pdf",
            "attachment": str(attachment),
        }
        command = ["node", str(CLIENTS / "send_nodemailer.js")]
        stdin = json.dumps(job).encode()
        result, printed = await send_with(relay, tag, command, stdin, cwd=CLIENTS)
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace"))
        outcome = json.loads(result.stdout)
        self.assertEqual(outcome["accepted"], ["ops@example.org"])
        self.assertTrue(outcome["response"].startswith("250 "), outcome)
        [record] = printed
        self.assertEqual(record["headers"]["subject"], subject)
        self.assertEqual(record["envelope"]["from"], "reports@example.com")
        [attached] = record["attachments"]
        self.assertEqual(attached["filename"], "Bericht März.pdf")
        self.assertEqual(attached["content_type"], "application/pdf")
        self.assertEqual(attached["size"], len(content))
        self.assertEqual(attached["sha256"], hashlib.sha256(content).hexdigest())
