"""The queue end to end: the real twistd process, a real SQLite queue, smtplib, kill -9.

Each test starts `twistd -n smtpproxy` with C{QUEUE_URL} pointing into its
temporary directory, sends with smtplib, and kills or stops the process
where the issue's crash tests say; a second process on the same queue then
shows what survived.  stdout (the stdout provider's output) and stderr (the
JSON log) go to files, so a test can watch them while the relay runs.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from tests.fakegraph import Delivery, FakeGraph, Fault
from tests.support import TIMEOUT, async_test, in_thread, message
from tests.test_twistd import TWISTD, base_env, free_port

MAILBOX = "relay@contoso.example"
QUEUED = "OK: queued as "


class QueuedRelay:
    """twistd processes, one after another, sharing one queue directory."""

    def __init__(self, case: TestCase, **settings: str) -> None:
        self.dir = Path(case.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.settings = {
            "QUEUE_URL": f"sqlite:///{self.dir / 'queue.db'}",
            "SMTP_HOSTNAME": "relay.test",
            "HTTP_LISTEN": "",
            **settings,
        }
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None
        case.addCleanup(self.kill)

    def start(self, **settings: str) -> None:
        self.runs += 1
        self.port = free_port()
        env = base_env(SMTP_LISTEN=f"127.0.0.1:{self.port}", **{**self.settings, **settings})
        with (
            open(self.dir / f"out{self.runs}", "wb") as out,
            open(self.dir / f"err{self.runs}", "wb") as err,
        ):
            self.process = subprocess.Popen(
                [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy"],
                env=env,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"relay did not start:\n{self.err()}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.process = None
        return code

    def out(self) -> str:
        return "".join(
            (self.dir / f"out{n}").read_text("utf-8", "replace") for n in range(1, self.runs + 1)
        )

    def err(self, run: int | None = None) -> str:
        return (self.dir / f"err{run or self.runs}").read_text("utf-8", "replace")

    def events(self, msg: str) -> list[dict[str, Any]]:
        found = []
        for n in range(1, self.runs + 1):
            for line in self.err(n).splitlines():
                if line.startswith("{"):
                    event = json.loads(line)
                    if event.get("msg") == msg:
                        found.append(event)
        return found

    def wait_for(self, msg: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(msg)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{count} x {msg!r} not logged in time:\n{self.err()}")

    def send(self, subject: str) -> tuple[str, float]:
        """One message with smtplib; the id from the 250 and when the 250 arrived."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
            client.ehlo("client.test")
            client.mail("a@example.com")
            client.rcpt("b@example.org")
            code, reply = client.data(message(subject, f"Body of {subject}.\r\n"))
        text = reply.decode()
        assert code == 250 and QUEUED in text, (code, text)
        return text.split(QUEUED, 1)[1].strip(), time.monotonic()

    def command(self, *args: str) -> Any:
        """`smtpproxy queue --json ...` on the same settings; its JSON output."""
        result = subprocess.run(
            [sys.executable, "-m", "smtpproxy.cli", "queue", "--json", *args],
            env=base_env(**self.settings),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode in (0, 1), result.stderr.decode()
        return json.loads(result.stdout)


class CrashTests(TestCase):
    @async_test
    async def test_queued_then_delivered_once(self) -> None:
        """smtplib hears 250 queued as <id>; the stdout provider prints the message once;
        the delivered line names that id with its queue time and one attempt."""
        relay = QueuedRelay(self)

        def scenario() -> tuple[str, float, float]:
            relay.start()
            id, answered = relay.send("Queued hello")
            relay.wait_for("message delivered")
            seen = time.monotonic()
            self.assertEqual(relay.kill(signal.SIGTERM), 0)
            return id, answered, seen

        id, answered, seen = await in_thread(scenario)
        self.assertEqual(len(id), 24)
        self.assertEqual(relay.out().count("Body of Queued hello."), 1)
        [queued] = relay.events("message queued")
        [delivered] = relay.events("message delivered")
        self.assertEqual((queued["id"], delivered["id"], delivered["attempts"]), (id, id, 1))
        self.assertLess(seen - answered, 5)

    @async_test
    async def test_kill_after_250_delivers_once_after_restart(self) -> None:
        """kill -9 right after the 250: after a restart the message is delivered, and
        it is printed exactly once over both runs.

        The first run's provider is an upstream that takes connections and never
        greets, so its worker holds the message (claimed, not delivered) when the
        kill lands, however loaded the machine: the restart must take it over once
        its lease has run out."""
        relay = QueuedRelay(self, QUEUE_LEASE_TIME="2")
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        self.addCleanup(silent.close)

        def scenario() -> None:
            relay.start(
                PROVIDER="smtp",
                RELAY_HOST="127.0.0.1",
                RELAY_PORT=str(silent.getsockname()[1]),
                RELAY_TLS="none",
            )
            relay.send("Survivor")
            relay.kill()
            relay.start()
            deadline = time.monotonic() + 30
            while "Body of Survivor." not in relay.out() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(3)  # a second delivery, if there were one, would be due by now
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        self.assertEqual(relay.out().count("Body of Survivor."), 1)
        self.assertEqual(relay.command("stats")["queued"], 0)

    @async_test
    async def test_kill_during_data_delivers_nothing(self) -> None:
        """kill -9 while the body is arriving: nothing acknowledged, nothing delivered
        after the restart, nothing left in the queue."""
        relay = QueuedRelay(self)

        def scenario() -> None:
            relay.start()
            with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
                sock.recv(1000)
                sock.sendall(
                    b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                    b"DATA\r\nSubject: half\r\n\r\nBody of half, "
                )
                time.sleep(0.3)
                relay.kill()
            relay.start()
            time.sleep(1.5)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        self.assertNotIn("Body of half", relay.out())
        self.assertEqual(relay.events("message queued"), [])
        stats = relay.command("stats")
        self.assertEqual((stats["queued"], stats["delivering"], stats["dead"]), (0, 0, 0))


def fake_graph(case: TestCase) -> FakeGraph:
    """A fake Graph listening in this test's reactor until the test ends."""
    fake = FakeGraph(reactor, mailboxes=(MAILBOX,))
    port = fake.listen(reactor)
    case.addCleanup(port.stopListening)
    return fake


def graph_settings(fake: FakeGraph) -> dict[str, str]:
    """The relay's settings for sending through C{fake}."""
    return {
        "GRAPH_TENANT_ID": fake.tenant,
        "GRAPH_CLIENT_ID": fake.client_id,
        "GRAPH_CLIENT_SECRET": fake.client_secret or "",
        "GRAPH_SENDER": MAILBOX,
        "GRAPH_AUTHORITY_HOST": fake.endpoint,
        "GRAPH_ENDPOINT": fake.endpoint,
        "GRAPH_SEND_TIMEOUT": "5",
    }


class GraphOutageTests(TestCase):
    def graph(self) -> FakeGraph:
        return fake_graph(self)

    def graph_settings(self, fake: FakeGraph) -> dict[str, str]:
        return graph_settings(fake)

    @async_test
    async def test_outage_then_recovery_delivers_all_once(self) -> None:
        """Graph answers 503 to every request for a while (each attempt's own retries
        too); the queue keeps the messages, and once Graph recovers each is delivered
        exactly once."""
        fake = self.graph()
        fake.script("sendMail", *[Fault(503)] * 12)
        relay = QueuedRelay(
            self,
            QUEUE_RETRY_MIN_INTERVAL="1",
            QUEUE_RETRY_MAX_INTERVAL="2",
            QUEUE_CONCURRENCY="1",
            **self.graph_settings(fake),
        )
        subjects = [f"outage {n}" for n in range(5)]

        def scenario() -> None:
            relay.start()
            for subject in subjects:
                relay.send(subject)
            relay.wait_for("message delivered", count=len(subjects), timeout=90)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        deferred = relay.events("message delivery deferred")
        self.assertGreater(len(deferred), 0)
        self.assertEqual(sorted(_subjects(fake.deliveries)), subjects)

    @async_test
    async def test_kill_during_a_slow_graph_request(self) -> None:
        """kill -9 while Graph holds the sendMail request unanswered: the request dies
        with the connection, the lease runs out, and the restarted relay delivers the
        message: once in all (at most once more than the attempt that was cut off)."""
        fake = self.graph()
        fake.script("sendMail", Fault(delay=60))
        relay = QueuedRelay(self, QUEUE_LEASE_TIME="2", **self.graph_settings(fake))

        def scenario() -> None:
            relay.start()
            relay.send("slow")
            deadline = time.monotonic() + 30
            while not fake.routes("sendMail") and time.monotonic() < deadline:
                time.sleep(0.02)
            relay.kill()
            relay.start()
            relay.wait_for("message delivered")
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        self.assertEqual(len(fake.routes("sendMail")), 2)
        self.assertEqual(_subjects(fake.deliveries), ["slow"])
        [delivered] = relay.events("message delivered")
        self.assertEqual(delivered["attempts"], 1)  # the cut-off attempt was never recorded

    @async_test
    async def test_sigterm_keeps_queued_mail_for_the_next_start(self) -> None:
        """SIGTERM with messages waiting for a retry: exit 0, they stay queued (the
        command sees them); made due again, the next start delivers each once, oldest
        first."""
        fake = self.graph()
        relay = QueuedRelay(
            self,
            QUEUE_RETRY_MIN_INTERVAL="3600",
            QUEUE_CONCURRENCY="1",
            GRAPH_SEND_TIMEOUT="0.5",
            **{k: v for k, v in self.graph_settings(fake).items() if k != "GRAPH_SEND_TIMEOUT"},
        )
        subjects = ["kept 1", "kept 2", "kept 3"]
        fake.script("sendMail", *[Fault(503)] * 3)

        def scenario() -> None:
            relay.start()
            for subject in subjects:
                relay.send(subject)
            relay.wait_for("message delivery deferred", count=3)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        listed = relay.command("list")
        self.assertEqual([e["state"] for e in listed], ["queued"] * 3)
        self.assertEqual(len(fake.deliveries), 0)
        for entry in reversed(listed):
            self.assertEqual(relay.command("retry", entry["id"])["retried"], True)

        def restart() -> None:
            relay.start()
            relay.wait_for("message delivered", count=3)
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(restart)
        self.assertEqual(_subjects(fake.deliveries), subjects)
        self.assertEqual(relay.command("list"), [])


def _subjects(deliveries: list[Delivery]) -> list[str]:
    """The subject of each message Graph accepted, in delivery order (JSON or MIME)."""
    found = []
    for delivery in deliveries:
        if delivery.message is not None:
            found.append(str(delivery.message.get("subject")))
        else:
            parsed = email.message_from_bytes(delivery.mime or b"", policy=email.policy.default)
            found.append(str(parsed["subject"]))
    return found


class StartTests(TestCase):
    @async_test
    async def test_queue_that_cannot_open_stops_the_relay(self) -> None:
        """A QUEUE_URL whose database cannot be created: one line naming QUEUE_URL and
        the reason, exit status 1 (not a relay that runs without its queue)."""
        settings = {
            "QUEUE_URL": "sqlite:///proc/no-such-place/queue.db",
            "SMTP_LISTEN": f"127.0.0.1:{free_port()}",
            "HTTP_LISTEN": "",
        }

        def scenario() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy"],
                env=base_env(**settings),
                capture_output=True,
                timeout=60,
                check=False,
            )

        result = await in_thread(scenario)
        self.assertEqual(result.returncode, 1)
        lines = [line for line in result.stderr.decode().splitlines() if "QUEUE_URL" in line]
        self.assertEqual(len(lines), 1, result.stderr.decode())
        self.assertIn("cannot open the queue", lines[0])


