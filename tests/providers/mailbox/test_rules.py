"""Chaos triggers, access rules, Mailpit's JSON shapes, request bodies and the safe HTML
view: pure parts."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError, reply_for_failure
from smtpproxy.mime.message import Attachment
from smtpproxy.policy.rules import parse_networks
from smtpproxy.providers.mailbox import chaos
from smtpproxy.providers.mailbox.store import Stored, prepare
from smtpproxy.web.mailbox import bodies, shapes, view
from smtpproxy.web.mailbox.access import Access, same_origin
from tests.providers.mailbox.helpers import email

ROOT = Path(__file__).resolve().parents[3]
TYPES = ROOT / "tests" / "clients" / "node_modules" / "mailpit-api" / "dist" / "index.d.mts"


class ChaosTests(SynchronousTestCase):
    def test_parse_and_show(self) -> None:
        """MAILBOX_CHAOS reads stage=code:percent items and shows them the same way."""
        triggers = chaos.parse_triggers("recipient=451:20, data=554:5")
        self.assertEqual(triggers.recipient, chaos.Trigger(451, 20))
        self.assertEqual(triggers.data, chaos.Trigger(554, 5))
        self.assertEqual(triggers.sender.probability, 0)
        self.assertEqual(str(triggers), "recipient=451:20 data=554:5")
        self.assertEqual(chaos.parse_triggers(str(triggers)), triggers)
        self.assertEqual(chaos.parse_triggers("off"), chaos.Triggers())
        self.assertEqual(chaos.parse_triggers(""), chaos.Triggers())

    def test_bad_values_are_named(self) -> None:
        """A wrong stage, code or percentage is refused with what was wrong."""
        for raw, words in (
            ("auth=451:1", "stage"),
            ("sender=421:5", "reply code"),
            ("sender=451:101", "probability"),
            ("sender=451", "stage=code:percent"),
            ("sender=x:1", "whole numbers"),
        ):
            with self.assertRaises(ValueError) as caught:
                chaos.parse_triggers(raw)
            self.assertIn(words, str(caught.exception), raw)

    def test_unicode_digits_are_not_numbers(self) -> None:
        """Superscript and other non-ASCII digits (true for C{str.isdigit}, refused by C{int})
        get the named "whole numbers" refusal, not C{int()}'s own message."""
        for raw in ("sender=45\u00b9:5", "sender=451:\u00b2", "data=\u0664\u0665\u0661:5"):
            with self.assertRaises(ValueError) as caught:
                chaos.parse_triggers(raw)
            self.assertIn("whole numbers", str(caught.exception), raw)

    def test_json_round_trip_in_mailpit_shape(self) -> None:
        """GET shows Mailpit's triggers (and Data); PUT resets what it omits, refuses
        Authentication above 0 %."""
        triggers = chaos.from_json({"Sender": {"ErrorCode": 550, "Probability": 30}})
        shown = chaos.to_json(triggers)
        self.assertEqual(shown["Sender"], {"ErrorCode": 550, "Probability": 30})
        self.assertEqual(shown["Recipient"]["Probability"], 0)
        self.assertEqual(shown["Authentication"], {"ErrorCode": 451, "Probability": 0})
        self.assertEqual(chaos.from_json(None), chaos.Triggers())
        bad: object
        for bad in (
            {"Authentication": {"ErrorCode": 451, "Probability": 5}},
            {"Sender": {"ErrorCode": "451", "Probability": 5}},
            {"Sender": {"ErrorCode": 451, "Probability": True}},
            {"Nope": {}},
            [],
        ):
            with self.assertRaises(ValueError):
                chaos.from_json(bad)

    def test_refusal_follows_the_draw(self) -> None:
        """A draw below the share refuses with the chosen code; the SMTP reply keeps it."""
        trigger = chaos.Trigger(452, 25)
        self.assertIsNone(chaos.refusal(trigger, lambda: 0.25, "data"))
        refused = chaos.refusal(trigger, lambda: 0.2499, "data")
        assert isinstance(refused, TransientDeliveryError)
        reply = reply_for_failure(refused)
        self.assertEqual((reply.code, reply.status), (452, "4.3.1"))
        permanent = chaos.refusal(chaos.Trigger(550, 100), lambda: 0.99, "recipient")
        assert isinstance(permanent, PermanentDeliveryError)
        self.assertEqual(reply_for_failure(permanent).code, 550)
        self.assertIsNone(chaos.refusal(chaos.Trigger(550, 0), lambda: 0.0, "sender"))


