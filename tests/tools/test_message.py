"""The message `smtpproxy send` builds (smtpproxy.tools.send.build_message), without sockets."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.tools.connect import UsageError
from smtpproxy.tools.send import Attachment, MessageSpec, build_message

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


class BuildMessageTests(SynchronousTestCase):
    def test_complete_headers_and_envelope(self) -> None:
        """Date, Message-ID under the given host, MIME-Version, From/To/Cc; Bcc only in the
        envelope; recipients once each, in order."""
        spec = MessageSpec(
            sender="Ops <ops@example.com>",
            to=("a@example.org", "B <b@example.org>"),
            cc=("c@example.org", "a@example.org"),
            bcc=("hidden@example.org",),
        )
        built = build_message(spec, now=NOW, hostname="tools.test")
        message = parsed(built.data)
        self.assertEqual(message["Date"], "Mon, 01 Jun 2026 12:00:00 +0000")
        self.assertTrue(built.message_id.endswith("@tools.test>"))
        self.assertEqual(message["Message-ID"], built.message_id)
        self.assertEqual(message["MIME-Version"], "1.0")
        self.assertEqual(message["From"], "Ops <ops@example.com>")
        self.assertEqual(message["To"], "a@example.org, B <b@example.org>")
        self.assertEqual(message["Cc"], "c@example.org, a@example.org")
        self.assertIsNone(message["Bcc"])
        self.assertNotIn(b"hidden@", built.data)
        self.assertEqual(built.envelope_from, "ops@example.com")
        self.assertEqual(
            built.recipients,
            ("a@example.org", "b@example.org", "c@example.org", "hidden@example.org"),
        )

    def test_seven_bit_clean_with_encoded_utf8(self) -> None:
        """A UTF-8 subject, display name and body go out encoded (RFC 2047, quoted-printable):
        every byte is ASCII, every line CRLF-terminated, and they decode back."""
        spec = MessageSpec(
            sender="Jörg <j@example.com>",
            to=("z@example.org",),
            subject="Grüße — Übersicht",
            body="Schöne Grüße\n.a line with a dot\n",
        )
        built = build_message(spec, now=NOW, hostname="tools.test")
        self.assertTrue(built.data.isascii())
        self.assertNotIn(b"\n", built.data.replace(b"\r\n", b""))
        message = parsed(built.data)
        self.assertEqual(message["Subject"], "Grüße — Übersicht")
        self.assertEqual(message["From"].addresses[0].display_name, "Jörg")
        text = message.get_content().replace("\r\n", "\n")
        self.assertEqual(text, "Schöne Grüße\n.a line with a dot\n")

    def test_attachments_with_guessed_types(self) -> None:
        """Each --attach file is a part with its base name, bytes intact and a type guessed
        from the name; unknown and compressed files are application/octet-stream."""
        files = {
            "reports/2026/report.pdf": b"%PDF-1.7 ...",
            "notes.txt": b"plain\nnotes\n",
            "photo.png": bytes(range(256)),
            "data.unknownext": b"\x00\x01",
            "logs.tar.gz": b"\x1f\x8b\x08",
            "résumé.csv": b"a,b\n",
        }
        spec = MessageSpec(
            sender="a@example.com",
            to=("b@example.org",),
            attachments=tuple(Attachment(name, data) for name, data in files.items()),
        )
        message = parsed(build_message(spec, now=NOW, hostname="t.test").data)
        self.assertEqual(message.get_content_type(), "multipart/mixed")
        found = {
            part.get_filename(): (part.get_content_type(), part.get_payload(decode=True))
            for part in message.iter_attachments()
        }
        self.assertEqual(
            {name: kind for name, (kind, _) in found.items()},
            {
                "report.pdf": "application/pdf",
                "notes.txt": "text/plain",
                "photo.png": "image/png",
                "data.unknownext": "application/octet-stream",
                "logs.tar.gz": "application/octet-stream",
                "résumé.csv": "text/csv",
            },
        )
        for path, data in files.items():
            self.assertEqual(found[path.rpartition("/")[2]][1], data, path)

    def test_addresses(self) -> None:
        """An IDN domain goes into the envelope as A-labels; a non-ASCII local part (which
        needs SMTPUTF8), two addresses in one option, or no recipient are usage errors."""
        spec = MessageSpec(sender="a@bücher.example", to=("b@example.org",))
        self.assertEqual(
            build_message(spec, now=NOW, hostname="t.test").envelope_from,
            "a@xn--bcher-kva.example",
        )
        for bad in (
            MessageSpec(sender="jörg@example.com", to=("b@example.org",)),
            MessageSpec(sender="a@example.com", to=("b@example.org, c@example.org",)),
            MessageSpec(sender="a@example.com", to=()),
            MessageSpec(sender="not an address", to=("b@example.org",)),
        ):
            with self.assertRaises(UsageError):
                build_message(bad, now=NOW, hostname="t.test")