class DiskFullTests(TestCase):
    timeout = 300

    def small_filesystem(self, directory: Path, size: str) -> None:
        """Mount a tmpfs of C{size} on C{directory} (root only); unmounted at cleanup."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("a size-limited filesystem needs root and mount(8)")
        directory.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        self.addCleanup(
            subprocess.run, ["umount", "-l", str(directory)], capture_output=True, check=False
        )

    @async_test
    async def test_full_disk_answers_452_and_loses_nothing_acknowledged(self) -> None:
        """The queue on a 1 MiB filesystem: small messages (kept in SQLite's rows) and then
        large ones (a file each) are accepted until the disk is full, then answered
        452 4.3.1 by the real relay; after kill -9, more room and a restart, every
        message that heard 250 is delivered exactly once and none that heard 452 is."""
        relay = QueuedRelay(self)
        volume = relay.dir / "volume"
        self.small_filesystem(volume, "1m")
        fake = fake_graph(self)
        # Graph holds every request: nothing leaves the queue while it fills.
        fake.script("sendMail", *[Fault(delay=120)] * 50)
        graph = graph_settings(fake)
        relay.settings["QUEUE_URL"] = f"sqlite:///{volume / 'queue.db'}"
        relay.settings["QUEUE_LEASE_TIME"] = "2"
        accepted: list[str] = []
        refused: list[str] = []

        def fill(label: str, size: int) -> None:
            for n in range(2_000):
                subject = f"{label} {n}"
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT * 3) as client:
                    client.ehlo("client.test")
                    client.mail("a@example.com")
                    client.rcpt("b@example.org")
                    body = f"Body of {subject}.\r\n" + "z" * size + "\r\n"
                    code, reply = client.data(message(subject, body))
                if code == 250:
                    accepted.append(subject)
                    continue
                self.assertEqual((code, reply.decode()[:5]), (452, "4.3.1"))
                refused.append(subject)
                return
            self.fail(f"{label}: the disk never filled")

        def scenario() -> None:
            relay.start(**graph)
            fill("small", 20_000)
            fill("large", 200_000)
            relay.kill()
            subprocess.run(["mount", "-o", "remount,size=16m", str(volume)], check=True, timeout=30)
            relay.start(PROVIDER="stdout")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                out = relay.out()
                if all(f"Body of {s}." in out for s in accepted):
                    break
                time.sleep(0.2)
            time.sleep(2.5)  # past a lease: a second delivery would show
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        out = relay.out()
        self.assertGreater(len(accepted), 10)
        self.assertEqual(len(refused), 2)
        self.assertEqual([s for s in accepted if out.count(f"Body of {s}.") != 1], [])
        self.assertEqual([s for s in refused if f"Body of {s}." in out], [])
        self.assertEqual(len(relay.events("message not queued: the queue is full")), 2)
