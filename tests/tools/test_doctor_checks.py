"""`smtpproxy doctor`'s queue and upstream SMTP checks, run as the operator runs them.

The doctor is a real process (`python -m smtpproxy.cli doctor --json`)
against real things: an SQLite queue file, a PostgreSQL server started by
the queue tests' harness (tests/queue/pgserver.py), and a private Postfix
(tests/postfix.py) requiring STARTTLS with a certificate from a test CA and
checking AUTH passwords through a Dovecot-protocol socket in this process.
The wording of the queue's depth line and warnings is checked without a
database through L{queuecheck.stats_results}.
"""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from smtpproxy import tls
from smtpproxy.providers.smtp.settings import RelaySettings
from smtpproxy.queue import postgres_sql
from smtpproxy.queue.model import Envelope, State
from smtpproxy.queue.sqlite import SCHEMA_VERSION, SQLiteStore
from smtpproxy.tools import queuecheck
from smtpproxy.tools.certs import Verification
from smtpproxy.tools.dialogue import Capabilities, Reply
from smtpproxy.tools.doctor import Result
from smtpproxy.tools.probe import ProbeReport, TLSReport
from smtpproxy.tools.queuecheck import Depth, stats_results
from smtpproxy.tools.upstreamcheck import options_for, results_for
from tests.providers.smtp.postfix import DovecotAuth, PostfixUpstream, missing
from tests.providers.smtp.upstream import authority
from tests.queue import pgserver
from tests.queue.test_store_contract import Body
from tests.support import in_thread
from tests.test_twistd import base_env, free_port
from tests.tools.test_end_to_end import tool, tool_json, write

reactor: Any = _reactor
NOW = 1_800_000_000.0
UPSTREAM_USER = "relay-account"
UPSTREAM_PASSWORD = "Upstream pa55 wörd"


def doctor_env(directory: str, **settings: str) -> dict[str, str]:
    """Settings for a doctor run whose own checks pass: free ports, a certificate in files."""
    cert, key = tls.self_signed("relay.test")
    return base_env(
        SMTP_LISTEN=f"127.0.0.1:{free_port()}",
        HTTP_LISTEN="",
        SMTP_HOSTNAME="relay.test",
        TLS_CERT_FILE=write(directory, "relay-cert.pem", cert),
        TLS_KEY_FILE=write(directory, "relay-key.pem", key),
        **settings,
    )


