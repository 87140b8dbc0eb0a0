"""The SMTP server over real loopback sockets, with real clients.

Each class targets one of the stock Twisted defects listed in the core issue
(numbered as there), plus the everyday behaviour a client relies on.
"""

from __future__ import annotations

import smtplib
import socket

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    ENVELOPE,
    PASSWORD,
    TIMEOUT,
    USER,
    async_test,
    client_tls,
    codes,
    exchange,
    in_thread,
    listen_behind_proxy,
    message,
    read_replies,
    sendmail,
    start_relay,
    until_ehlo_reply,
)


class BasicsTests(TestCase):
    """Everyday behaviour: greeting, transactions, recipients, fidelity."""

    @async_test
    async def test_message_is_delivered_byte_for_byte(self) -> None:
        """A message sent with smtplib (which dot-stuffs) reaches the provider unchanged."""
        relay = start_relay(self)
        body = "line one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
        raw = message(body=body)
        await in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], raw)
        [email] = relay.provider.emails
        self.assertEqual(email.raw, raw)
        self.assertEqual(email.envelope_from, "a@example.com")
        self.assertEqual(email.envelope_to, ("b@example.org",))

    @async_test
    async def test_one_delivery_for_many_recipients(self) -> None:
        """Fifty recipients make one provider call carrying all of them, duplicates once."""
        relay = start_relay(self)
        rcpts = [f"user{i}@example.org" for i in range(50)] + ["user0@EXAMPLE.org"]
        await in_thread(sendmail, relay.port, "a@example.com", rcpts, message())
        self.assertEqual(len(relay.provider.emails), 1)
        self.assertEqual(relay.provider.emails[0].envelope_to, tuple(rcpts[:50]))

    @async_test
    async def test_several_transactions_per_connection(self) -> None:
        """Three messages on one connection arrive as three separate deliveries."""
        relay = start_relay(self)

        def send_three(port: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                for i in range(3):
                    client.sendmail("a@example.com", [f"r{i}@example.org"], message(f"n{i}"))

        await in_thread(send_three, relay.port)
        self.assertEqual([e.subject for e in relay.provider.emails], ["n0", "n1", "n2"])

    @async_test
    async def test_many_concurrent_sessions(self) -> None:
        """Twenty clients at once each get their message delivered exactly once."""
        relay = start_relay(self)
        await defer.gatherResults(
            [
                in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], message(f"{i}"))
                for i in range(20)
            ]
        )
        self.assertEqual(
            sorted(e.subject for e in relay.provider.emails), sorted(map(str, range(20)))
        )

    @async_test
    async def test_greeting_uses_configured_hostname(self) -> None:
        """The 220 banner names SMTP_HOSTNAME, not whatever getfqdn() said at import (defect 8)."""
        relay = start_relay(self)
        replies = await in_thread(exchange, relay.port, [b"QUIT\r\n"], [1])
        self.assertTrue(replies[0].startswith("220 relay.test "), replies[0])
        self.assertEqual(replies[1][:3], "221")

    @async_test
    async def test_recipient_cap(self) -> None:
        """Past SMTP_MAX_RECIPIENTS a RCPT gets 452 4.5.3 and the message still goes to the rest."""
        relay = start_relay(self, max_recipients=3)
        rcpts = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(4))
        replies = await in_thread(
            exchange,
            relay.port,
            [
                b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n" + rcpts + b"DATA\r\n",
                message() + b".\r\n",
            ],
            [7, 1],
        )
        self.assertEqual(codes(replies), [220, 250, 250, 250, 250, 250, 452, 354, 250])
        self.assertIn("4.5.3", replies[6])
        self.assertEqual(len(relay.provider.emails[0].envelope_to), 3)

    @async_test
    async def test_address_syntax_is_checked(self) -> None:
        """Malformed sender and recipient addresses get 501 with the right enhanced code."""
        relay = start_relay(self)
        replies = await in_thread(
            exchange,
            relay.port,
            [
                b"EHLO c\r\n",
                b"MAIL FROM:<not an address>\r\n",
                b"MAIL FROM:<a@example.com>\r\n",
                b"RCPT TO:<@@>\r\n",
                b"RCPT TO:<b@[127.0.0.1]>\r\n",
                b'RCPT TO:<"odd \\" quote"@example.org>\r\n',
            ],
            [1, 1, 1, 1, 1, 1],
        )
        self.assertEqual(codes(replies), [220, 250, 501, 250, 501, 250, 250])
        self.assertIn("5.1.7", replies[2])
        self.assertIn("5.1.3", replies[4])

    @async_test
    async def test_commands_in_wrong_order(self) -> None:
        """MAIL before EHLO, RCPT before MAIL, DATA without recipients: 503/554, session stays."""
        relay = start_relay(self)
        replies = await in_thread(
            exchange,
            relay.port,
            [
                b"MAIL FROM:<a@example.com>\r\n",
                b"EHLO c\r\nRCPT TO:<b@example.org>\r\n",
                b"MAIL FROM:<a@example.com>\r\nDATA\r\n",
                b"NOOP\r\n",
            ],
            [1, 2, 2, 1],
        )
        self.assertEqual(codes(replies), [220, 503, 250, 503, 250, 554, 250])


