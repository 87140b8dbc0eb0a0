"""A forced shutdown that lands while a failed draft is being deleted.

The failure branch of the draft path deletes the draft before it answers.
A cancel arriving then must end the send as a cancel (L{SendCancelledError},
saying whether Graph may have the message), not as the step's own failure,
and the draft must still be deleted, in the background.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.result import SendCancelledError
from tests.fakegraph import Fault
from tests.providers.graph import test_provider as tp


def _until(h: tp.Harness, route: str) -> None:
    """Let time pass until the fake has received one request on C{route}."""
    for _ in range(100):
        if h.fake.routes(route):
            break
        h.clock.advance(0.5)
        h.stub.flush()
    assert len(h.fake.routes(route)) == 1, route


class CancelWhileDeletingTests(SynchronousTestCase):
    def cancel_while_deleting(self, h: tp.Harness) -> SendCancelledError:
        """Send a big message, cancel it while Graph is answering its deleteDraft."""
        h.fake.script("deleteDraft", Fault(delay=5.0))
        email, _ = tp._big_email()
        d = h.send(email)
        _until(h, "deleteDraft")
        self.assertEqual(h.fake.deleted, [])
        d.cancel()
        error = self.failureResultOf(d, SendCancelledError).value
        assert isinstance(error, SendCancelledError)
        h.run()
        # The clean-up still happens: no draft is left for anyone to send by hand.
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(h.fake.deliveries, [])
        return error

    def test_failed_upload(self) -> None:
        """An upload that failed for good: nothing was sent, so not handed over."""
        h = tp.Harness()
        h.fake.script("upload", *[Fault(500, "InternalServerError")] * 4)
        self.assertFalse(self.cancel_while_deleting(h).handed_over)

    def test_failed_send_that_may_have_gone(self) -> None:
        """A sendDraft whose first answer was lost (Graph may have it), then refused:
        the cancel says handed over, as a cancel during the send itself would."""
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True), *[Fault(503, "ServiceUnavailable")] * 3)
        self.assertTrue(self.cancel_while_deleting(h).handed_over)


class CancelWhileConfirmingTests(SynchronousTestCase):
    def test_cancel_during_the_sent_items_lookup(self) -> None:
        """The send went through unseen and its retry found the draft gone; a cancel while
        Sent Items is being searched ends the send as handed over (Graph may have sent it)."""
        h = tp.Harness()
        h.fake.script("sendDraft", Fault(drop=True, after_processing=True))
        h.fake.script("findSent", Fault(delay=5.0))
        email, _ = tp._big_email()
        d = h.send(email)
        _until(h, "findSent")
        d.cancel()
        error = self.failureResultOf(d, SendCancelledError).value
        assert isinstance(error, SendCancelledError)
        self.assertTrue(error.handed_over)
        h.run()
        self.assertEqual(len(h.fake.deliveries), 1)