class AccessTests(SynchronousTestCase):
    def test_networks(self) -> None:
        """Only listed networks pass; an unknown peer (a UNIX socket) does not."""
        access = Access(parse_networks("10.0.0.0/8"))
        self.assertTrue(access.network_allowed("10.1.2.3"))
        self.assertFalse(access.network_allowed("127.0.0.1"))
        self.assertFalse(access.network_allowed(None))

    def test_basic_auth(self) -> None:
        """Right user and password pass; anything else, malformed or not, does not."""
        access = Access(parse_networks("0.0.0.0/0"), "dev", "pa:ss")

        def header(value: bytes) -> bytes:
            return b"Basic " + base64.b64encode(value)

        self.assertTrue(access.authorised(header(b"dev:pa:ss")))
        for wrong in (
            header(b"dev:pa:sx"),
            header(b"dex:pa:ss"),
            header(b"devpass"),
            b"Basic !!!",
            b"Bearer abc",
            None,
            b"Basic " + b"A" * 2000,
        ):
            self.assertFalse(access.authorised(wrong), wrong)
        self.assertTrue(Access(parse_networks("0.0.0.0/0")).authorised(None))

    def test_same_origin(self) -> None:
        """A browser's cross-site Origin is refused; no Origin (curl, node) is not a browser."""
        self.assertTrue(same_origin(None, b"127.0.0.1:8080"))
        self.assertTrue(same_origin(b"http://127.0.0.1:8080", b"127.0.0.1:8080"))
        self.assertFalse(same_origin(b"https://evil.example", b"127.0.0.1:8080"))
        self.assertFalse(same_origin(b"null", b"127.0.0.1:8080"))


def _fields(interface: str) -> set[str]:
    """The field names of one interface in mailpit-api's published type definitions."""
    text = TYPES.read_text()
    body = text.split(f"interface {interface} ", 1)[1].split("\n}", 1)[0]
    return {m for m in re.findall(r"^  (\w+)\??:", body, re.MULTILINE)}


#: Mailpit's fields, as the mailpit-api client (2.1.0) declares them.
LIST_ITEM = {
    "Attachments", "Bcc", "Cc", "Created", "From", "ID", "MessageID", "Read",
    "ReplyTo", "Size", "Snippet", "Subject", "Tags", "To", "Username",
}  # fmt: skip
SUMMARY = {
    "Attachments", "Bcc", "Cc", "Date", "From", "HTML", "ID", "Inline", "ListUnsubscribe",
    "MessageID", "ReplyTo", "ReturnPath", "Size", "Subject", "Tags", "Text", "To", "Username",
}  # fmt: skip
PAGE = {
    "messages", "messages_count", "messages_unread", "start", "tags", "total", "unread", "count",
}  # fmt: skip
ATTACHMENT = {"ContentID", "ContentType", "FileName", "PartID", "Size", "Checksums"}


