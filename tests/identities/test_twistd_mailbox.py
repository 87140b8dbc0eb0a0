"""End to end: an identity's policy `mailbox` decides the Graph mailbox, direct and queued.

The relay is the real `twistd smtpproxy` with an AUTH_CONFIG of userpass
users; the client is smtplib (STARTTLS, AUTH PLAIN); Graph is the fake of
L{tests.fakegraph}, listening in this test's reactor and strict about
which mailbox may send what.  The queued test stops the relay with the
message still queued and delivers it from a second process that has no
AUTH_CONFIG at all: the mailbox can only have come from the queue.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smtpproxy.identities.userpass import hash_password
from tests.fakegraph import FakeGraph, Fault
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, client_tls, in_thread, message
from tests.test_twistd import Relay, run_twistd

DEFAULT = "relay@contoso.example"
BILLING = "billing@contoso.example"


def send_as(port: int, user: str, password: str, subject: str) -> str:
    """STARTTLS, AUTH PLAIN as C{user}, one message From an address Graph does not know;
    the DATA reply's text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.starttls(context=client_tls())
        client.ehlo("client.test")
        client.login(user, password)
        client.mail("app@example.org")
        client.rcpt("b@example.org")
        code, reply = client.data(message(subject, "Numbers.\r\n", To="b@example.org"))
    assert code == 250, (code, reply)
    return reply.decode()


def graph_settings(fake: FakeGraph, senders: tuple[str, ...], **changes: str) -> dict[str, str]:
    """The relay's Graph settings for C{fake}, sending as C{senders}."""
    return {
        "GRAPH_TENANT_ID": fake.tenant,
        "GRAPH_CLIENT_ID": fake.client_id,
        "GRAPH_CLIENT_SECRET": fake.client_secret or "",
        "GRAPH_SENDER": ",".join(senders),
        "GRAPH_AUTHORITY_HOST": fake.endpoint,
        "GRAPH_ENDPOINT": fake.endpoint,
        **changes,
    }


def graph_and_users(
    case: TestCase, mailboxes: tuple[str, ...], users: list[dict[str, object]]
) -> tuple[FakeGraph, str]:
    """A fake Graph with C{mailboxes} (stopped with the test), and an AUTH_CONFIG whose
    one fallback userpass provider C{apps} lists C{users}: the fake and the file's path."""
    fake = FakeGraph(reactor, mailboxes=mailboxes)
    port = fake.listen(reactor)
    case.addCleanup(port.stopListening)
    path = os.path.abspath(case.mktemp())
    provider = {"meta": {"name": "apps", "type": "userpass", "fallback": True}}
    with open(path, "w") as f:
        json.dump({"providers": [{**provider, "params": {"users": users}}]}, f)
    return fake, path


class MailboxTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        users: list[dict[str, object]] = [
            {
                "username": "scanner",
                "password_hash": hash_password("scan-pw", 4),
                "policy": {"mailbox": "Billing@Contoso.example"},
            },
            {"username": "clerk", "password_hash": hash_password("clerk-pw", 4)},
        ]
        self.fake, self.auth_config = graph_and_users(self, (DEFAULT, BILLING), users)

    def graph(self, **changes: str) -> dict[str, str]:
        return graph_settings(self.fake, (DEFAULT, BILLING), **changes)

    def sent_as(self) -> tuple[list[str], list[str]]:
        """The mailbox of each message Graph accepted, and the path of each sendMail request."""
        paths = [seen.path for seen in self.fake.routes("sendMail")]
        return [d.mailbox for d in self.fake.deliveries], paths

    @async_test
    async def test_direct(self) -> None:
        """Without a queue: the identity bound to billing@ sends as billing@ (its URL),
        one without a mailbox as the default, whatever From says."""
        relay = Relay(self, (), AUTH_CONFIG=self.auth_config, **self.graph())

        def scenario() -> tuple[int | None, bytes]:
            relay.wait_listening()
            send_as(relay.smtp_port, "scanner", "scan-pw", "scan 1")
            send_as(relay.smtp_port, "clerk", "clerk-pw", "clerk 1")
            _, err = relay.stop()
            return relay.process.returncode, err

        code, err = await in_thread(scenario)
        self.assertEqual(code, 0, err.decode()[-3000:])
        self.assertEqual(
            self.sent_as(),
            (
                [BILLING, DEFAULT],
                [f"/v1.0/users/{BILLING}/sendMail", f"/v1.0/users/{DEFAULT}/sendMail"],
            ),
        )
        self.assertEqual(self.fake.violations, [])

    @async_test
    async def test_queued_across_a_restart(self) -> None:
        """Queued: the first attempt fails (503), the relay stops with the message queued;
        a second relay without AUTH_CONFIG sends it as billing@, from the queue's record."""
        self.fake.script("sendMail", Fault(503))
        relay = QueuedRelay(
            self,
            QUEUE_RETRY_MIN_INTERVAL="3600",
            GRAPH_SEND_TIMEOUT="0.5",
            AUTH_CONFIG=self.auth_config,
            **self.graph(),
        )

        def scenario() -> None:
            relay.start()
            reply = send_as(relay.port, "scanner", "scan-pw", "scan queued")
            self.assertIn("queued as", reply)
            relay.wait_for("message delivery deferred")
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(scenario)
        self.assertEqual(self.fake.deliveries, [])
        [entry] = relay.command("list")
        self.assertEqual(entry["route"], BILLING)
        self.assertEqual(relay.command("retry", entry["id"])["retried"], True)

        def restart() -> None:
            relay.start(AUTH_CONFIG="")
            relay.wait_for("message delivered")
            self.assertEqual(relay.kill(signal.SIGTERM), 0)

        await in_thread(restart)
        # Both attempts, the refused one and the one after the restart, as billing@.
        self.assertEqual(self.sent_as(), ([BILLING], [f"/v1.0/users/{BILLING}/sendMail"] * 2))
        self.assertEqual(self.fake.violations, [])

    def test_mailbox_outside_graph_sender_stops_start_up(self) -> None:
        """A policy mailbox that is not a GRAPH_SENDER stops start-up with one line naming
        the file, the user and the mailbox (nothing listens, Graph is never asked)."""
        result = run_twistd(
            AUTH_CONFIG=self.auth_config,
            SMTP_LISTEN="127.0.0.1:0",
            HTTP_LISTEN="",
            **self.graph(GRAPH_SENDER=DEFAULT),
        )
        self.assertNotEqual(result.returncode, 0)
        lines = result.stderr.decode().strip().splitlines()
        self.assertEqual(
            lines[-1],
            f"smtpproxy: AUTH_CONFIG {self.auth_config}: provider 'apps' user 'scanner': "
            f"mailbox 'Billing@Contoso.example' is not one of GRAPH_SENDER ({DEFAULT})",
        )
        self.assertEqual(self.fake.requests, [])
