"""A large message without a Message-ID gets one of ours on the MIME draft path.

Without a Message-ID, a MIME draft cannot be found again after a lost
create answer (Graph knows it only by C{internetMessageId}), and sends of
it cannot take turns.  So the draft path gives it one, as the first header
field of the MIME it posts; the small-mail C{sendMail} path keeps the
message byte for byte (Exchange adds its own id there).
"""

from __future__ import annotations

import base64
from email import policy
from email.message import EmailMessage

from twisted.logger import LogEvent
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.draftid import draft_message_id, with_message_id
from smtpproxy.providers.graph.payload import DraftSend, MimeSend, plan_delivery
from tests.fakegraph import Fault, parse_mime
from tests.providers.graph import test_drafts as td
from tests.providers.graph import test_provider as tp

MAILBOX = "relay@contoso.example"


def _small_without_message_id() -> bytes:
    message = EmailMessage()
    message["From"] = MAILBOX  # From the mailbox: the relay has nothing to rewrite
    message["To"] = "a@x.example"
    message["Subject"] = "no id"
    message.set_content("short\n")
    raw = message.as_bytes(policy=policy.SMTP)
    assert b"message-id" not in raw.lower()
    return raw


class PureTests(SynchronousTestCase):
    def test_made_id(self) -> None:
        """Our id: the token at the configured domain, or the mailbox's when none is set;
        a domain with no ASCII form is written as its A-label."""
        self.assertEqual(draft_message_id("abc", "relay.example", MAILBOX), "<abc@relay.example>")
        self.assertEqual(draft_message_id("abc", "", MAILBOX), "<abc@contoso.example>")
        self.assertEqual(
            draft_message_id("abc", "bücher.example", MAILBOX), "<abc@xn--bcher-kva.example>"
        )

    def test_field_goes_on_top(self) -> None:
        """The field is the first line, with the message's own line ending; the rest of
        the bytes are unchanged."""
        crlf = b"From: a@b.example\r\nSubject: x\r\n\r\nbody\r\n"
        self.assertEqual(with_message_id(crlf, "<i@d>"), b"Message-ID: <i@d>\r\n" + crlf)
        lf = b"From: a@b.example\n\nbody\n"
        self.assertEqual(with_message_id(lf, "<i@d>"), b"Message-ID: <i@d>\n" + lf)

    def test_only_the_draft_path_adds_one(self) -> None:
        """A large message without Message-ID: the MIME draft starts with our field and the
        plan knows the id; the same message small goes to sendMail unchanged."""
        big = td._big_without_message_id()
        plan = plan_delivery(big, (MAILBOX,), "auto", "relay.example", new_id=lambda: "tok")
        assert isinstance(plan, DraftSend)
        self.assertTrue(plan.mime)
        self.assertEqual(plan.made_message_id, "<tok@relay.example>")
        draft = base64.b64decode(plan.draft)
        self.assertTrue(draft.startswith(b"Message-ID: <tok@relay.example>\r\n"))
        self.assertEqual(draft.lower().count(b"message-id:"), 1)
        raw = _small_without_message_id()
        small = parse_message(MAILBOX, ["a@x.example"], raw)
        mime = plan_delivery(small, (MAILBOX,), "auto", "relay.example", new_id=lambda: "tok")
        assert isinstance(mime, MimeSend)
        self.assertEqual(base64.b64decode(mime.body), raw)

    def test_own_id_kept(self) -> None:
        """A large message with a Message-ID keeps it: no second field, nothing made."""
        email, _ = tp._big_email()
        plan = plan_delivery(email, (MAILBOX,), "auto", "relay.example", new_id=lambda: "tok")
        assert isinstance(plan, DraftSend)
        self.assertIsNone(plan.made_message_id)
        self.assertNotIn(b"tok@", base64.b64decode(plan.draft))


class ProviderTests(SynchronousTestCase):
    def test_lost_create_without_message_id_leaves_no_draft(self) -> None:
        """A large message without Message-ID whose create answer is lost: the stray is
        found by our id and deleted, the message goes once, and recipients see our id."""
        events: list[LogEvent] = td._events(self)
        h = tp.Harness()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        d = h.send(td._big_without_message_id())
        h.run()
        self.successResultOf(d)
        (delivery,) = h.fake.deliveries
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(len(h.fake.deleted), 1)
        self.assertEqual(td._logged(events, "a draft may have been created unseen"), [])
        assert delivery.mime is not None
        made = str(parse_mime(delivery.mime)["message-id"])
        self.assertTrue(made.startswith("<") and made.endswith("@contoso.example>"), made)
        self.assertEqual(h.fake.violations, [])