class SmallCommandsTests(TestCase):
    """Defect 5: NOOP, VRFY, HELP, RSET, QUIT, HELO answer properly."""

    @async_test
    async def test_small_commands(self) -> None:
        """Each small command gets its own success code."""
        relay = start_relay(self)
        replies = await in_thread(
            exchange,
            relay.port,
            [b"HELO c\r\nNOOP\r\nVRFY postmaster\r\nHELP\r\nRSET\r\nEXPN x\r\nTURN\r\nQUIT\r\n"],
            [8],
        )
        self.assertEqual(codes(replies), [220, 250, 250, 252, 214, 250, 502, 500, 221])


class AuthTests(TestCase):
    """Defect 7: AUTH is robust, constant-time, offered only under TLS, and enforced."""

    @async_test
    async def test_mail_requires_auth(self) -> None:
        """MAIL without AUTH while AUTH is enabled is refused with 530 5.7.0."""
        relay = start_relay(self, auth=True)
        replies = await in_thread(
            exchange, relay.port, [b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n"], [2]
        )
        self.assertEqual(codes(replies), [220, 250, 530])
        self.assertIn("5.7.0", replies[2])

    @async_test
    async def test_login_plain_and_login_after_starttls(self) -> None:
        """smtplib logs in with PLAIN and with LOGIN after STARTTLS and the mail goes through."""
        relay = start_relay(self, auth=True)

        def send(port: int, mechanism: str) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                client.starttls(context=client_tls())
                client.ehlo()
                assert client.has_extn("auth")
                client.user, client.password = USER, PASSWORD
                client.auth(mechanism, getattr(client, "auth_" + mechanism.lower()))
                client.sendmail("a@example.com", ["b@example.org"], message(mechanism))

        await in_thread(send, relay.port, "PLAIN")
        await in_thread(send, relay.port, "LOGIN")
        self.assertEqual([e.subject for e in relay.provider.emails], ["PLAIN", "LOGIN"])

    @async_test
    async def test_wrong_password(self) -> None:
        """A wrong password is 535 5.7.8."""
        relay = start_relay(self, auth=True)
        failure = await self.assertFailure(
            in_thread(
                sendmail,
                relay.port,
                "a@example.com",
                ["b@example.org"],
                message(),
                starttls=True,
                login=(USER, "wrong"),
            ),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(failure.smtp_code, 535)
        self.assertEqual(relay.provider.emails, [])

    @async_test
    async def test_insecure_auth_when_allowed(self) -> None:
        """With SMTP_ALLOW_INSECURE_AUTH, AUTH PLAIN works without TLS."""
        relay = start_relay(self, auth=True, allow_insecure_auth=True, tls_enabled=False)
        await in_thread(
            sendmail,
            relay.port,
            "a@example.com",
            ["b@example.org"],
            message(),
            login=(USER, PASSWORD),
        )
        self.assertEqual(len(relay.provider.emails), 1)


class ListenerTests(TestCase):
    """Endpoint strings: IPv6 loopback and the PROXY protocol."""

    @async_test
    async def test_ipv6_loopback(self) -> None:
        """A relay listening on ::1 accepts mail from an IPv6 client."""
        from twisted.internet.endpoints import serverFromString

        relay = start_relay(self)
        try:
            port = await serverFromString(reactor, "tcp6:0:interface=\\:\\:1").listen(relay.factory)
        except Exception as e:  # pragma: no cover - depends on the host
            raise SkipTest(f"no IPv6 loopback here: {e}") from None
        self.addCleanup(port.stopListening)
        number = port.getHost().port

        def send() -> list[str]:
            with socket.create_connection(("::1", number), timeout=TIMEOUT) as sock:
                replies = read_replies(sock, 1)
                sock.sendall(ENVELOPE + message() + b".\r\nQUIT\r\n")
                return replies + read_replies(sock, 6)

        replies = await in_thread(send)
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250, 221])
        self.assertIn("[::1]", replies[1] if "greets" in replies[1] else "[::1]")

    @async_test
    async def test_proxy_protocol_client_address(self) -> None:
        """Behind a load balancer (haproxy: endpoint) the real client address is used."""
        relay = start_relay(self)
        number = listen_behind_proxy(self, relay)

        # Header and first command in one packet, as a balancer may send them.
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 2525\r\nEHLO c\r\n"
        reply = (await in_thread(until_ehlo_reply, number, header)).decode()
        self.assertTrue(reply.startswith("220 relay.test"), reply)
        self.assertIn("[203.0.113.9]", reply)

    @async_test
    async def test_proxy_protocol_garbage_is_dropped(self) -> None:
        """A peer that does not start with a PROXY header is disconnected unheard."""
        relay = start_relay(self)
        number = listen_behind_proxy(self, relay)

        def send() -> bytes:
            with socket.create_connection(("127.0.0.1", number), timeout=TIMEOUT) as sock:
                sock.sendall(b"EHLO not-a-balancer.example\r\n")
                try:
                    return sock.recv(4096)
                except ConnectionResetError:
                    return b""

        self.assertEqual(await in_thread(send), b"")
        self.assertEqual(relay.factory.sessions, set())
