"""Review 8, finding 8: with Graph, From must not choose a mailbox allowed_senders forbid.

An identity limited to C{allowed_senders: [scanner@contoso.example]} and bound to no
C{mailbox} passed the envelope check at MAIL, but the Graph provider chooses the
sending mailbox from the From header: C{From: billing@contoso.example} had the message
sent as the billing mailbox.  The pure rule is tested without sockets; the wire test
runs the real C{twistd smtpproxy} (direct and queued) against the fake Graph of
L{tests.fakegraph}.
"""

from __future__ import annotations

import smtplib

from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.addresses import Mailbox
from smtpproxy.identities.userpass import hash_password
from smtpproxy.policy.fromsender import HEAD_BYTES, from_rule, head_of
from smtpproxy.policy.identity import parse_policy
from tests.identities.test_twistd_mailbox import graph_and_users, graph_settings
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, client_tls, in_thread, message
from tests.test_twistd import Relay

SCANNER = "scanner@contoso.example"
BILLING = "billing@contoso.example"
SENDERS = (SCANNER, BILLING)


class FromRuleTests(SynchronousTestCase):
    def test_from_naming_a_forbidden_mailbox_is_refused(self) -> None:
        """From naming a GRAPH_SENDER mailbox outside the login's allowed_senders is a
        550 5.7.1 naming that mailbox; its own mailbox (any case), or an address that is
        no configured mailbox, passes."""
        rule = from_rule(parse_policy({"allowed_senders": [SCANNER]}), SENDERS)
        assert rule is not None
        refusal = rule.refusal([Mailbox("Billing", "Billing@Contoso.example")])
        assert refusal is not None
        self.assertEqual((refusal.code, refusal.status), (550, "5.7.1"))
        self.assertIn(BILLING, refusal.reason)
        self.assertIsNone(rule.refusal([Mailbox("", "SCANNER@contoso.example")]))
        self.assertIsNone(rule.refusal([Mailbox("", "someone@example.org")]))
        self.assertIsNone(rule.refusal([]))
        # The first From mailbox that is a configured one decides, as for Graph.
        self.assertIsNotNone(rule.refusal([Mailbox("", "x@example.org"), Mailbox("", BILLING)]))

    def test_no_rule_where_from_cannot_widen_anything(self) -> None:
        """No rule without Graph (no mailboxes), for a login bound to a mailbox, or for one
        without allowed_senders of its own."""
        limited = parse_policy({"allowed_senders": [SCANNER]})
        self.assertIsNone(from_rule(limited, None))
        bound = parse_policy({"allowed_senders": [SCANNER], "mailbox": SCANNER})
        self.assertIsNone(from_rule(bound, SENDERS))
        self.assertIsNone(from_rule(parse_policy({"rate_limit_per_min": 5}), SENDERS))

    def test_head_of_stops_at_the_blank_line_and_the_bound(self) -> None:
        """The header block is cut at the first blank line (CRLF or LF, even split across
        chunks), and never longer than HEAD_BYTES when there is none."""
        self.assertEqual(head_of([b"From: a\r", b"\n\r", b"\nbody\r\n\r\n"]), b"From: a\r\n\r\n")
        self.assertEqual(head_of([b"From: a\n\nbody"]), b"From: a\n\n")
        endless = head_of(iter(lambda: b"X-A: b\r\n", None))
        self.assertEqual(len(endless), HEAD_BYTES)


def send(port: int, sender: str, from_header: str) -> tuple[int, str]:
    """STARTTLS, AUTH PLAIN as the limited scanner, one message: the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.starttls(context=client_tls())
        client.ehlo("client.test")
        client.login("scanner", "scan-pw")
        client.mail(sender)
        client.rcpt("b@example.org")
        code, reply = client.data(
            message("scan", "Numbers.\r\n", From=from_header, To="b@example.org")
        )
    return code, reply.decode()


class FromMailboxOnTheWireTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        users: list[dict[str, object]] = [
            {
                "username": "scanner",
                "password_hash": hash_password("scan-pw", 4),
                "policy": {"allowed_senders": [SCANNER]},
            }
        ]
        self.fake, auth_config = graph_and_users(self, SENDERS, users)
        self.settings = graph_settings(self.fake, SENDERS, AUTH_CONFIG=auth_config)

    @async_test
    async def test_direct_from_cannot_choose_another_mailbox(self) -> None:
        """Direct mode: From billing@ gets 550 5.7.1 at the end of DATA and Graph is never
        asked to send as billing@; From scanner@ is sent as scanner@."""
        relay = Relay(self, (), **self.settings)

        def scenario() -> tuple[tuple[int, str], tuple[int, str], bytes]:
            relay.wait_listening()
            forged = send(relay.smtp_port, SCANNER, f"Billing <{BILLING}>")
            own = send(relay.smtp_port, SCANNER, SCANNER)
            _, err = relay.stop()
            return forged, own, err

        forged, own, err = await in_thread(scenario)
        self.assertEqual(forged[0], 550, err.decode()[-3000:])
        self.assertIn("5.7.1", forged[1])
        self.assertIn(BILLING, forged[1])
        self.assertEqual(own[0], 250, err.decode()[-3000:])
        self.assertEqual([d.mailbox for d in self.fake.deliveries], [SCANNER])
        self.assertEqual(self.fake.violations, [])

    @async_test
    async def test_queued_from_cannot_choose_another_mailbox(self) -> None:
        """Queue mode: the same refusal at the end of DATA, before anything is stored."""
        relay = QueuedRelay(self, **self.settings)

        def scenario() -> tuple[int, str]:
            relay.start()
            forged = send(relay.port, SCANNER, BILLING)
            relay.kill()
            return forged

        code, reply = await in_thread(scenario)
        self.assertEqual(code, 550)
        self.assertIn("5.7.1", reply)
        self.assertEqual(relay.command("list"), [])
        self.assertEqual(self.fake.deliveries, [])