def lines(report: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    """(status, detail) of the checks whose name starts with C{prefix}."""
    return [(c["status"], c["detail"]) for c in report["checks"] if c["check"].startswith(prefix)]


class QueueDepthTests(SynchronousTestCase):
    def test_depth_line(self) -> None:
        """One line holds each state's count and its oldest message's age, and the bytes."""
        depths = [
            Depth(State.QUEUED, 3, NOW - 600),
            Depth(State.DELIVERING, 1, NOW - 30),
            Depth(State.DEAD, 0, None),
        ]
        self.assertEqual(
            stats_results(depths, 500, 1000, NOW),
            [
                Result(
                    "queue",
                    "PASS",
                    "3 queued (oldest 10m), 1 delivering (oldest 30s), 0 dead; "
                    "500 of 1000 bytes held",
                )
            ],
        )

    def test_warnings_past_thresholds(self) -> None:
        """A queued message older than the threshold, a dead message and a nearly full
        queue each add a WARN line saying what to look at; just under them, none."""
        limit = queuecheck.OLDEST_QUEUED_WARNING
        calm = [Depth(State.QUEUED, 1, NOW - limit), Depth(State.DEAD, 0, None)]
        self.assertEqual([r.status for r in stats_results(calm, 800, 1000, NOW)], ["PASS"])
        behind = [Depth(State.QUEUED, 1, NOW - limit - 1), Depth(State.DEAD, 2, NOW - 5)]
        found = stats_results(behind, 801, 1000, NOW)
        self.assertEqual([r.status for r in found], ["PASS", "WARN", "WARN", "WARN"])
        self.assertIn("delivery is behind or failing", found[1].detail)
        self.assertIn("2 dead messages", found[2].detail)
        self.assertIn("801 of 1000 bytes held (80%)", found[3].detail)


class SQLiteQueueDoctorTests(TestCase):
    timeout = 120

    async def test_sqlite_queue(self) -> None:
        """Against a real SQLite queue holding two messages (one queued an hour ago): the
        store opens at schema 2, takes a write that it removes again (still exactly the two
        messages afterwards, no body file left), reports 2 queued with the oldest's age,
        and warns that delivery is behind (exit 3)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "queue.db")
        store = SQLiteStore(path, 1 << 30, reactor)
        await store.open()
        now = reactor.seconds()
        envelope = Envelope("app@example.com", ("ops@example.org",))
        await store.enqueue("old", envelope, Body(b"Subject: a\r\n\r\nA\r\n"), now - 3600)
        await store.enqueue("new", envelope, Body(b"Subject: b\r\n\r\nB\r\n"), now)
        await store.close()

        env = doctor_env(directory, QUEUE_URL=f"sqlite:///{path}")
        status, report = await in_thread(tool_json, "doctor", env=env)
        self.assertEqual(status, 3, report)
        found = lines(report, "queue")
        self.assertEqual(
            found[0], ("PASS", f"sqlite {path} opens; schema version {SCHEMA_VERSION}")
        )
        self.assertEqual(found[1][0], "PASS")
        self.assertIn("is writable: one message stored and removed", found[1][1])
        self.assertEqual(found[2][0], "PASS")
        self.assertIn("2 queued (oldest 1h00m), 0 delivering, 0 dead", found[2][1])
        self.assertEqual(found[3][0], "WARN")
        self.assertIn("waits for 1h00m", found[3][1])
        self.assertEqual([c["status"] for c in report["checks"]].count("WARN"), 1, report)

        store = SQLiteStore(path, 1 << 30, reactor)
        await store.open()
        self.addCleanup(store.close)
        entries = await store.list(None, 100)
        self.assertEqual(sorted(e.id for e in entries), ["new", "old"])
        self.assertEqual(os.listdir(path + ".bodies"), [])

    async def test_not_a_database(self) -> None:
        """A QUEUE_URL naming a file that is not an SQLite database fails the queue check
        with SQLite's reason (exit 1); the other checks still run."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(directory, "queue.db", b"this is not a database\n" * 100)
        env = doctor_env(directory, QUEUE_URL=f"sqlite:///{path}")
        status, report = await in_thread(tool_json, "doctor", env=env)
        self.assertEqual(status, 1, report)
        self.assertEqual(len(lines(report, "queue")), 1)
        status_, detail = lines(report, "queue")[0]
        self.assertEqual(status_, "FAIL")
        self.assertIn("cannot open: file is not a database", detail)
        self.assertEqual(lines(report, "provider")[0][0], "PASS")

    def test_no_queue(self) -> None:
        """Without QUEUE_URL the queue check is one SKIP line."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        status, report = tool_json("doctor", env=doctor_env(directory))
        self.assertEqual(status, 0, report)
        self.assertEqual(lines(report, "queue"), [("SKIP", lines(report, "queue")[0][1])])
        self.assertIn("no QUEUE_URL", lines(report, "queue")[0][1])


class PostgresQueueDoctorTests(TestCase):
    timeout = 120

    async def test_postgres_queue(self) -> None:
        """Against a real PostgreSQL (an empty database): the relay's store creates its
        schema (version 1), takes the write test and removes it (no row left in
        queue_messages), and reports an empty queue; the DSN is named without secrets."""
        server = await in_thread(pgserver.server)
        dsn = await in_thread(server.new_database)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        env = doctor_env(directory, QUEUE_URL=dsn)
        status, report = await in_thread(tool_json, "doctor", env=env)
        self.assertEqual(status, 0, report)
        found = lines(report, "queue")
        database = dsn.rsplit("/", 1)[1]
        where = f"postgresql 127.0.0.1:{server.port}/{database}"
        self.assertEqual(
            found[0], ("PASS", f"{where} opens; schema version {postgres_sql.SCHEMA_VERSION}")
        )
        self.assertEqual(found[1], ("PASS", f"{where} is writable: one message stored and removed"))
        self.assertEqual(
            found[2],
            ("PASS", "0 queued, 0 delivering, 0 dead; 0 of 1073741824 bytes held"),
        )

        def rows() -> int:
            with psycopg.connect(dsn, connect_timeout=10) as connection:
                row = connection.execute("SELECT count(*) FROM queue_messages").fetchone()
                return int(row[0]) if row else -1

        self.assertEqual(await in_thread(rows), 0)


class UpstreamFixture(TestCase):
    """A private Postfix requiring STARTTLS and AUTH (checked by a fake Dovecot), and the
    doctor's settings for it.  The security tests (tests/security/test_operator_tools.py)
    use it too."""

    timeout = 180

    async def upstream(self) -> tuple[PostfixUpstream, DovecotAuth, str]:
        """Postfix with the test CA's certificate and AUTH; the CA file's path."""
        why = missing()
        if why:
            raise SkipTest(why)
        self.ca = authority()
        auth = DovecotAuth(UPSTREAM_USER, UPSTREAM_PASSWORD)
        port = await auth.listen()
        self.addCleanup(port.stopListening)
        postfix = PostfixUpstream(self.ca, size_limit=10_240_000, extra=auth.lines())
        self.addCleanup(in_thread, postfix.stop)
        await in_thread(postfix.start)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        return postfix, auth, write(self.directory, "ca.pem", self.ca.ca_pem)

    def env(self, postfix: PostfixUpstream, ca_file: str, password: str) -> dict[str, str]:
        return doctor_env(
            self.directory,
            PROVIDER="smtp",
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=str(postfix.port),
            RELAY_CA_FILE=ca_file,
            RELAY_USERNAME=UPSTREAM_USER,
            RELAY_PASSWORD=password,
            SMTP_MAX_MESSAGE_SIZE="5000000",
        )


class UpstreamDoctorTests(UpstreamFixture):
    async def test_good_certificate_and_password(self) -> None:
        """The right CA and password: connection, STARTTLS with a verified certificate,
        AUTH PLAIN and the extensions all pass (exit 0); the password is not printed."""
        postfix, auth, ca_file = await self.upstream()
        status, out, _ = await in_thread(
            tool, "doctor", "--json", env=self.env(postfix, ca_file, UPSTREAM_PASSWORD)
        )
        report = json.loads(out)
        self.assertEqual(status, 0, out)
        found = dict((c["check"], (c["status"], c["detail"])) for c in report["checks"])
        self.assertEqual(
            found["upstream"],
            ("PASS", f"127.0.0.1:{postfix.port} answers as upstream.test; EHLO accepted"),
        )
        self.assertEqual(found["upstream tls"][0], "PASS")
        self.assertIn("STARTTLS TLSv1.3", found["upstream tls"][1])
        self.assertIn(f"verifies for 127.0.0.1 against RELAY_CA_FILE {ca_file}", out)
        self.assertEqual(
            found["upstream auth"], ("PASS", f"AUTH PLAIN as {UPSTREAM_USER} accepted")
        )
        self.assertEqual(
            found["upstream ext"], ("PASS", "SIZE 10240000, 8BITMIME, SMTPUTF8, PIPELINING")
        )
        self.assertEqual(auth.attempts, [UPSTREAM_USER])
        self.assertNotIn(UPSTREAM_PASSWORD, out)


def relay_settings(
    tls: str = "starttls", tls_verify: bool = True, username: str = "", password: str = ""
) -> RelaySettings:
    """RelaySettings as the defaults give them for an upstream at mail.example.net."""
    return RelaySettings(
        host="mail.example.net",
        port=587,
        tls=tls,
        username=username,
        password=password,
        ca_file="",
        tls_verify=tls_verify,
        client_cert_file="",
        client_key_file="",
        max_connections=10,
        timeout=60.0,
        helo="relay.test",
    )


def probe_report(verified: bool = True, size: int | None = 10_000_000) -> ProbeReport:
    """A probe's report of a STARTTLS session with the given verification and SIZE."""
    caps = Capabilities(
        name="mail.example.net", size=size, pipelining=True, eightbitmime=True, smtputf8=True
    )
    verification = Verification(verified, "the system CA store", "" if verified else "expired")
    report = ProbeReport("mail.example.net:587", "starttls")
    report.greeting = Reply(220, ("mail.example.net ESMTP",))
    report.ehlo = caps
    report.ehlo_after_tls = caps
    report.tls = TLSReport("STARTTLS", "TLSv1.3", "TLS_AES_128_GCM_SHA256", 128, (), verification)
    return report


class UpstreamResultsTests(SynchronousTestCase):
    """What a probe's report means for the relay's upstream, without a server."""

    def test_options_follow_the_provider(self) -> None:
        """RELAY_TLS picks the probe's mode; verification is required only when the
        provider verifies; AUTH in clear text only with RELAY_TLS=none, as the provider."""
        options = options_for(relay_settings(username="u", password="p"), 5.0)
        self.assertEqual((options.mode, options.require_verified), ("starttls", True))
        self.assertEqual((options.user, options.password, options.insecure_auth), ("u", "p", False))
        self.assertEqual(options.ca_label, "RELAY_CA_FILE")
        self.assertEqual(options_for(relay_settings(tls="implicit"), 5.0).mode, "tls")
        plain = options_for(relay_settings(tls="none"), 5.0)
        self.assertEqual(
            (plain.mode, plain.insecure_auth, plain.require_verified), ("plain", True, False)
        )
        self.assertFalse(options_for(relay_settings(tls_verify=False), 5.0).require_verified)

    def test_verification_off_warns(self) -> None:
        """With RELAY_TLS_VERIFY=false a certificate that would not verify is a WARN saying
        so, and one that would verify a WARN to turn verification back on."""
        bad = results_for(probe_report(verified=False), relay_settings(tls_verify=False), 1)
        self.assertEqual(bad[1].status, "WARN")
        self.assertIn("would not verify against the system CA store: expired", bad[1].detail)
        good = results_for(probe_report(), relay_settings(tls_verify=False), 1)
        self.assertIn("turn verification on", good[1].detail)

    def test_no_tls_and_small_size_warn(self) -> None:
        """RELAY_TLS=none is a WARN (clear text); an upstream SIZE below
        SMTP_MAX_MESSAGE_SIZE is a WARN naming both numbers; no username is a SKIP."""
        found = results_for(probe_report(), relay_settings(tls="none"), 26_214_400)
        self.assertEqual([r.status for r in found], ["PASS", "WARN", "SKIP", "WARN"])
        self.assertIn("clear text", found[1].detail)
        self.assertIn(
            "at most 10000000 bytes but SMTP_MAX_MESSAGE_SIZE is 26214400", found[3].detail
        )

    def test_unreachable(self) -> None:
        """A probe that got no EHLO reply is one FAIL line with its reason."""
        report = ProbeReport("mail.example.net:587", "starttls", stopped="connect: refused")
        self.assertEqual(
            results_for(report, relay_settings(), 1),
            [Result("upstream", "FAIL", "mail.example.net:587: connect: refused")],
        )


class QueueWhereTests(SynchronousTestCase):
    def test_dsn_password_not_shown(self) -> None:
        """The report names a PostgreSQL queue by host, port and database, never with the
        password a QUEUE_URL may hold."""
        where = queuecheck._where("postgresql", "postgresql://relay:s3cret@db.internal:5433/mail")
        self.assertEqual(where, "postgresql db.internal:5433/mail")
