"""The draft path when Graph's answer is lost: the pure decisions, then the provider on the fake.

The fake carries a request out and then drops the connection
(C{Fault(drop=True, after_processing=True)}): Graph acted, the relay never
heard so.  These tests prove the relay finds out what happened and ends
with one message sent and no draft left, or says clearly when it cannot.
"""

from __future__ import annotations

import json
from email import policy
from email.message import EmailMessage
from typing import cast
from urllib.parse import parse_qs, quote, urlsplit

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email, parse_message
from smtpproxy.providers.graph.drafts import (
    TAG_PROPERTY,
    Deletion,
    deletion_outcome,
    found_ids,
    internet_message_id,
    lookup_filter,
    lookup_url,
    resume_at,
    sent_although_failed,
    strays,
    tag_json_draft,
)
from smtpproxy.providers.graph.payload import GraphUrls
from tests.fakegraph import Fault
from tests.providers.graph import test_provider as tp
from tests.providers.graph.test_fake import API, MAILBOX, FakeGraphCase


class TagTests(SynchronousTestCase):
    def test_tag_is_added_to_a_json_draft(self) -> None:
        """The tag rides in an extended property of our own; the rest of the draft is unchanged."""
        body = json.dumps({"subject": "Hi", "toRecipients": []}).encode()
        tagged = json.loads(tag_json_draft(body, "t-1"))
        self.assertEqual(tagged["subject"], "Hi")
        self.assertEqual(
            tagged["singleValueExtendedProperties"], [{"id": TAG_PROPERTY, "value": "t-1"}]
        )

    def test_tag_keeps_the_draft_within_its_size(self) -> None:
        """Non-ASCII text stays UTF-8 (as payload writes it), not six-byte escapes: the
        tagged draft is the original plus the property, so it still fits the request cap."""
        body = json.dumps({"subject": "Grüße " * 1000}, ensure_ascii=False).encode()
        tagged = tag_json_draft(body, "t")
        self.assertLess(len(tagged), len(body) + 200)

    def test_message_id_as_graph_shows_it(self) -> None:
        """The <...> token of the Message-ID field, or None where it cannot be looked up by."""
        self.assertEqual(internet_message_id("<a.b@example.org>"), "<a.b@example.org>")
        self.assertEqual(internet_message_id(" <a@b> (comment)"), "<a@b>")
        for unusable in (None, "", "no-brackets@example.org", "<a b@c>", "<it's@c>", "<>", "<a"):
            self.assertIsNone(internet_message_id(unusable), unusable)


class LookupTests(SynchronousTestCase):
    def test_filters(self) -> None:
        """A JSON draft is found by its tag, a MIME draft by its message id, quotes doubled."""
        self.assertEqual(
            lookup_filter(message_id="<a@b>", tag=None), "internetMessageId eq '<a@b>'"
        )
        self.assertEqual(
            lookup_filter(message_id="<a@b>", tag="it's"),
            f"singleValueExtendedProperties/Any(ep: ep/id eq '{TAG_PROPERTY}'"
            " and ep/value eq 'it''s')",
        )
        self.assertIsNone(lookup_filter(message_id=None, tag=None))

    def test_url(self) -> None:
        """The lookup lists the Drafts folder, ids only, the filter encoded."""
        url = lookup_url(GraphUrls("https://graph.test/"), "a@b.example", "x eq 'y z'")
        parts = urlsplit(url)
        self.assertEqual(parts.path, "/v1.0/users/a@b.example/mailFolders/drafts/messages")
        self.assertEqual(
            parse_qs(parts.query), {"$filter": ["x eq 'y z'"], "$select": ["id"], "$top": ["25"]}
        )

    def test_found_ids(self) -> None:
        """The ids of a list answer; None for anything that is not one."""
        self.assertEqual(found_ids(b'{"value": [{"id": "A"}, {"id": "B"}]}'), ["A", "B"])
        self.assertEqual(found_ids(b'{"value": []}'), [])
        for bad in (b"", b"[]", b'{"value": {}}', b'{"value": [{"id": 3}]}', b'{"value": [1]}'):
            self.assertIsNone(found_ids(bad), bad)

    def test_strays(self) -> None:
        """Every draft found but the one carried on, each once."""
        self.assertEqual(strays(["A", "B", "A", "C"], "B"), ["A", "C"])
        self.assertEqual(strays(["A"], None), ["A"])
        self.assertEqual(strays(["B"], "B"), [])


