"""A draft deleted by someone else while the relay works on it, and how a send that may
have gone through is confirmed.

Someone (a user in Outlook, a retention policy, another client) may delete
the draft between the relay's steps.  Graph then answers the next step with
404; nothing was sent, so the client must retry (451), not bounce.

A send whose answer was lost and whose draft is then gone was sent only if
the mailbox's Sent Items holds the message: Graph's C{send} of a draft
always files a copy there (it takes no C{saveToSentItems}), so the relay
looks for it by C{internetMessageId} before it reports the message as
delivered.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.mime.message import Email
from smtpproxy.providers.graph.drafts import gone_draft_error, in_sent_items, sent_lookup_url
from smtpproxy.providers.graph.payload import GraphUrls
from tests.fakegraph import Fault, make_email
from tests.providers.graph import test_provider as tp
from tests.providers.graph.test_cancel_during_cleanup import _until
from tests.providers.graph.test_fake import API, MAILBOX, FakeGraphCase


class PureTests(SynchronousTestCase):
    def test_sent_lookup_url(self) -> None:
        """Sent Items is listed by internetMessageId, ids only, the literal quoted."""
        url = sent_lookup_url(GraphUrls("https://graph.test/"), "a@b.example", "<it's@x>")
        parts = urlsplit(url)
        self.assertEqual(parts.path, "/v1.0/users/a@b.example/mailFolders/sentitems/messages")
        self.assertEqual(
            parse_qs(parts.query),
            {"$filter": ["internetMessageId eq '<it''s@x>'"], "$select": ["id"]},
        )
        self.assertNotIn("'", parts.query)
        self.assertNotIn(" ", parts.query)

    def test_in_sent_items(self) -> None:
        """Found, not found, or no answer to go by."""
        self.assertIs(in_sent_items(200, b'{"value": [{"id": "A"}]}'), True)
        self.assertIs(in_sent_items(200, b'{"value": []}'), False)
        self.assertIsNone(in_sent_items(200, b"not json"))
        self.assertIsNone(in_sent_items(503, b'{"value": []}'))

    def test_gone_draft_error_is_temporary(self) -> None:
        """451 with a 4.x.x status and a reason that says what happened."""
        reply = reply_for_failure(gone_draft_error("HTTP 404 ErrorItemNotFound"))
        self.assertEqual(reply.code, 451)
        self.assertTrue(reply.status.startswith("4."))
        self.assertIn("deleted", gone_draft_error("x").reason)


class FakeSentItemsTests(FakeGraphCase):
    """The fake's Sent Items listing is as strict as its drafts listing."""

    def test_mime_send_is_filed_and_found(self) -> None:
        """A MIME sendMail leaves a copy found by its Message-ID; nothing else matches."""
        email = make_email(("a@x.example",), from_=MAILBOX, to=("a@x.example",))
        status, _ = self.call("POST", f"{API}/sendMail", base64.b64encode(email.raw), "text/plain")
        self.assertEqual(status, 202)
        urls = GraphUrls("http://graph.test")
        status, found = self.call("GET", sent_lookup_url(urls, MAILBOX, "<report-42@example.org>"))
        self.assertEqual((status, len(found["value"])), (200, 1))
        status, found = self.call("GET", sent_lookup_url(urls, MAILBOX, "<other@example.org>"))
        self.assertEqual((status, found["value"]), (200, []))
        self.assertEqual(self.fake.violations, [])

    def test_json_send_without_saving_is_not_filed(self) -> None:
        """saveToSentItems false: no copy."""
        body = json.dumps({"message": self.message(), "saveToSentItems": False}).encode()
        self.assertEqual(self.call("POST", f"{API}/sendMail", body)[0], 202)
        self.assertEqual(self.fake.sent_items, {})

    def test_other_filters_refused(self) -> None:
        """Only the internetMessageId filter and $select=id are taken; the rest is refused."""
        path = f"{API}/mailFolders/sentitems/messages"
        for query in (
            "$filter=" + quote("subject eq 'x'", safe=""),
            "$filter=" + quote("internetMessageId eq '<a@b>'", safe="") + "&$select=subject",
            "$filter=" + quote("internetMessageId eq '<a@b>'", safe="") + "&$orderby=id",
        ):
            status, _ = self.call("GET", f"{path}?{query}")
            self.assertEqual(status, 400, query)
        self.assertEqual(len(self.fake.violations), 3)


def _only_draft(h: tp.Harness) -> str:
    (draft_id,) = h.fake.drafts
    return draft_id


def _delete_during(h: tp.Harness, route: str, email: Email) -> Deferred[None]:
    """Send C{email}; while Graph takes a second to answer C{route}, someone deletes the draft."""
    h.fake.script(route, Fault(delay=1.0))
    d = h.send(email)
    _until(h, route)
    h.fake.remove_draft(_only_draft(h))
    h.run()
    return d


