"""Security regression suite, part 2: the stock Twisted ESMTP defects.

Each test is named for its control in docs/security.md; the classes follow
the numbered defects of the core issue.  Real sockets, real clients.
"""

from __future__ import annotations

import smtplib
import socket
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from tests.support import (
    ENVELOPE,
    TIMEOUT,
    async_test,
    client_tls,
    codes,
    exchange,
    in_thread,
    message,
    read_replies,
    sendmail,
    start_relay,
)


class DeliveryFailureTests(TestCase):
    """Defect 1: provider failures reach the client as 4xx or 5xx, never a blanket 550."""

    @async_test
    async def test_SEC_012_transient_failure_is_451(self) -> None:
        """A transient provider failure answers 451 with a 4.x.x code: the client retries."""
        relay = start_relay(self)
        relay.provider.outcomes.append(TransientDeliveryError("backend busy", "4.4.1"))
        failure = await self.assertFailure(
            in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], message()),
            smtplib.SMTPDataError,
        )
        self.assertEqual(failure.smtp_code, 451)
        self.assertIn(b"4.4.1 backend busy", failure.smtp_error)

    @async_test
    async def test_SEC_013_permanent_failure_is_5xx(self) -> None:
        """A permanent provider failure answers 554 with the provider's reason."""
        relay = start_relay(self)
        relay.provider.outcomes.append(PermanentDeliveryError("Graph ErrorInvalidRecipients: no"))
        failure = await self.assertFailure(
            in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], message()),
            smtplib.SMTPDataError,
        )
        self.assertEqual(failure.smtp_code, 554)
        self.assertIn(b"5.6.0 Graph ErrorInvalidRecipients", failure.smtp_error)

    @async_test
    async def test_SEC_014_unexpected_exception_is_451(self) -> None:
        """A provider bug (any other exception) is logged and answered 451, not 550."""
        relay = start_relay(self)
        relay.provider.outcomes.append(ZeroDivisionError("bug"))
        failure = await self.assertFailure(
            in_thread(sendmail, relay.port, "a@example.com", ["b@example.org"], message()),
            smtplib.SMTPDataError,
        )
        self.assertEqual(failure.smtp_code, 451)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn(b"bug", failure.smtp_error)


