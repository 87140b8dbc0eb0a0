"""Security regression suite, part 1: who may relay, and abuse limits.

Each test is named for the control it proves (SEC-nnn); docs/security.md
maps threats to controls, settings and these tests.  Client addresses other
than loopback are presented the way a load balancer does, through the PROXY
protocol, so the real policy code sees a real public address.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from typing import cast

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.config import load
from smtpproxy.delivery import RelayRealm
from smtpproxy.policy import rules as policy
from smtpproxy.policy.guard import Guard, settings_from
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.smtp.sasl import StaticPasswordChecker
from tests.support import (
    OPEN,
    PASSWORD,
    TIMEOUT,
    USER,
    RecordingProvider,
    Relay,
    async_test,
    codes,
    exchange,
    guard_defaults,
    in_thread,
    listen_behind_proxy,
    message,
    read_replies,
    session_defaults,
    start_relay,
)

PRIVATE = guard_defaults()  # the zero-config default: private networks, no AUTH
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"


def via_proxy(port: int, client: str, data: bytes, replies: int) -> list[str]:
    """Connect as if from C{client} through a PROXY-protocol balancer."""
    family = "TCP6" if ":" in client else "TCP4"
    local = "::1" if ":" in client else "127.0.0.1"
    header = f"PROXY {family} {client} {local} 40000 2525\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(header + data)
        return read_replies(sock, replies)


class NetworkPolicyTests(TestCase):
    @async_test
    async def test_SEC_001_public_client_refused_by_default(self) -> None:
        """SEC-001: with zero config a client from a public address gets 554 5.7.1 at connect."""
        relay = start_relay(self, guard=PRIVATE)
        port = listen_behind_proxy(self, relay)
        replies = await in_thread(via_proxy, port, "203.0.113.9", b"EHLO c\r\n", 2)
        self.assertEqual(codes(replies), [554])
        self.assertIn("5.7.1", replies[0])
        self.assertEqual(relay.factory.sessions, set())

    @async_test
    async def test_SEC_002_private_clients_relay_by_default(self) -> None:
        """SEC-002: loopback, RFC 1918 and ULA clients may relay with zero config."""
        relay = start_relay(self, guard=PRIVATE)
        port = listen_behind_proxy(self, relay)
        for client in ("10.1.2.3", "192.168.0.7", "172.20.0.1", "fd00::5"):
            replies = await in_thread(via_proxy, port, client, ENVELOPE, 4)
            self.assertEqual(codes(replies), [220, 250, 250, 250], client)

    @async_test
    async def test_SEC_003_explicit_networks(self) -> None:
        """SEC-003: SMTP_ALLOWED_NETWORKS narrows who may connect, also for loopback."""
        guard = guard_defaults(allowed_networks=policy.parse_networks("10.0.0.0/8"))
        relay = start_relay(self, guard=guard)
        replies = await in_thread(exchange, relay.port, [], [])
        self.assertEqual(codes(replies), [554])

    @async_test
    async def test_SEC_004_auth_required_except_trusted(self) -> None:
        """SEC-004: with AUTH on, MAIL needs AUTH (530) unless the client is in trusted networks."""
        guard = dataclasses.replace(
            OPEN,
            auth_enabled=True,
            trusted_networks=policy.parse_networks("10.9.0.0/16"),
        )
        relay = start_relay(self, auth=True, guard=guard)
        port = listen_behind_proxy(self, relay)
        outsider = await in_thread(via_proxy, port, "198.51.100.4", ENVELOPE, 4)
        trusted = await in_thread(via_proxy, port, "10.9.1.1", ENVELOPE, 4)
        self.assertEqual(codes(outsider), [220, 250, 530, 503])
        self.assertEqual(codes(trusted), [220, 250, 250, 250])


class AddressPolicyTests(TestCase):
    @async_test
    async def test_SEC_005_sender_and_recipient_lists(self) -> None:
        """SEC-005: senders and recipients outside the allowed lists get 550 5.7.1."""
        guard = dataclasses.replace(
            OPEN,
            allowed_senders=policy.parse_address_patterns("@example.com"),
            allowed_recipients=policy.parse_address_patterns("ops@example.org"),
        )
        relay = start_relay(self, guard=guard)
        replies = await in_thread(
            exchange,
            relay.port,
            [
                b"EHLO c\r\nMAIL FROM:<x@evil.example>\r\n",
                b"MAIL FROM:<x@example.com>\r\nRCPT TO:<ceo@example.org>\r\n",
                b"RCPT TO:<OPS@example.org>\r\n",
            ],
            [2, 2, 1],
        )
        self.assertEqual(codes(replies), [220, 250, 550, 250, 550, 250])
        self.assertIn("5.7.1", replies[2])


class LimitTests(TestCase):
    @async_test
    async def test_SEC_006_connection_caps(self) -> None:
        """SEC-006: past the per-address cap a new connection gets 421 4.7.0."""
        guard = dataclasses.replace(OPEN, max_connections_per_ip=2, max_connections=3)
        relay = start_relay(self, guard=guard)

        def hold_and_try(port: int) -> list[str]:
            held = [
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(2)
            ]
            try:
                replies = [read_replies(s, 1)[0] for s in held]
                replies += exchange(port, [], [])
            finally:
                for s in held:
                    s.close()
            return replies

        replies = await in_thread(hold_and_try, relay.port)
        self.assertEqual(codes(replies), [220, 220, 421])
        self.assertIn("4.7.0", replies[2])

    @async_test
    async def test_SEC_007_rate_limit_defers_never_drops(self) -> None:
        """SEC-007: over SMTP_RATE_LIMIT_PER_IP, MAIL gets 450 4.7.1 and nothing is delivered."""
        guard = dataclasses.replace(OPEN, rate_limit_per_ip=2)
        relay = start_relay(self, guard=guard)
        transaction = ENVELOPE[len(b"EHLO c\r\n") :] + b"DATA\r\n" + message() + b".\r\n"
        replies = await in_thread(
            exchange,
            relay.port,
            [b"EHLO c\r\n", transaction, transaction, b"MAIL FROM:<a@example.com>\r\n"],
            [1, 4, 4, 1],
        )
        self.assertEqual(codes(replies[-1:]), [450])
        self.assertIn("4.7.1", replies[-1])
        self.assertEqual(len(relay.provider.emails), 2)


def over_unix_socket(path: str, sends: list[bytes], replies_after_each: list[int]) -> list[str]:
    """L{exchange} over a UNIX socket: smtplib cannot connect to one, raw lines can."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        out = read_replies(sock, 1)
        for data, count in zip(sends, replies_after_each, strict=True):
            sock.sendall(data)
            out += read_replies(sock, count)
        return out