def _two_posted_attachments() -> Email:
    """A message that goes as a MIME draft with an attachment added by POST (under 3 MB)."""
    data = bytes(range(256)) * (2_500_000 // 256)
    return make_email(
        ("a@x.example",), to=("a@x.example",), attachments=(("a.bin", data), ("b.bin", data))
    )


class DeletedDraftTests(SynchronousTestCase):
    def assert_retry_later(self, h: tp.Harness, d: Deferred[None]) -> None:
        failure = self.failureResultOf(d, TransientDeliveryError)
        reply = reply_for_failure(failure.value)
        self.assertEqual(reply.code, 451)
        self.assertTrue(reply.status.startswith("4."), reply.status)
        self.assertIn("deleted", failure.value.reason)
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.drafts, {})
        # The clean-up still ran, found the draft gone, and did nothing more.
        self.assertEqual(len(h.fake.routes("deleteDraft")), 1)
        self.assertEqual(h.fake.deleted, [])
        self.assertEqual(h.fake.violations, [])

    def test_add_attachment(self) -> None:
        """A 404 on addAttachment: 451, not 550."""
        h = tp.Harness()
        d = _delete_during(h, "addAttachment", _two_posted_attachments())
        self.assert_retry_later(h, d)

    def test_create_upload_session(self) -> None:
        """A 404 on createUploadSession: 451, not 550."""
        h = tp.Harness()
        d = _delete_during(h, "createUploadSession", tp._big_email()[0])
        self.assert_retry_later(h, d)

    def test_upload_range(self) -> None:
        """The draft's upload session goes with it: a 404 on a range, 451 saying why."""
        h = tp.Harness()
        d = _delete_during(h, "upload", tp._big_email()[0])
        self.assert_retry_later(h, d)

    def test_send_draft(self) -> None:
        """A 404 on sendDraft with no earlier attempt that may have sent: nothing was
        sent, 451 (and no Sent Items lookup: there is nothing to confirm)."""
        h = tp.Harness()
        d = _delete_during(h, "sendDraft", tp._big_email()[0])
        self.assert_retry_later(h, d)
        self.assertEqual(h.fake.routes("findSent"), [])


class GoneAfterLostSendTests(SynchronousTestCase):
    def test_sent_is_confirmed_in_sent_items(self) -> None:
        """The send went through unseen; the retry's 404 is confirmed by the copy in Sent
        Items, looked up by the message's internetMessageId: delivered once."""
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True, after_processing=True))
        d = h.send(tp._big_email()[0])
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        (lookup,) = h.fake.routes("findSent")
        self.assertEqual(h.fake.violations, [])
        self.assertIn("/mailFolders/sentitems/messages", lookup.path)

    def test_deleted_not_sent(self) -> None:
        """The first send attempt's answer is lost before Graph acted; meanwhile someone
        deletes the draft.  The retry's 404 no longer reads as "sent": Sent Items has no
        copy, so the client is told 451 and the message is not counted delivered."""
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True))
        d = h.send(tp._big_email()[0])
        _until(h, "sendDraft")
        h.fake.remove_draft(_only_draft(h))
        h.run()
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(reply_for_failure(failure.value).code, 451)
        self.assertEqual(len(h.fake.routes("findSent")), 1)
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.violations, [])

    def test_failed_send_then_gone_not_sent(self) -> None:
        """The send's answer is lost (not acted on), then refused until the relay gives
        up; the draft is deleted by someone while the relay's own delete is on its way.
        The delete's 404 is no proof of a send either: Sent Items decides, 451."""
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True), *[Fault(503, "ServiceUnavailable")] * 3)
        d = _delete_during(h, "deleteDraft", tp._big_email()[0])
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(reply_for_failure(failure.value).code, 451)
        self.assertEqual(len(h.fake.routes("findSent")), 1)
        self.assertEqual(h.fake.deliveries, [])

    def test_json_draft_uses_the_created_id(self) -> None:
        """A JSON draft's internetMessageId is Exchange's, read from the create answer: a
        lost send is confirmed by it too."""
        h = tp.Harness(mode="json")
        h.fake.script("sendDraft", Fault(drop=True, after_processing=True))
        d = h.send(tp._big_email()[0])
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(h.fake.routes("findSent")), 1)
        self.assertEqual(h.fake.violations, [])

    def test_sent_although_failed_still_counted_once(self) -> None:
        """test_drafts' case (sent unseen, then 503s, then the delete finds it gone) is
        confirmed in Sent Items before it is reported delivered."""
        h = tp.Harness()
        h.fake.script(
            "sendDraft",
            Fault(drop=True, after_processing=True),
            *[Fault(503, "ServiceUnavailable")] * 3,
        )
        d = h.send(tp._big_email()[0])
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(h.fake.routes("findSent")), 1)