class ResumeTests(SynchronousTestCase):
    def test_outlook_and_onedrive_forms(self) -> None:
        """Graph's "{start}" for Outlook attachments, and OneDrive's "start-" / "start-end"."""
        self.assertEqual(resume_at(b'{"nextExpectedRanges": ["3932160"]}', 5_000_000), 3932160)
        self.assertEqual(resume_at(b'{"nextExpectedRanges": ["0-"]}', 5_000_000), 0)
        self.assertEqual(resume_at(b'{"nextExpectedRanges": ["10-99"]}', 100), 10)

    def test_nothing_usable(self) -> None:
        """Outside the part, several ranges, or no answer: give up rather than guess."""
        for body in (
            b'{"nextExpectedRanges": ["100"]}',
            b'{"nextExpectedRanges": ["-5"]}',
            b'{"nextExpectedRanges": ["1", "50-"]}',
            b'{"nextExpectedRanges": []}',
            b'{"nextExpectedRanges": "5"}',
            b'{"nextExpectedRanges": ["' + b"9" * 400 + b'"]}',
            b"{}",
            b"not json",
        ):
            self.assertIsNone(resume_at(body, 100), body)


class SentAlthoughFailedTests(SynchronousTestCase):
    def test_deletion_outcomes(self) -> None:
        """2xx deleted; a first-hand 404 ErrorItemNotFound gone; anything else unknown."""
        self.assertIs(deletion_outcome(204, None, uncertain=False), Deletion.DELETED)
        self.assertIs(deletion_outcome(404, "ErrorItemNotFound", uncertain=False), Deletion.GONE)
        # Our own earlier attempt may have deleted it: no proof of a send.
        self.assertIs(deletion_outcome(404, "ErrorItemNotFound", uncertain=True), Deletion.UNKNOWN)
        self.assertIs(deletion_outcome(404, "ErrorInvalidUser", uncertain=False), Deletion.UNKNOWN)
        self.assertIs(deletion_outcome(None, None, uncertain=False), Deletion.UNKNOWN)
        self.assertIs(deletion_outcome(503, "x", uncertain=False), Deletion.UNKNOWN)

    def test_only_an_ambiguous_send_and_a_gone_draft_mean_sent(self) -> None:
        """A missing draft is proof of sending only after a send that may have gone through."""
        self.assertTrue(sent_although_failed(True, Deletion.GONE))
        self.assertFalse(sent_although_failed(False, Deletion.GONE))
        for deletion in (Deletion.DELETED, Deletion.UNKNOWN):
            self.assertFalse(sent_although_failed(True, deletion))


def _events(case: SynchronousTestCase) -> list[LogEvent]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def _logged(events: list[LogEvent], start: str) -> list[LogEvent]:
    return [e for e in events if str(e.get("log_format", "")).startswith(start)]


def _big_without_message_id(unusable_id: str | None = None) -> Email:
    """A large message with no Message-ID (or, given C{unusable_id}, one that names no
    C{<...>} id Graph could be asked about)."""
    message = EmailMessage()
    message["From"] = "app@example.org"
    message["To"] = "a@x.example"
    message["Subject"] = "no id"
    if unusable_id is not None:
        message["Message-ID"] = unusable_id
    message.set_content("see attached\n")
    message.add_attachment(
        bytes(range(256)) * 16_000, maintype="application", subtype="octet-stream", filename="b"
    )
    raw = message.as_bytes(policy=policy.SMTP)
    assert (b"message-id" in raw.lower()) == (unusable_id is not None)
    return parse_message("app@example.org", ["a@x.example"], raw)


class LostCreateDraftTests(SynchronousTestCase):
    def test_json_draft_found_by_its_tag(self) -> None:
        """JSON drafts have no Message-ID of ours: the stray is found by the tag and deleted."""
        h = tp.Harness(mode="json")
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        email, data = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        (delivery,) = h.fake.deliveries
        self.assertEqual(delivery.method, "draft")
        self.assertEqual(dict(delivery.attachments)["big.bin"], data)
        self.assertEqual(len(h.fake.routes("createDraft")), 2)
        self.assertEqual(len(h.fake.deleted), 1)
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(h.fake.violations, [])

    def test_failed_create_leaves_no_draft(self) -> None:
        """A create that took effect unseen and then fails for good: its draft is deleted too."""
        h = tp.Harness()
        h.fake.script(
            "createDraft",
            Fault(drop=True, after_processing=True),
            *[Fault(503, "ServiceUnavailable")] * 3,
        )
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(len(h.fake.deleted), 1)
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.violations, [])

    def test_lookup_only_after_a_possible_lost_answer(self) -> None:
        """Drafts are looked up after a dropped create (the relay cannot tell whether Graph
        acted), and never on the common path: no extra request when all is well."""
        h = tp.Harness()
        h.fake.script("createDraft", Fault(drop=True))  # dropped before Graph acted
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        # A dropped connection is ambiguous to the relay, so it looks; nothing is found.
        self.assertEqual(len(h.fake.routes("findDrafts")), 1)
        self.assertEqual(h.fake.deleted, [])
        clean = tp.Harness()
        sent = clean.send(tp._big_email()[0])
        clean.run()
        self.successResultOf(sent)
        self.assertEqual(clean.fake.routes("findDrafts"), [])

    def test_unusable_message_id_is_logged(self) -> None:
        """A MIME draft whose Message-ID names no <...> id cannot be looked up (a message
        without any gets one of ours, see test_draft_message_id): the message still goes
        once, and a warning tells the operator a draft may be left (never sent twice)."""
        events = _events(self)
        h = tp.Harness()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        d = h.send(_big_without_message_id("no-brackets@example.org"))
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(h.fake.drafts), 1)
        self.assertEqual(len(_logged(events, "a draft may have been created unseen")), 1)


