"""Sends of one message take turns on the MIME draft path, and the turns are always given back."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email, parse_message
from smtpproxy.providers.graph.draftturns import DraftTurns, turn_key
from tests.fakegraph import Fault
from tests.providers.graph import test_provider as tp


def _with_message_id(email: Email, message_id: bytes) -> Email:
    """C{email} with another Message-ID (make_email always writes the same one)."""
    raw = email.raw.replace(b"<report-42@example.org>", message_id, 1)
    assert raw != email.raw
    return parse_message(email.envelope_from, list(email.envelope_to), raw)


class DraftTurnsTests(SynchronousTestCase):
    def test_one_turn_per_key_in_order(self) -> None:
        """A second taker of a key waits until the first gives it back; another key does
        not wait; the key (case-folded) is forgotten once nobody holds or awaits it."""
        turns = DraftTurns()
        a = turn_key("Relay@Contoso.example", "<ID-1@x>")
        self.assertEqual(a, turn_key("relay@contoso.example", "<id-1@x>"))
        self.successResultOf(turns.take(a))
        second = turns.take(a)
        third = turns.take(a)
        self.assertNoResult(second)
        self.successResultOf(turns.take(turn_key("relay@contoso.example", "<id-2@x>")))
        turns.give_back(a)
        self.successResultOf(second)
        self.assertNoResult(third)
        turns.give_back(a)
        self.successResultOf(third)
        turns.give_back(a)
        turns.give_back(turn_key("relay@contoso.example", "<id-2@x>"))
        self.assertEqual(len(turns), 0)

    def test_cancelled_wait_is_forgotten(self) -> None:
        """A waiter that stops waiting (its time budget, a shutdown) leaves the queue of
        waiters and, once the holder gives the turn back, no entry stays behind."""
        turns = DraftTurns()
        key = turn_key("relay@contoso.example", "<id@x>")
        self.successResultOf(turns.take(key))
        waiting = turns.take(key)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(len(turns), 1)
        turns.give_back(key)
        self.assertEqual(len(turns), 0)


class ProviderTurnTests(SynchronousTestCase):
    def test_turn_held_until_background_clean_up_ends(self) -> None:
        """A send cancelled after a lost createDraft answer fails at once, but keeps its
        turn while its stray clean-up runs in the background: a second send of the same
        message creates no draft until the clean-up has deleted the stray (else the
        clean-up would delete the second send's draft too).  Then the second send is
        delivered and no turn is left."""
        h = tp.Harness()
        email, _ = tp._big_email()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        h.fake.script("findDrafts", Fault(delay=3.0))
        first = h.send(email)
        h.clock.advance(0.5)
        h.stub.flush()
        first.cancel()
        h.stub.flush()
        self.failureResultOf(first)
        second = h.send(email)
        h.clock.advance(2.0)
        h.stub.flush()
        self.assertEqual(len(h.fake.routes("createDraft")), 1)
        self.assertNoResult(second)
        h.run()
        self.successResultOf(second)
        self.assertEqual(len(h.fake.deleted), 1)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(len(h.provider._draft_turns), 0)

    def test_cancel_during_the_stray_lookup_leaves_no_draft(self) -> None:
        """Cancelled while it looks for the draft a lost create answer left (its own draft
        made by the retry), a send fails at once instead of going on with the upload, and
        both drafts are deleted in the background; the turn is given back after that."""
        h = tp.Harness()
        email, _ = tp._big_email()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        # The send's own lookup, then the background one: both slow.
        h.fake.script("findDrafts", Fault(delay=30.0), Fault(delay=3.0))
        d = h.send(email)
        h.clock.advance(2.0)  # the retry has created the second draft; the lookup waits
        h.stub.flush()
        self.assertEqual(len(h.fake.routes("createDraft")), 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        # The background lookup is not answered yet: the turn is still held.
        self.assertEqual(len(h.provider._draft_turns), 1)
        h.run()
        self.assertEqual(h.fake.routes("createUploadSession"), [])
        self.assertEqual(h.fake.deliveries, [])
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(len(h.provider._draft_turns), 0)

    def test_other_messages_do_not_wait(self) -> None:
        """Sends of different Message-IDs go on the draft path side by side: the second
        creates its draft while the first is still uploading."""
        h = tp.Harness()
        email, _ = tp._big_email()
        h.fake.script("createUploadSession", Fault(delay=5.0))
        first = h.send(email)
        second = h.send(_with_message_id(email, b"<report-43@example.org>"))
        self.assertEqual(len(h.fake.routes("createDraft")), 2)
        h.run()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(h.fake.deliveries), 2)
        self.assertEqual(len(h.provider._draft_turns), 0)

    def test_wait_for_turn_is_bounded_by_the_budget(self) -> None:
        """A send waiting for its turn (another send of the message holds it) gives up at
        its own time limit with a 451 4.4.7 and touches no draft; its wait leaves nothing
        behind."""
        h = tp.Harness(timeout=30.0)
        email, _ = tp._big_email()
        key = turn_key(tp.MAILBOX, "<report-42@example.org>")
        turns = h.provider._draft_turns
        self.successResultOf(turns.take(key))
        d = h.send(email)
        h.run()
        error = self.failureResultOf(d, TransientDeliveryError).value
        self.assertEqual(error.status, "4.4.7")
        self.assertIn("same Message-ID", str(error))
        self.assertEqual(h.fake.routes("createDraft"), [])
        turns.give_back(key)
        self.assertEqual(len(turns), 0)
