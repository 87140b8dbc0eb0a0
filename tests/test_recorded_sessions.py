"""Every recorded session gets the same replies and deliveries as when it was recorded.

See C{tests.recorder}: a few thousand reproducible random sessions were run
through the SMTP front door and their replies kept.  A change that alters
any reply byte, or what is delivered, fails here with the first session
that differs, so that behaviour only changes on purpose (re-record then,
and say why in the commit).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests import recorder


class RecordedSessionTests(SynchronousTestCase):
    def test_replies_and_deliveries_unchanged(self) -> None:
        """Replay every recorded session; replies and deliveries equal the recording."""
        recording = recorder.load()
        sessions = recorder.generate(recording["seed"], recording["sessions"])
        self.assertEqual(len(sessions), len(recording["results"]))
        for index, (session, expected) in enumerate(
            zip(sessions, recording["results"], strict=True)
        ):
            got = recorder.run(session)
            if got != expected:
                self.fail(
                    f"session {index} (auth={session.auth}) differs\n"
                    f"client wrote: {list(session.writes)!r}\n"
                    f"recorded replies:\n{expected['replies']}\n"
                    f"replies now:\n{got['replies']}\n"
                    f"recorded deliveries: {expected['delivered']}\n"
                    f"deliveries now: {got['delivered']}"
                )
        self.flushLoggedErrors()

    def test_recording_exercises_the_protocol(self) -> None:
        """The recording is not trivial: it holds deliveries, AUTH, STARTTLS and refusals."""
        results = recorder.load()["results"]
        replies = "".join(r["replies"] for r in results)
        self.assertGreater(sum(len(r["delivered"]) for r in results), 500)
        for marker in (
            "235 2.7.0",
            "535 5.7.8",
            "220 2.0.0 Ready to start TLS",
            "552 5.3.4",
            "452 4.5.3",
            "500 5.5.2",
            "221 2.0.0",
            "354 ",
        ):
            self.assertTrue(marker in replies, f"no {marker!r} in the recording")
