"""Large mail as a MIME draft: which parts are taken out, and that nothing else changes."""

from __future__ import annotations

import base64
import re
from email import policy
from email.message import EmailMessage

from twisted.trial.unittest import TestCase

from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph import mimeparts
from smtpproxy.providers.graph.mimeparts import is_signed, take_out, walk
from smtpproxy.providers.graph.payload import (
    REQUEST_LIMIT,
    UPLOAD_MIN,
    DraftSend,
    MimeSend,
    plan_delivery,
)
from tests.fakegraph import parse_mime, with_attachments
from tests.mime.test_corpus import corpus_files, own_files

MAILBOX = "relay@contoso.example"
HEADERS = (
    ("Message-ID", "<big-1@example.org>"),
    ("In-Reply-To", "<thread-0@example.org>"),
    ("References", "<thread-0@example.org> <thread-1@example.org>"),
    ("List-Unsubscribe", "<mailto:leave@example.org>, <https://example.org/leave?u=1>"),
)
CALENDAR = (
    "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:review-7\r\n"
    "SUMMARY:Review\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)


def large_message(sizes: tuple[int, ...], *, signed: bool = False) -> bytes:
    """Text and HTML alternatives, a calendar part, custom headers and attachments of C{sizes}."""
    message = EmailMessage()
    message["From"] = "Planner <planner@example.org>"
    message["To"] = "a@x.example"
    message["Subject"] = "Quarterly review"
    for name, value in HEADERS:
        message[name] = value
    message.set_content("The plain text version.\n")
    message.add_alternative("<p>The HTML version.</p>", subtype="html")
    message.add_attachment(CALENDAR.encode(), maintype="text", subtype="calendar")
    for number, size in enumerate(sizes):
        data = bytes([number + 1]) * size
        message.add_attachment(
            data, maintype="application", subtype="pdf", filename=f"part-{number}.pdf"
        )
    raw = message.as_bytes(policy=policy.SMTP)
    if not signed:
        return raw
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    content = [f for f in fields if f.lower().startswith(b"content-")]
    kept = [f for f in fields if not f.lower().startswith(b"content-")]
    signature = b"Content-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n"
    return b"\r\n".join(
        [
            *kept,
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
            b' micalg=sha-256; boundary="sig"',
            b"",
            b"--sig",
            *content,
            b"",
            body,
            b"--sig",
            signature,
            b"--sig--",
            b"",
        ]
    )


def _fits(size: int) -> bool:
    return 4 * ((size + 2) // 3) <= REQUEST_LIMIT


class TakeOutTests(TestCase):
    def test_only_attachments_are_removable(self) -> None:
        """The text and HTML alternatives and the calendar part are never candidates; the
        attachments are."""
        tree = walk(large_message((10, 20)))
        kinds = {leaf.headers.get_content_type(): leaf.removable for leaf in tree.leaves}
        self.assertEqual(
            kinds,
            {
                "text/plain": False,
                "text/html": False,
                "text/calendar": False,
                "application/pdf": True,
            },
        )

    def test_rest_is_byte_for_byte_the_original_less_the_parts(self) -> None:
        """Taking out the two big attachments leaves every other byte as it was; the parts come
        back decoded, in message order."""
        raw = large_message((2_500_000, 100, 3_500_000))
        taken = take_out(raw, _fits)
        assert taken is not None
        rest, parts = taken
        self.assertEqual([p.filename for p in parts], ["part-0.pdf", "part-2.pdf"])
        self.assertEqual(parts[0].data, b"\x01" * 2_500_000)
        self.assertEqual(parts[1].data, b"\x03" * 3_500_000)
        self.assertEqual(rest[: raw.index(b"\r\n\r\n")], raw[: raw.index(b"\r\n\r\n")])
        # The rest is the original with whole spans cut out: each remaining line in order.
        position = 0
        for line in rest.split(b"\r\n"):
            position = raw.index(line, position)
        parsed = parse_mime(rest)
        names = [p.get_filename() for p in parsed.walk() if p.get_filename()]
        self.assertEqual(names, ["part-1.pdf"])
        body = parsed.get_body(("plain",))
        assert body is not None
        self.assertEqual(body.get_content().rstrip(), "The plain text version.")

    def test_too_large_without_attachments(self) -> None:
        """A message whose text alone breaks the limit cannot be made to fit: None."""
        self.assertIsNone(take_out(large_message((5_000_000,)), lambda size: size < 100))

    def test_a_multipart_keeps_one_part(self) -> None:
        """A multipart/mixed whose only parts are attachments keeps its last one."""
        raw = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: application/pdf\r\n\r\nAAAA\r\n--b\r\n"
            b"Content-Type: application/pdf\r\n\r\nBBBBBBBB\r\n--b--\r\n"
        )
        taken = take_out(raw, lambda size: size < 60)
        self.assertIsNone(taken)
        taken = take_out(raw, lambda size: size < len(raw) - 10)
        assert taken is not None
        self.assertEqual([p.data for p in taken[1]], [b"BBBBBBBB"])

    def test_signed_is_detected_and_never_cut(self) -> None:
        """multipart/signed and application/pkcs7-mime are signed; nothing inside is removable."""
        raw = large_message((100,), signed=True)
        self.assertTrue(is_signed(raw))
        self.assertTrue(is_signed(b"Content-Type: application/pkcs7-mime; smime-type=x\r\n\r\nA"))
        self.assertFalse(is_signed(large_message((100,))))
        self.assertFalse(any(leaf.removable for leaf in walk(raw).leaves))

    def test_signed_at_any_depth_and_not_by_mention(self) -> None:
        """A pkcs7 or PGP/MIME part inside a multipart/mixed makes the message signed; a
        message whose text only names those types, or that carries a detached PGP signature
        of an attached file, is not (the walk reads Content-Type fields, not the bytes)."""

        def mixed(*parts: bytes, b: bytes = b"m") -> bytes:
            body = b"".join(b"--" + b + b"\r\n" + part + b"\r\n" for part in parts)
            head = b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n'
            return head + body + b"--" + b + b"--\r\n"

        text = b"Content-Type: text/plain\r\n\r\nsee multipart/signed and pkcs7-mime"
        p7m = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\nMIIB"
        encrypted = (
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
            b' boundary="e"\r\n\r\n--e\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
            b"Version: 1\r\n--e\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n--e--"
        )
        detached = b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP"
        self.assertTrue(is_signed(mixed(text, p7m)))
        self.assertTrue(is_signed(mixed(text, mixed(text, encrypted, b=b"n"))))
        self.assertFalse(is_signed(mixed(text, text)))
        self.assertFalse(is_signed(mixed(text, detached)))

    def test_any_spelling_of_a_signed_type_is_found(self) -> None:
        """The quick byte search finds each signed type in any case, at the top and nested.

        It decides alone for every message it finds nothing in, so a spelling
        it missed would let a signed message be rebuilt (and its signature
        broken).
        """
        for kind in sorted(mimeparts._SIGNED_TYPES):
            for spelt in (kind, kind.upper(), kind.title(), kind.swapcase()):
                head = f"Content-Type: {spelt}; boundary=s; protocol=x\r\n\r\n".encode()
                self.assertTrue(is_signed(head + b"--s\r\n\r\nA\r\n--s--\r\n"), spelt)
                nested = (
                    b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n--m\r\n'
                    + head
                    + b"--s\r\n\r\nA\r\n--s--\r\n\r\n--m--\r\n"
                )
                self.assertTrue(is_signed(nested), spelt)

    def test_quick_search_agrees_with_the_walk(self) -> None:
        """Over the corpora: a message the quick search passes over is one the walk
        finds unsigned too (the search only ever skips work, never changes the answer)."""
        files = own_files() + corpus_files()
        self.assertTrue(files)
        for path in files:
            raw = path.read_bytes()
            if mimeparts._SIGNED_MARK.search(raw) is not None:
                continue
            tree = walk(raw)
            self.assertFalse(tree.signed or not tree.complete, path.name)


class PlanTests(TestCase):
    def plan(self, raw: bytes) -> object:
        email = parse_message("planner@example.org", ["a@x.example"], raw)
        return plan_delivery(email, (MAILBOX,), "auto")

    def test_small_message_is_one_mime_send(self) -> None:
        """A message that fits stays a single MIME sendMail."""
        self.assertIsInstance(self.plan(large_message((1000,))), MimeSend)

    def test_large_message_is_a_mime_draft(self) -> None:
        """20 MB: a MIME draft with the headers and alternatives, big parts through upload
        sessions, small ones posted; the fake's reconstruction is the whole message."""
        sizes = (6_000_000, 6_000_000, 5_000_000, 2_500_000)
        raw = large_message(sizes)
        plan = self.plan(raw)
        assert isinstance(plan, DraftSend)
        self.assertTrue(plan.mime)
        self.assertLessEqual(len(plan.draft), REQUEST_LIMIT)
        self.assertTrue(all(len(u.data) >= UPLOAD_MIN for u in plan.uploads))
        self.assertEqual(len(plan.uploads) + len(plan.attachments), 4)
        draft = base64.b64decode(plan.draft)
        parsed = parse_mime(draft)
        for name, value in HEADERS:
            self.assertEqual(parsed[name], value)
        calendar = [p for p in parsed.walk() if p.get_content_type() == "text/calendar"]
        self.assertEqual(len(calendar), 1)
        whole = with_attachments(draft, [(u.name, u.content_type, u.data) for u in plan.uploads])
        names = sorted(p.get_filename() or "" for p in parse_mime(whole).walk() if p.get_filename())
        self.assertEqual(names, [u.name for u in sorted(plan.uploads, key=lambda u: u.name)])

    def test_large_signed_message_is_refused(self) -> None:
        """A signed message too large for one request: 554 5.3.4, not a broken signature."""
        with self.assertRaises(PermanentDeliveryError) as caught:
            self.plan(large_message((5_000_000,), signed=True))
        self.assertEqual((caught.exception.code, caught.exception.status), (554, "5.3.4"))
        self.assertIn("signature", str(caught.exception))

    def test_small_signed_message_goes_whole(self) -> None:
        """A signed message that fits goes as it is, in one MIME request."""
        plan = self.plan(large_message((1000,), signed=True))
        assert isinstance(plan, MimeSend)
        self.assertIn(b"multipart/signed", base64.b64decode(plan.body))
        self.assertTrue(plan.signed)


ENVELOPED = (
    b"From: planner@example.org\r\nTo: a@x.example\r\nSubject: sealed\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n"
)


class SignedRoadTests(TestCase):
    """Every road to the JSON form refuses a signed or encrypted message, with 554 5.3.4."""

    def refusal(self, raw: bytes, mode: str = "auto", envelope: str = "a@x.example") -> str:
        email = parse_message("planner@example.org", [envelope], raw)
        with self.assertRaises(PermanentDeliveryError) as caught:
            plan_delivery(email, (MAILBOX,), mode)
        self.assertEqual((caught.exception.code, caught.exception.status), (554, "5.3.4"))
        self.assertIn("signature", str(caught.exception))
        return str(caught.exception)

    def test_json_mode(self) -> None:
        """GRAPH_SEND_MODE=json refuses signed and enveloped messages and says why."""
        signed = large_message((10,), signed=True)
        self.assertIn("GRAPH_SEND_MODE=json", self.refusal(signed, "json"))
        self.assertIn("GRAPH_SEND_MODE=json", self.refusal(ENVELOPED, "json"))

    def test_header_recipient_outside_the_envelope(self) -> None:
        """To names someone the envelope does not: JSON would be the only safe way, so refuse."""
        message = self.refusal(ENVELOPED, envelope="other@x.example")
        self.assertIn("not in the envelope", message)

    def test_header_without_an_ascii_form(self) -> None:
        """A Message-ID with 8-bit bytes has no ASCII form: MIME is impossible, so refuse."""
        raw = large_message((10,), signed=True).replace(
            b"Message-ID: <big-1@example.org>", "Message-ID: <caf\u00e9@example.org>".encode()
        )
        self.assertIn("no ASCII form", self.refusal(raw))

    def test_unsigned_messages_still_take_those_roads(self) -> None:
        """The same messages unsigned go as JSON, as before (the refusal is for signed ones)."""
        email = parse_message("planner@example.org", ["a@x.example"], large_message((10,)))
        self.assertFalse(isinstance(plan_delivery(email, (MAILBOX,), "json"), MimeSend))
        plan = plan_delivery(email, (MAILBOX,), "auto")
        assert isinstance(plan, MimeSend)
        self.assertFalse(plan.signed)