class ShapeTests(SynchronousTestCase):
    def test_fields_match_mailpit(self) -> None:
        """Every field Mailpit's client declares is there (Username is optional and left
        out: smtpproxy does not record who sent), with JSON types as declared."""
        stored = prepare(email(html="<p>Hi</p>", attachment=b"%PDF"), 1_700_000_000.5, "abc")
        item = shapes.list_item(stored)
        self.assertEqual(set(item), LIST_ITEM - {"Username"})
        summary = shapes.message(stored)
        self.assertEqual(set(summary), SUMMARY - {"Username"})
        page = shapes.messages_page([stored], 0, 50, 1, 1)
        self.assertEqual(set(page), PAGE)
        attachments = summary["Attachments"]
        assert isinstance(attachments, list)
        self.assertEqual(set(attachments[0]), ATTACHMENT)
        self.assertEqual(item["Created"], "2023-11-14T22:13:20.500Z")
        self.assertEqual(summary["Date"], "2026-12-01T10:00:00.000Z")
        self.assertEqual(item["From"], {"Name": "Alice", "Address": "alice@example.com"})
        self.assertIsInstance(item["Size"], int)
        self.assertIsInstance(item["Attachments"], int)

    def test_fields_match_the_installed_client(self) -> None:
        """The lists above are the ones in the installed mailpit-api's type definitions."""
        if not TYPES.exists():
            self.skipTest("mailpit-api is not installed (npm ci --prefix tests/clients)")
        self.assertEqual(_fields("MailpitMessageListItem"), LIST_ITEM)
        self.assertEqual(_fields("MailpitMessageSummaryResponse"), SUMMARY)
        self.assertEqual(_fields("MailpitMessagesSummaryResponse"), PAGE)
        self.assertEqual(_fields("MailpitAttachmentResponse"), ATTACHMENT)

    def test_headers_in_go_canonical_form(self) -> None:
        """Header keys come as Go's textproto writes them (Message-Id), sorted, values listed."""
        stored = prepare(email(), 0.0, "abc")
        headers = shapes.headers(stored)
        self.assertEqual(list(headers), sorted(headers))
        self.assertIn("Message-Id", headers)
        self.assertEqual(headers["Subject"], ["Hello"])


class BodyTests(SynchronousTestCase):
    def refused(self, read: object, data: bytes) -> bodies.BodyError:
        assert callable(read)
        error = self.assertRaises(bodies.BodyError, read, data)
        assert isinstance(error, bodies.BodyError)
        return error

    def test_delete_all_only_when_asked_so(self) -> None:
        """DELETE /api/v1/messages empties the mailbox for no body or an empty IDs list
        (the key in any case, as Go's decoder reads it), and for nothing else."""
        for data in (b"", b" \r\n", b'{"IDs": []}', b'{"ids": []}', b'{"iDs":[]}'):
            self.assertIsNone(bodies.delete_request(data), data)
        self.assertEqual(bodies.delete_request(b'{"IDs": ["a", "b"]}'), ("a", "b"))
        self.assertEqual(bodies.delete_request(b'{"Ids": ["a"]}'), ("a",))

    def test_other_delete_bodies_are_refused_with_the_reason(self) -> None:
        """Each shape Mailpit would take as "delete all" (it deletes everything when the
        body does not decode) is a 400 here saying what is wrong."""
        for data, words in (
            (b'["a"]', "JSON array"),
            (b"null", "JSON null"),
            (b'"a"', "JSON string"),
            (b"{}", 'name the messages in "IDs"'),
            (b'{"IDs": null}', "list of message IDs"),
            (b'{"IDs": {}}', "list of message IDs"),
            (b'{"IDs": "a"}', "list of message IDs"),
            (b'{"IDs": [1]}', "list of message IDs"),
            (b'{"IDs": ["a"], "ids": []}', "more than once"),
            (b'{"IDs": [], "Search": "from:x"}', 'unknown field "Search"'),
            (b'{"id": "a"}', 'unknown field "id"'),
            (b'{"IDs": [', "not valid JSON"),
            (b"[" * 50_000, "not valid JSON"),
        ):
            error = self.refused(bodies.delete_request, data)
            self.assertEqual(error.status, 400, data[:40])
            self.assertIn(words, error.message, data[:40])

    def test_too_many_ids_is_413(self) -> None:
        """A request may name MAX_IDS messages; one more is refused as too large."""
        ids = [f"id{n}" for n in range(bodies.MAX_IDS)]
        self.assertEqual(len(bodies.delete_request(json.dumps({"IDs": ids}).encode()) or ()), 1000)
        data = json.dumps({"IDs": [*ids, "one more"]}).encode()
        for read in (bodies.delete_request, bodies.read_request):
            self.assertEqual(self.refused(read, data).status, 413)

    def test_read_requests(self) -> None:
        """PUT /api/v1/messages takes Mailpit's Read, IDs and Search (any case); not both
        IDs and Search, no body, or a field it does not know."""
        self.assertEqual(bodies.read_request(b"{}"), bodies.ReadChange(False))
        self.assertEqual(
            bodies.read_request(b'{"read": true, "ids": ["a"]}'),
            bodies.ReadChange(True, ("a",)),
        )
        self.assertEqual(
            bodies.read_request(b'{"Read": true, "Search": "from:x"}'),
            bodies.ReadChange(True, search="from:x"),
        )
        for data, words in (
            (b"", "expected"),
            (b'{"Read": "yes"}', "true or false"),
            (b'{"Search": 1}', "search query"),
            (b'{"IDs": ["a"], "Search": "x"}', "not both"),
            (b'{"Reed": true}', 'unknown field "Reed"'),
        ):
            self.assertIn(words, self.refused(bodies.read_request, data).message, data)


