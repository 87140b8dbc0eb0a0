"""Review 6: the draft path's lost-answer recovery, attacked on the Graph fake."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.fakegraph import Fault
from tests.providers.graph import test_provider as tp


class ConcurrentSameMessageIdTests(SynchronousTestCase):
    def test_stray_lookup_spares_another_sends_draft(self) -> None:
        """Two sends of one message (the same Message-ID: a client that resubmits, two
        relays' queue entries) run at once.  The first one's createDraft answer is lost, so
        it looks drafts up by internetMessageId and deletes the "strays": the lookup also
        finds the second send's draft, still being uploaded, and deletes it, so the second
        message is bounced (550 5.1.0, Graph's 404 on the deleted draft) although nothing was
        wrong with it.  Cause: drafts.py lookup_filter matches a MIME draft by its
        internetMessageId, which is not unique to the attempt.  Right: only drafts made by this
        attempt are strays (a per-attempt tag, as for JSON drafts), so both sends deliver."""
        h = tp.Harness()
        email, _ = tp._big_email()
        # First send: its draft is created, the answer is lost; it retries after 1 s.
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        first = h.send(email)
        # Second send of the same message: its upload session takes 5 s to be answered.
        h.fake.script("createUploadSession", Fault(delay=5.0))
        second = h.send(email)
        h.run()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(h.fake.deliveries), 2)

    def test_deleted_by_another_send_is_not_counted_as_sent(self) -> None:
        """Worse: the second send's sendDraft answer is lost (not carried out) and its retry
        waits; meanwhile the first send's stray clean-up deletes the second one's draft.
        The retry's 404 is then read as "the lost attempt sent it" (gone_means_done), and
        the second message is reported delivered although Graph never sent it: silent
        loss.  Right: both messages are delivered (or the second one fails 451), never a
        success without a delivery."""
        h = tp.Harness()
        email, _ = tp._big_email()
        h.fake.script("sendDraft", Fault(drop=True), Fault(503, "ServiceUnavailable"))
        second = h.send(email)
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        first = h.send(email)
        h.run()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(h.fake.deliveries), 2)


class CancelDuringCreateTests(SynchronousTestCase):
    def test_cancel_after_a_lost_create_answers_at_once(self) -> None:
        """A forced shutdown cancels a send whose createDraft answer was lost (it waits
        to retry).  _send_draft's except clause then awaits _delete_strays (a findDrafts
        GET and the deletes, each with a fresh CLEANUP_BUDGET) before re-raising, so the
        cancelled send does not end until Graph answers the lookup: here 30 s on a slow
        Graph, and up to ten seconds per request in general, holding the relay's
        shutdown.  The sendDraft branch already knows better (cleanup in the background,
        "the relay must learn the outcome now").  Right: the cancellation fails the send
        at once and the stray clean-up runs in the background."""
        h = tp.Harness()
        email, _ = tp._big_email()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        h.fake.script("findDrafts", Fault(delay=30.0))
        d = h.send(email)
        h.clock.advance(0.5)  # waiting for the retry of createDraft
        h.stub.flush()
        d.cancel()
        h.stub.flush()
        self.failureResultOf(d)