class PipeliningTests(TestCase):
    """Defect 2: replies are serialised; nothing overtakes the DATA reply."""

    @async_test
    async def test_SEC_015_quit_pipelined_after_dot_waits(self) -> None:
        """With a slow provider, '.' then QUIT in one packet answers 250 before 221."""
        relay = start_relay(self)
        slow: defer.Deferred[None] = defer.Deferred()
        relay.provider.outcomes.append(slow)
        reactor.callLater(0.2, slow.callback, None)
        replies = await in_thread(
            exchange, relay.port, [ENVELOPE, message() + b".\r\nQUIT\r\n"], [4, 2]
        )
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250, 221])

    @async_test
    async def test_SEC_016_whole_transaction_in_one_write(self) -> None:
        """A client that pipelines everything, body included, gets every reply in order."""
        relay = start_relay(self)
        data = ENVELOPE + message() + b".\r\n" + ENVELOPE[len(b"EHLO client.test\r\n") :]
        data += message("second") + b".\r\nQUIT\r\n"
        replies = await in_thread(exchange, relay.port, [data], [10])
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221])
        self.assertEqual([e.subject for e in relay.provider.emails], ["Hello", "second"])

    @async_test
    async def test_SEC_017_ehlo_advertises_extensions(self) -> None:
        """EHLO lists PIPELINING, SIZE with the limit, 8BITMIME, ENHANCEDSTATUSCODES, STARTTLS."""
        relay = start_relay(self, max_message_size=1000)

        def ehlo(port: int) -> dict[str, str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                client.ehlo()
                return dict(client.esmtp_features)

        features = await in_thread(ehlo, relay.port)
        self.assertEqual(features["size"], "1000")
        for name in ("pipelining", "8bitmime", "enhancedstatuscodes", "starttls"):
            self.assertIn(name, features)
        self.assertNotIn("auth", features)


class DataPhaseTests(TestCase):
    """Defect 3 and 6: DATA never leaves early, memory is bounded, size is enforced."""

    @async_test
    async def test_SEC_018_long_line_stays_in_data(self) -> None:
        """A 200 KB line followed by text that looks like commands is all message body."""
        relay = start_relay(self)
        body = b"x" * 200_000 + b"\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n"
        replies = await in_thread(
            exchange, relay.port, [ENVELOPE, message().rstrip(b"\r\n") + body + b".\r\n"], [4, 1]
        )
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250])
        [email] = relay.provider.emails
        self.assertIn(b"MAIL FROM:<evil@example.com>", email.raw)

    @async_test
    async def test_SEC_019_bare_lf_dot_does_not_end_data(self) -> None:
        """'LF . LF' and 'CR . CR' are content, not the end marker (SMTP smuggling)."""
        relay = start_relay(self)
        smuggled = b"Body\n.\nMAIL FROM:<evil@example.com>\r\n\r.\rRCPT TO:<x@example.com>\r\n"
        replies = await in_thread(
            exchange, relay.port, [ENVELOPE, message(body="") + smuggled + b".\r\n"], [4, 1]
        )
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 250])
        self.assertEqual(len(relay.provider.emails), 1)
        self.assertTrue(relay.provider.emails[0].raw.endswith(smuggled))

    @async_test
    async def test_SEC_020_size_param_over_limit(self) -> None:
        """MAIL FROM with SIZE above the limit is refused with 552 5.3.4."""
        relay = start_relay(self, max_message_size=1000)
        replies = await in_thread(
            exchange, relay.port, [b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=1001\r\n"], [2]
        )
        self.assertEqual(codes(replies), [220, 250, 552])
        self.assertIn("5.3.4", replies[2])

    @async_test
    async def test_SEC_021_oversize_data_discarded(self) -> None:
        """A body past the limit is counted, dropped, answered 552 after '.', then the next
        transaction on the same connection succeeds."""
        relay = start_relay(self, max_message_size=10_000)
        big = message(body="y" * 50_000 + "\r\n")
        replies = await in_thread(
            exchange,
            relay.port,
            [ENVELOPE, big + b".\r\n", ENVELOPE[len(b"EHLO client.test\r\n") :], message()],
            [4, 1, 3, 0],
        )
        self.assertEqual(codes(replies), [220, 250, 250, 250, 354, 552, 250, 250, 354])
        self.assertEqual(relay.provider.emails, [])

    @async_test
    async def test_SEC_022_endless_line_memory_is_bounded(self) -> None:
        """2 MB without any CRLF into a 100 KB limit: the session keeps at most a few bytes."""
        relay = start_relay(self, max_message_size=100_000)

        def flood(port: int) -> list[str]:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                replies = read_replies(sock, 1)
                sock.sendall(ENVELOPE)
                replies += read_replies(sock, 4)
                for _ in range(32):
                    sock.sendall(b"z" * 65536)
                [session] = relay.factory.sessions
                reader = session.session.tx.reader
                assert reader is not None
                # sendall returns once the kernel holds the bytes; wait
                # (boundedly) until the session has read all of them.
                deadline = time.monotonic() + TIMEOUT
                while reader.size < 32 * 65536 and time.monotonic() < deadline:
                    time.sleep(0.01)
                buffered = len(session._input)
                assert session.session.tx.body is not None
                stored = session.session.tx.body.stored
                sock.sendall(b"\r\n.\r\n")
                replies += read_replies(sock, 1)
                return [*replies, f"{buffered} {stored}"]

        replies = await in_thread(flood, relay.port)
        self.assertEqual(codes(replies[:-1]), [220, 250, 250, 250, 354, 552])
        buffered, stored = map(int, replies[-1].split())
        self.assertLessEqual(buffered, 65536)
        self.assertEqual(stored, 0)

    @async_test
    async def test_SEC_023_overlong_command_line(self) -> None:
        """A 600-byte command gets 500 5.5.2 and the session goes on."""
        relay = start_relay(self)
        replies = await in_thread(
            exchange, relay.port, [b"EHLO " + b"a" * 600 + b"\r\nNOOP\r\n"], [2]
        )
        self.assertEqual(codes(replies), [220, 500, 250])
        self.assertIn("5.5.2", replies[1])


class StartTLSTests(TestCase):
    """Defect 4: STARTTLS resets state and never runs plaintext pipelined behind it."""

    @async_test
    async def test_SEC_024_plaintext_after_starttls_discarded(self) -> None:
        """Commands injected after STARTTLS in the same packet do not run inside TLS."""
        relay = start_relay(self)

        def inject(port: int) -> list[str]:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                replies = read_replies(raw, 1)
                raw.sendall(b"EHLO c\r\nSTARTTLS\r\nRSET\r\nNOOP\r\n")
                replies += read_replies(raw, 2)
                with client_tls().wrap_socket(raw) as sock:
                    sock.sendall(b"NOOP\r\n")
                    replies += read_replies(sock, 1)
                    sock.sendall(b"MAIL FROM:<a@example.com>\r\n")
                    replies += read_replies(sock, 1)
                return replies

        replies = await in_thread(inject, relay.port)
        # The injected RSET and NOOP produced no replies: the first reply
        # inside TLS answers our own NOOP, and EHLO state was forgotten.
        self.assertEqual(codes(replies), [220, 250, 220, 250, 503])

    @async_test
    async def test_starttls_then_delivery(self) -> None:
        """smtplib's starttls() followed by a normal transaction works end to end."""
        relay = start_relay(self)
        await in_thread(
            sendmail, relay.port, "a@example.com", ["b@example.org"], message(), starttls=True
        )
        self.assertEqual(len(relay.provider.emails), 1)

    @async_test
    async def test_SEC_025_starttls_twice(self) -> None:
        """STARTTLS inside TLS is 503 and STARTTLS is no longer advertised."""
        relay = start_relay(self)

        def twice(port: int) -> tuple[bool, int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                client.starttls(context=client_tls())
                client.ehlo()
                code, _ = client.docmd("STARTTLS")
                return client.has_extn("starttls"), code

        advertised, code = await in_thread(twice, relay.port)
        self.assertFalse(advertised)
        self.assertEqual(code, 503)


class AddressEncodingTests(TestCase):
    """Defect 9 and hostile bytes: clean 5xx replies, never a dropped session."""

    @async_test
    async def test_SEC_026_utf8_and_nul_in_commands(self) -> None:
        """A UTF-8 local part without SMTPUTF8 and a NUL get 5xx; SMTPUTF8 is accepted.

        Since SMTPUTF8 (RFC 6531) is offered, the UTF-8 address is refused
        with 553 5.6.7 because the transaction did not declare it, not as an
        8-bit command; the parameter itself is accepted.
        """
        relay = start_relay(self)
        replies = await in_thread(
            exchange,
            relay.port,
            [
                b"EHLO c\r\n",
                'MAIL FROM:<"j\u00fcrgen"@example.com>\r\n'.encode(),
                b"MAIL FROM:<a\x00b@example.com>\r\n",
                b"MAIL FROM:<a@example.com> SMTPUTF8\r\n",
                b"NOOP\r\n",
            ],
            [1, 1, 1, 1, 1],
        )
        # The NUL: 501 5.5.2 since SEC-059 (RFC 5321 2.3.8).
        self.assertEqual(codes(replies), [220, 250, 553, 501, 250, 250])

    @async_test
    async def test_SEC_027_error_budget(self) -> None:
        """After ten bad commands the server says 421 and closes."""
        relay = start_relay(self)
        replies = await in_thread(exchange, relay.port, [b"BOGUS\r\n" * 12], [12])
        self.assertEqual(codes(replies), [220] + [500] * 9 + [421])


class AuthAbuseTests(TestCase):
    """Defect 7: AUTH is robust and offered only under TLS."""

    @async_test
    async def test_SEC_029_auth_not_offered_before_tls(self) -> None:
        """Without TLS, EHLO hides AUTH and AUTH is refused with 538."""
        relay = start_relay(self, auth=True)
        replies = await in_thread(exchange, relay.port, [b"EHLO c\r\nAUTH PLAIN\r\n"], [2])
        self.assertEqual(codes(replies), [220, 250, 538])

    @async_test
    async def test_SEC_028_malformed_auth_keeps_the_session(self) -> None:
        """Malformed AUTH exchanges answer 501/504 and the session keeps working."""
        relay = start_relay(self, auth=True, allow_insecure_auth=True)
        bad = [
            b"AUTH\r\n",
            b"AUTH PLAIN =\r\n",
            b"AUTH PLAIN !!!notbase64\r\n",
            b"AUTH PLAIN dXNlcg==\r\n",  # "user": no NUL at all
            b"AUTH PLAIN AGEAYgBj\r\n",  # three NULs
            b"AUTH PLAIN\r\n*\r\n",
            b"AUTH LOGIN\r\n%%%\r\n",
            b"AUTH CRAM-MD5\r\n",
        ]
        sends = [b"EHLO c\r\n", *bad, b"NOOP\r\n"]
        counts = [1, 1, 1, 1, 1, 1, 2, 2, 1, 1]
        replies = await in_thread(exchange, relay.port, sends, counts)
        self.assertEqual(
            codes(replies), [220, 250, 501, 501, 501, 501, 501, 334, 501, 334, 501, 504, 250]
        )