class LostSendTests(SynchronousTestCase):
    def test_deleted_draft_means_not_sent(self) -> None:
        """The send's answer is lost but Graph had not sent it (the draft is still there to
        delete): the client is told 451, and an error log says a retry may duplicate."""
        events = _events(self)
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True), *[Fault(503, "ServiceUnavailable")] * 3)
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.drafts, {})
        (logged,) = _logged(events, "a send whose answer was lost")
        self.assertEqual(logged["draft"], "deleted")

    def test_sent_draft_counted_once(self) -> None:
        """Sent although every answer said otherwise: one delivery, success, a warning."""
        events = _events(self)
        h = tp.Harness()
        h.fake.script(
            "sendDraft",
            Fault(drop=True, after_processing=True),
            *[Fault(503, "ServiceUnavailable")] * 3,
        )
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(_logged(events, "the draft was sent although")), 1)
        self.assertEqual(h.fake.violations, [])


class UploadResumeTests(SynchronousTestCase):
    def test_resumes_from_the_session(self) -> None:
        """A range stored unseen: the session is asked where it stands, and the upload goes
        on from there; no range is sent a third time, and the fake saw no mistake."""
        h = tp.Harness()
        h.fake.script("upload", Fault(drop=True, after_processing=True))
        email, data = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(
            [s.headers["content-range"] for s in h.fake.routes("upload")],
            [
                "bytes 0-3932159/5000000",
                "bytes 0-3932159/5000000",
                "bytes 3932160-4999999/5000000",
            ],
        )
        self.assertEqual(len(h.fake.routes("uploadStatus")), 1)
        self.assertNotIn("authorization", h.fake.routes("uploadStatus")[0].headers)
        (delivery,) = h.fake.deliveries
        self.assertEqual(dict(delivery.attachments)["big.bin"], data)
        self.assertEqual(h.fake.violations, [])

    def test_last_range_lost_fails_safely(self) -> None:
        """The last range stored unseen: the session is gone, so whether the part is whole
        cannot be read; the message fails 451 with its draft deleted, never sent short."""
        h = tp.Harness()
        h.fake.script("upload", Fault(), Fault(drop=True, after_processing=True))
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(h.fake.violations, [])

    def test_resumes_are_bounded(self) -> None:
        """A session that keeps refusing ranges does not loop: the message fails 451."""
        h = tp.Harness()
        h.fake.script("upload", *[Fault(416, "InvalidRange")] * 10)
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(len(h.fake.routes("uploadStatus")), 3)
        self.assertEqual(h.fake.deliveries, [])


class FakeLookupTests(FakeGraphCase):
    """The fake's draft lookup and upload status are as strict as the rest of it."""

    def test_lookup_by_message_id_and_tag(self) -> None:
        """Drafts are found by internetMessageId or by an extended property, ids only."""
        draft = self.message(singleValueExtendedProperties=[{"id": TAG_PROPERTY, "value": "T"}])
        status, created = self.call("POST", f"{API}/messages", json.dumps(draft).encode())
        self.assertEqual(status, 201)
        urls = GraphUrls("http://graph.test")
        by_tag = lookup_filter(message_id=None, tag="t")  # values compare without case
        assert by_tag is not None
        status, found = self.call("GET", lookup_url(urls, MAILBOX, by_tag))
        self.assertEqual((status, [v["id"] for v in found["value"]]), (200, [created["id"]]))
        by_id = lookup_filter(message_id="<nothing@here>", tag=None)
        assert by_id is not None
        status, found = self.call("GET", lookup_url(urls, MAILBOX, by_id))
        self.assertEqual((status, found["value"]), (200, []))
        self.assertEqual(self.fake.violations, [])

    def test_unsupported_filter_refused(self) -> None:
        """A filter the relay should not send is refused as Graph would, and recorded."""
        status, body = self.call(
            "GET", f"{API}/mailFolders/drafts/messages?$filter=" + quote("subject eq 'x'", safe="")
        )
        self.assertEqual((status, body["error"]["code"]), (400, "ErrorInvalidUrlQueryFilter"))
        self.assertEqual(len(self.fake.violations), 1)

    def test_bad_property_id_refused(self) -> None:
        """An extended property id not in Graph's form is refused."""
        draft = self.message(singleValueExtendedProperties=[{"id": "tag", "value": "T"}])
        status, _ = self.call("POST", f"{API}/messages", json.dumps(draft).encode())
        self.assertEqual(status, 400)
        self.assertEqual(len(self.fake.violations), 1)
