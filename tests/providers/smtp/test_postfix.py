"""Through the real relay to a real Postfix: smtplib -> twistd (PROVIDER=smtp) -> Postfix.

Postfix requires STARTTLS with a certificate from the test CA and discards
what it accepts; its maillog says what arrived.  Skipped, with the reason,
where Postfix is not installed or the tests do not run as root.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from tests.providers.smtp.postfix import PostfixUpstream, missing
from tests.providers.smtp.upstream import authority
from tests.support import async_test, in_thread
from tests.test_twistd import Relay

TIMEOUT = 30


class PostfixUpstreamTests(TestCase):
    timeout = 120

    def postfix(self, **kwargs: object) -> PostfixUpstream:
        why = missing()
        if why:
            raise SkipTest(why)
        self.ca = authority()
        upstream = PostfixUpstream(self.ca, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(upstream.stop)
        upstream.start()
        return upstream

    def relay(self, upstream: PostfixUpstream, **settings: str) -> Relay:
        ca_file = Path(self.mktemp()).absolute()
        ca_file.write_bytes(self.ca.ca_pem)
        settings.update(
            RELAY_HOST="127.0.0.1", RELAY_PORT=str(upstream.port), RELAY_CA_FILE=str(ca_file)
        )
        return Relay(self, (), **settings)

    @async_test
    async def test_relayed_over_starttls(self) -> None:
        """Three messages (8-bit body, a leading-dot line, two recipients each) go through
        the relay to Postfix over verified STARTTLS; Postfix logs each with its sender, its
        message-id and both recipients, and the relay used one TLS connection for all three."""
        upstream = self.postfix()
        relay = self.relay(upstream)
        body = "Subject: über\r\nMessage-ID: <{n}@relay.test>\r\n\r\n.dot\r\nGrüße\r\n"

        def scenario() -> None:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                for n in range(3):
                    client.sendmail(
                        "app@example.com",
                        ["one@example.org", "two@example.org"],
                        body.format(n=n).encode(),
                    )

        await in_thread(scenario)
        queued = upstream.wait_for("nrcpt=2", 3)
        self.assertEqual(len(queued), 3, upstream.log())
        self.assertTrue(all("from=<app@example.com>" in line for line in queued))
        ids = upstream.wait_for("message-id=<", 3)
        self.assertEqual(
            sorted(line.split("message-id=")[1].strip() for line in ids),
            [f"<{n}@relay.test>" for n in range(3)],
        )
        self.assertEqual(len(upstream.wait_for("status=sent", 6)), 6)
        tls = [line for line in upstream.log().splitlines() if "TLS connection established" in line]
        self.assertEqual(len(tls), 1, upstream.log())

    @async_test
    async def test_unverified_certificate_refused(self) -> None:
        """A CA file that is not the upstream's: the client hears 451 4.7.5 and the relay's log
        names the certificate problem; Postfix got no message."""
        upstream = self.postfix()
        self.ca = authority()  # the relay is given a CA that did not sign Postfix's certificate
        relay = self.relay(upstream)

        def scenario() -> smtplib.SMTPDataError | None:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                try:
                    client.sendmail(
                        "app@example.com", ["one@example.org"], b"Subject: x\r\n\r\nx\r\n"
                    )
                except smtplib.SMTPDataError as e:
                    return e
            return None

        refused = await in_thread(scenario)
        assert refused is not None
        self.assertEqual(refused.smtp_code, 451)
        self.assertTrue(refused.smtp_error.startswith(b"4.7.5"), refused.smtp_error)
        _, err = relay.stop()
        self.assertIn(b"upstream TLS certificate not accepted", err)
        self.assertIn(b"certificate verify failed", err)
        self.assertNotIn("nrcpt=", upstream.log())

    @async_test
    async def test_relay_from(self) -> None:
        """RELAY_FROM: Postfix logs the forced envelope sender (a bounce's <> stays <>); the
        message it stores starts, after its own Received field, with the new From and the
        client's From as Reply-To (an existing Reply-To kept, none added), then every other
        field and the body exactly as sent."""
        upstream = self.postfix(keep=True)
        relay = self.relay(upstream, RELAY_FROM="relay@example.com")
        body = b"\r\n.dot line\r\nFrom: body text, not a field\r\nGr\xc3\xbc\xc3\x9fe  \t\r\n" * 50
        sent = {
            b"one": b'From: "Scanner 3" <scan@apps.example>\r\nSubject: one\r\n'
            b"Message-ID: <one@apps.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"X-Folded: a\r\n\tb\r\n" + body,
            b"two": b"Subject: two\r\nReply-To: desk@apps.example\r\nFrom: scan@apps.example\r\n"
            b"Message-ID: <two@apps.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + body,
        }

        def scenario() -> None:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                client.sendmail("scan@apps.example", ["one@example.org"], sent[b"one"])
                client.sendmail("", ["two@example.org"], sent[b"two"])

        await in_thread(scenario)
        kept = upstream.kept(2)
        self.assertEqual(len(kept), 2, upstream.log())
        senders = sorted(
            line.split("from=")[1].split(",")[0] for line in upstream.wait_for("nrcpt=1", 2)
        )
        self.assertEqual(senders, ["<>", "<relay@example.com>"])
        stored = {}
        for message in kept:
            lines = message.split(b"\n")
            # Postfix's Received field (folded) first; the message as it arrived after it.
            assert lines[0].startswith(b"Received: "), message[:200]
            start = next(n for n, line in enumerate(lines[1:], 1) if line[:1] not in b" \t")
            arrived = b"\n".join(lines[start:])
            stored[arrived.split(b"Subject: ", 1)[1][:3]] = arrived
        # Postfix keeps lines without their CRLF and pipe(8) writes LF: the only difference.
        lf = body.replace(b"\r\n", b"\n")
        self.assertEqual(
            stored[b"one"],
            b'From: Scanner 3 <relay@example.com>\nReply-To: "Scanner 3" <scan@apps.example>\n'
            b"Subject: one\nMessage-ID: <one@apps.example>\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nX-Folded: a\n\tb\n" + lf,
        )
        self.assertEqual(
            stored[b"two"],
            b"From: relay@example.com\nSubject: two\nReply-To: desk@apps.example\n"
            b"Message-ID: <two@apps.example>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n" + lf,
        )

    @async_test
    async def test_deferred_recipient_direct_mode(self) -> None:
        """Direct mode against a real Postfix that defers busy@ (450 4.2.1, a recipient
        access table) and takes ok@: Postfix pipelines, so the relay's DATA is answered 354
        before the relay knows it must not send; it closes the connection without the final
        dot, the client hears 451 4.2.1 naming busy@, and Postfix logs the lost connection
        and queues nothing.  Once the table is emptied (postfix reload) the client's retry
        is delivered once, one copy for each recipient."""
        deferred = "busy@example.org 450 4.2.1 Mailbox busy\n"
        upstream = self.postfix(
            keep=True,
            extra=(
                "smtpd_recipient_restrictions = "
                "check_recipient_access texthash:$config_directory/deferred",
            ),
            files={"deferred": deferred.encode()},
        )
        relay = self.relay(upstream)
        recipients = ["ok@example.org", "busy@example.org"]
        text = b"Subject: partial\r\nMessage-ID: <partial@relay.test>\r\n\r\nBody.\r\n"

        def attempt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                try:
                    client.sendmail("app@example.com", recipients, text)
                except smtplib.SMTPDataError as e:
                    error = e.smtp_error
                    return e.smtp_code, error if isinstance(error, bytes) else error.encode()
            return 250, b""

        def scenario() -> tuple[tuple[int, bytes], str, tuple[int, bytes]]:
            relay.wait_listening()
            first = attempt()
            upstream.wait_for("lost connection after DATA")
            log_after_first = upstream.log()
            (upstream.conf / "deferred").write_text("")
            upstream.must("postfix", "-c", str(upstream.conf), "reload")
            upstream.wait_for("reload")
            return first, log_after_first, attempt()

        (code, error), log_after_first, (code2, error2) = await in_thread(scenario)
        self.assertEqual(code, 451, error)
        self.assertTrue(error.startswith(b"4.2.1 "), error)
        self.assertIn(b"<busy@example.org> 450 4.2.1", error)
        self.assertIn("450 4.2.1 <busy@example.org>: Recipient address rejected", log_after_first)
        self.assertIn("lost connection after DATA (0 bytes)", log_after_first)
        self.assertNotIn("nrcpt=", log_after_first)
        self.assertEqual(code2, 250, error2)
        self.assertEqual(len(upstream.kept(1)), 1, upstream.log())
        sent = upstream.wait_for("status=sent", 2)
        self.assertEqual(
            sorted(line.split("to=<")[1].split(">")[0] for line in sent), sorted(recipients)
        )
        self.assertEqual(len(upstream.wait_for("nrcpt=2", 1)), 1)