class UnixListenerTests(TestCase):
    """Issue 10: a unix: listener admits its clients as loopback would be admitted.

    Before, the peer of a UNIX socket matched no network, so every client was
    refused (554) unless AUTH was on, and no setting could change that.
    """

    def listen_unix(self, relay: Relay) -> str:
        """Also serve C{relay} on a UNIX socket in a fresh directory; return its path."""
        from twisted.internet import reactor

        # A socket path may be 107 bytes at most: trial's working directory
        # can be deeper than that, the system temp directory is not.
        directory = tempfile.mkdtemp(prefix="smtpproxy-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = os.path.join(directory, "smtp.sock")
        port = IReactorUNIX(reactor).listenUNIX(path, relay.factory)
        self.addCleanup(port.stopListening)
        return path

    @async_test
    async def test_zero_config_relays_like_loopback(self) -> None:
        """With the zero-config policy (private networks, no AUTH), a client on the socket
        is greeted, relays a message that is delivered, and is named "unix"."""
        relay = start_relay(self, guard=PRIVATE)
        path = self.listen_unix(relay)
        transaction = ENVELOPE + b"DATA\r\n" + message() + b".\r\nQUIT\r\n"
        replies = await in_thread(over_unix_socket, path, [transaction], [6])
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual(len(relay.provider.emails), 1)
        [email] = relay.provider.emails
        self.assertEqual(email.envelope_to, ("b@example.org",))

    @async_test
    async def test_ehlo_names_the_socket_client(self) -> None:
        """The EHLO reply (and so the logs) name the client "unix", not a Python repr."""
        relay = start_relay(self, guard=PRIVATE)
        path = self.listen_unix(relay)
        replies = await in_thread(over_unix_socket, path, [b"HELO c\r\n"], [1])
        self.assertEqual(replies[1], "250 relay.test greets c [unix]")

    @async_test
    async def test_SEC_068_networks_without_loopback_refuse_it(self) -> None:
        """SMTP_ALLOWED_NETWORKS without 127.0.0.1 refuses socket clients as it refuses
        loopback ones (554 5.7.1)."""
        guard = guard_defaults(allowed_networks=policy.parse_networks("10.0.0.0/8"))
        relay = start_relay(self, guard=guard)
        path = self.listen_unix(relay)
        replies = await in_thread(over_unix_socket, path, [], [])
        self.assertEqual(codes(replies), [554])

    @async_test
    async def test_auth_on_needs_auth_unless_loopback_trusted(self) -> None:
        """With AUTH on, a socket client must authenticate (530), unless
        SMTP_TRUSTED_NETWORKS holds 127.0.0.1, as for a loopback client."""
        with_auth = dataclasses.replace(OPEN, auth_enabled=True)
        needs_auth = start_relay(self, auth=True, guard=with_auth)
        replies = await in_thread(over_unix_socket, self.listen_unix(needs_auth), [ENVELOPE], [3])
        self.assertEqual(codes(replies), [220, 250, 530, 503])
        trusted = dataclasses.replace(
            OPEN, auth_enabled=True, trusted_networks=policy.parse_networks("127.0.0.1")
        )
        relay = start_relay(self, auth=True, guard=trusted)
        replies = await in_thread(over_unix_socket, self.listen_unix(relay), [ENVELOPE], [3])
        self.assertEqual(codes(replies), [220, 250, 250, 250])


class RefusalBudgetTests(TestCase):
    """Issue 10: policy refusals have their own budget, apart from SMTP_MAX_ERRORS.

    Before, a recipient refused by the allow-list counted as a client error,
    so a message with many refused recipients got the session cut off with
    421 after SMTP_MAX_ERRORS of them, and its allowed recipients nothing.
    """

    ALLOW_OPS = dataclasses.replace(
        OPEN, allowed_recipients=policy.parse_address_patterns("ops@example.org")
    )

    @staticmethod
    def transaction(refused: int) -> tuple[bytes, int]:
        """MAIL, C{refused} refused RCPTs, one allowed RCPT, DATA and the message."""
        rcpts = b"".join(b"RCPT TO:<x%d@example.net>\r\n" % i for i in range(refused))
        data = (
            b"MAIL FROM:<a@example.com>\r\n"
            + rcpts
            + b"RCPT TO:<ops@example.org>\r\nDATA\r\n"
            + message()
            + b".\r\n"
        )
        return data, refused + 4

    @async_test
    async def test_refused_recipients_do_not_spend_the_error_budget(self) -> None:
        """With SMTP_MAX_ERRORS=3, ten refused recipients each get 550 5.7.1, and the
        allowed one still gets the message."""
        relay = start_relay(self, guard=self.ALLOW_OPS, max_errors=3)
        data, count = self.transaction(10)
        replies = await in_thread(exchange, relay.port, [b"EHLO c\r\n", data], [1, count])
        self.assertEqual(codes(replies), [220, 250, 250] + [550] * 10 + [250, 354, 250])
        self.assertEqual([e.envelope_to for e in relay.provider.emails], [("ops@example.org",)])

    @async_test
    async def test_SEC_067_refusals_have_their_own_cap(self) -> None:
        """SMTP_MAX_REFUSALS refusals without a delivered message close the session with
        421 4.7.0, so a client probing the allow-list is still cut off."""
        relay = start_relay(self, guard=self.ALLOW_OPS, max_refusals=5)
        rcpts = b"".join(b"RCPT TO:<x%d@example.net>\r\n" % i for i in range(8))
        replies = await in_thread(
            exchange, relay.port, [b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n" + rcpts], [7]
        )
        self.assertEqual(codes(replies), [220, 250, 250, 550, 550, 550, 550, 421])
        self.assertIn("4.7.0 Too many refused commands", replies[-1])

    @async_test
    async def test_auth_and_rate_refusals_use_the_same_budget(self) -> None:
        """530 before AUTH and 450 over the rate limit are refusals too: they do not spend
        SMTP_MAX_ERRORS, and SMTP_MAX_REFUSALS of them close the session."""
        with_auth = dataclasses.replace(OPEN, auth_enabled=True)
        relay = start_relay(self, auth=True, guard=with_auth, max_errors=2, max_refusals=4)
        mail = b"MAIL FROM:<a@example.com>\r\n"
        replies = await in_thread(exchange, relay.port, [b"EHLO c\r\n" + mail * 5], [5])
        self.assertEqual(codes(replies), [220, 250, 530, 530, 530, 421])
        limited = dataclasses.replace(OPEN, rate_limit_per_ip=1)
        relay = start_relay(self, guard=limited, max_errors=2)
        first = b"MAIL FROM:<a@example.com>\r\nRSET\r\n"
        replies = await in_thread(exchange, relay.port, [b"EHLO c\r\n" + first + mail * 3], [6])
        self.assertEqual(codes(replies), [220, 250, 250, 250, 450, 450, 450])

    @async_test
    async def test_a_delivered_message_renews_the_budget(self) -> None:
        """The count is of refusals without a delivered message: a long session sending
        many messages, each with a few refused recipients, is never cut off."""
        relay = start_relay(self, guard=self.ALLOW_OPS, max_refusals=3)
        data, count = self.transaction(2)
        replies = await in_thread(
            exchange, relay.port, [b"EHLO c\r\n"] + [data] * 5, [1] + [count] * 5
        )
        self.assertNotIn(421, codes(replies))
        self.assertEqual(len(relay.provider.emails), 5)

    @async_test
    async def test_client_errors_still_counted_apart(self) -> None:
        """Bad commands still close the session after SMTP_MAX_ERRORS, refusals between
        them neither adding to nor resetting that count."""
        relay = start_relay(self, guard=self.ALLOW_OPS, max_errors=3)
        bad = b"BOGUS\r\n"
        refused = b"RCPT TO:<x@example.net>\r\n"
        sends = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n" + bad + refused * 3 + bad + bad
        replies = await in_thread(exchange, relay.port, [sends], [8])
        self.assertEqual(codes(replies), [220, 250, 250, 500, 550, 550, 550, 500, 421])
        self.assertIn("Too many errors", replies[-1])


class ClockedAuthTests(SynchronousTestCase):
    """AUTH abuse, with time under test control."""

    def setUp(self) -> None:
        self.clock = Clock()
        portal = Portal(RelayRealm(RecordingProvider(), self.clock))
        portal.registerChecker(AllowAnonymousAccess())
        portal.registerChecker(StaticPasswordChecker(USER, PASSWORD))
        settings = session_defaults(auth_enabled=True, allow_insecure_auth=True)
        guard = Guard(
            dataclasses.replace(OPEN, auth_enabled=True, auth_ban_failures=10, auth_ban_time=600),
            self.clock,
        )
        self.factory = RelayFactory(settings, portal, None, self.clock, guard)

    def connect(self) -> tuple[RelayProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.20", 4000))
        protocol.makeConnection(transport)
        return protocol, transport

    def replies(self, transport: StringTransport) -> list[int]:
        lines = transport.value().split(b"\r\n")
        return [int(line[:3]) for line in lines if len(line) > 3 and line[3:4] == b" "]

    def fail_login(self, protocol: RelayProtocol) -> None:
        # base64 of "\0relay-user\0wrong"
        protocol.dataReceived(b"AUTH PLAIN AHJlbGF5LXVzZXIAd3Jvbmc=\r\n")

    def test_SEC_008_failed_auth_slows_then_closes(self) -> None:
        """SEC-008: 535 at once, then after a growing delay; the third failure: 421, close."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"EHLO c\r\n")
        self.fail_login(protocol)
        self.assertEqual(self.replies(transport), [220, 250, 535])
        self.fail_login(protocol)
        self.assertEqual(self.replies(transport), [220, 250, 535])
        self.clock.advance(1)
        self.assertEqual(self.replies(transport), [220, 250, 535, 535])
        self.fail_login(protocol)
        self.clock.advance(2)
        self.assertEqual(self.replies(transport), [220, 250, 535, 535, 421])
        self.assertTrue(transport.disconnecting)

    def test_SEC_009_address_lockout(self) -> None:
        """SEC-009: ten failures in ten minutes block the address (421 at connect) a while."""
        for _ in range(4):
            protocol, transport = self.connect()
            protocol.dataReceived(b"EHLO c\r\n")
            for _ in range(3):
                self.fail_login(protocol)
                self.clock.advance(5)
            protocol.connectionLost(None)
        protocol, transport = self.connect()
        self.assertEqual(self.replies(transport), [421])
        protocol.connectionLost(None)
        self.clock.advance(601)
        protocol, transport = self.connect()
        self.assertEqual(self.replies(transport), [220])

    def test_SEC_010_passwords_never_logged(self) -> None:
        """SEC-010: failed and successful logins log the user and address, never the password."""
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        protocol, _ = self.connect()
        protocol.dataReceived(b"EHLO c\r\n")
        self.fail_login(protocol)
        protocol.dataReceived(b"AUTH PLAIN AHJlbGF5LXVzZXIAczNjcmV0LVBhNTU=\r\n")
        text = repr(events)
        self.assertIn("relay-user", text)
        self.assertIn("198.51.100.20", text)
        self.assertNotIn("wrong", text)
        self.assertNotIn(PASSWORD, text)


class StartupPolicyTests(SynchronousTestCase):
    def test_SEC_011_defaults_are_closed(self) -> None:
        """SEC-011: zero config allows private networks only; AUTH on opens connect, not relay."""
        closed = settings_from(load({}, fqdn=lambda: "h.example"))
        self.assertFalse(policy.address_in("203.0.113.1", closed.allowed_networks))
        self.assertTrue(policy.address_in("192.168.1.1", closed.allowed_networks))
        self.assertFalse(policy.is_public_exposure(closed.allowed_networks))
        with_auth = settings_from(
            load({"SMTP_USERNAME": "u", "SMTP_PASSWORD": "p"}, fqdn=lambda: "h.example")
        )
        self.assertTrue(policy.is_public_exposure(with_auth.allowed_networks))
        self.assertTrue(with_auth.auth_enabled)