def with_inline(html: str, *parts: tuple[str, bytes]) -> Stored:
    """A message with this HTML body and these (Content-ID, bytes) inline PNGs."""
    attachments = tuple(Attachment(None, "image/png", data, True, cid) for cid, data in parts)
    return prepare(dataclasses.replace(email(), html=html, attachments=attachments), 0.0, "x")


class ViewTests(SynchronousTestCase):
    def test_inline_images_become_data_urls(self) -> None:
        """cid: references turn into data: URLs, so the body needs no request to show them."""
        stored = prepare(
            email(html='<img src="cid:logo1">', inline_image=("logo1", b"\x89PNG")), 0.0, "x"
        )
        document = view.html_document(stored)
        assert document is not None
        self.assertIn("data:image/png;base64," + base64.b64encode(b"\x89PNG").decode(), document)
        self.assertNotIn("cid:logo1", document)
        self.assertIsNone(view.html_document(prepare(email(), 0.0, "y")))

    def test_each_reference_is_looked_up_whole(self) -> None:
        """cid:a is not a prefix match for cid:ab: each reference becomes its own part's
        URL (or stays when no part has that id), in any case, percent-encoded or not."""
        stored = with_inline(
            "<img src='cid:ab'><img src=\"CID:a\"><p style='background:url(cid:a)'>"
            "<img src=cid:a%40b><img src='cid:abc'>",
            ("a", b"A"),
            ("ab", b"AB"),
            ("a@b", b"A@B"),
        )
        document = view.html_document(stored)

        def url(data: bytes) -> str:
            return "data:image/png;base64," + base64.b64encode(data).decode()

        # The document is rebuilt (rewrite.py) before the lookup: every value double-quoted.
        self.assertEqual(
            document,
            f'<img src="{url(b"AB")}"><img src="{url(b"A")}">'
            f'<p style="background:url({url(b"A")})"><img src="{url(b"A@B")}">'
            '<img src="cid:abc">',
        )

    def test_every_reference_is_paid_for(self) -> None:
        """A part named many times costs its data: URL each time: past MAX_INLINE_BYTES the
        references stay cid: (shown as missing), so the document grows by at most that."""
        image = b"\x89" * (3 * 1024 * 1024)
        html = '<img src="cid:big">' * 10
        document = view.html_document(with_inline(html, ("big", image)))
        assert document is not None
        url = len("data:image/png;base64,") + len(base64.b64encode(image))
        fits = view.MAX_INLINE_BYTES // url
        self.assertEqual(document.count("data:image/png"), fits)
        self.assertEqual(document.count("cid:big"), 10 - fits)
        self.assertLessEqual(len(document), len(html) + view.MAX_INLINE_BYTES)
        self.assertGreater(fits, 0)

    def test_policies(self) -> None:
        """The body's policy forbids scripts, forms and requests (remote images only on
        request) and sandboxes the document; the page's allows its own script only."""
        strict = view.body_policy(remote=False)
        self.assertIn(b"default-src 'none'", strict)
        self.assertIn(b"img-src data:;", strict)
        self.assertIn(b"sandbox", strict)
        self.assertNotIn(b"script-src", strict)
        self.assertIn(b"img-src data: http: https:;", view.body_policy(remote=True))
        self.assertIn(b"script-src 'self'", view.PAGE_POLICY)
        self.assertIn(b"frame-ancestors 'none'", view.PAGE_POLICY)
