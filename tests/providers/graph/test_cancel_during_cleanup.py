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


class CancelWhileDeletingTests(SynchronousTestCase):
    def cancel_while_deleting(self, h: tp.Harness) -> SendCancelledError:
        """Send a big message, cancel it while Graph is answering its deleteDraft."""
        h.fake.script("deleteDraft", Fault(delay=5.0))
        email, _ = tp._big_email()
        d = h.send(email)
        for _ in range(100):
            if h.fake.routes("deleteDraft"):
                break
            h.clock.advance(0.5)
            h.stub.flush()
        self.assertEqual(len(h.fake.routes("deleteDraft")), 1)
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
