"""Sends cancelled at a forced shutdown are counted in C{smtpproxy_messages_total}.

A cancelled send writes no C{message delivered} or C{message not delivered}
line, so before this it counted under no outcome at all.  The events come
from the real code: a direct-mode L{RelayMessage} whose provider is still
working when the session cancels it, and L{log_cancelled} itself, with the
L{Metrics} observer on the global log publisher as the relay runs it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.delivery import RelayMessage, log_cancelled
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import SendCancelledError
from smtpproxy.spool import MessageBody
from smtpproxy.web.metrics import Metrics
from tests.web.test_ops import samples

KEY = "smtpproxy_messages_total"


def _labels(
    outcome: str, door: str = "smtp", provider: str = "slow"
) -> tuple[str, tuple[tuple[str, str], ...]]:
    return KEY, (("front_door", door), ("outcome", outcome), ("provider", provider))


class _SlowProvider:
    """Never answers by itself; cancelling its send says nothing was handed over."""

    name = "slow"

    def __init__(self) -> None:
        self.sends: list[defer.Deferred[None]] = []

    def send(self, email: Email) -> defer.Deferred[None]:
        def cancel(d: defer.Deferred[None]) -> None:
            d.errback(SendCancelledError(handed_over=False))

        sending: defer.Deferred[None] = defer.Deferred(cancel)
        self.sends.append(sending)
        return sending

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class CancelledCountTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        globalLogPublisher.addObserver(self.metrics.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.metrics.observer)

    def test_cancelled_direct_send_counted(self) -> None:
        """Direct mode: the session cancels a send the provider has not finished (a forced
        shutdown); the message counts once, as cancelled, and under no other outcome."""
        provider = _SlowProvider()
        message = RelayMessage(
            provider, Clock(), "a@example.com", ["b@example.org"], "client", None
        )
        body = MessageBody()
        body.write(b"Subject: hi\r\n\r\nbody\r\n")
        message.bodyReceived(body)
        result = message.eomReceived()
        self.assertEqual(len(provider.sends), 1)
        message.cancel()
        self.failureResultOf(result, SendCancelledError)
        found = samples(self.metrics)
        self.assertEqual(found[_labels("cancelled")], 1)
        counted = [k for k, v in found.items() if k[0] == KEY and v]
        self.assertEqual(counted, [_labels("cancelled")])

    def test_outcomes_of_a_cancel(self) -> None:
        """Cancelled after the hand-over counts as cancelled_unknown, on the front door of the
        submission (HTTP here); a provider that finished with its own refusal or delivered
        anyway is not counted again (its own line was)."""
        http = {"id": "1", "provider": "smtp", "front_door": "http"}
        log_cancelled(http, SendCancelledError(handed_over=True))
        log_cancelled(http, SendCancelledError(handed_over=False))
        log_cancelled(http, TransientDeliveryError("upstream busy"))
        log_cancelled(http, None)
        found = samples(self.metrics)
        self.assertEqual(found[_labels("cancelled_unknown", "http", "smtp")], 1)
        self.assertEqual(found[_labels("cancelled", "http", "smtp")], 1)
        self.assertEqual(sum(v for k, v in found.items() if k[0] == KEY), 2)
