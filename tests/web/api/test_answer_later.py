"""A submission the provider has not finished with when the request is read.

The submission endpoints answer at once when the delivery's outcome is
already known (the common case in direct mode), and otherwise wait for it.
These tests hold the waiting path: the answer comes when the provider is
done, and a client that went away meanwhile causes no error: its send is
cancelled unless the provider had handed the message over, and either way
what became of the message is logged.
"""

from __future__ import annotations

import gc
import json

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers

from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.providers.result import SendCancelledError, current_handover
from tests.support import RecordingProvider, async_test
from tests.test_handover_at_stop import CLIENT_GONE, GONE_AFTER_HANDOVER
from tests.web.api.harness import SECRET, ApiServer, LogCapture, message


async def _until(condition: object) -> None:
    """Let the reactor run until C{condition()} holds (a few seconds at most)."""
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never held")


class HandingOverProvider(RecordingProvider):
    """The recording provider, marking each send handed over as it starts (an upstream
    that has the final dot, Graph's send request on the wire)."""

    def send(self, email: Email) -> defer.Deferred[None]:
        current_handover().mark()
        return super().send(email)


class AnswerLaterTests(TestCase):
    @async_test
    async def test_answered_when_the_provider_finishes(self) -> None:
        """A provider that takes its time: the request waits and is answered 200 with the
        message id once the send completes, and a later refusal is answered 502."""
        server = ApiServer(self)
        held: defer.Deferred[None] = defer.Deferred()
        server.provider.outcomes.append(held)
        pending = defer.ensureDeferred(server.send(message()))
        await _until(lambda: server.provider.emails)
        self.assertNoResult(pending)
        held.callback(None)
        answer = await pending
        self.assertEqual((answer.status, answer.json["status"]), (200, "delivered"))

        refused: defer.Deferred[None] = defer.Deferred()
        server.provider.outcomes.append(refused)
        pending = defer.ensureDeferred(server.send(message()))
        await _until(lambda: len(server.provider.emails) == 2)
        refused.errback(PermanentDeliveryError("no such user", "5.1.1"))
        answer = await pending
        self.assertEqual((answer.status, answer.json["error"]["code"]), (502, "rejected"))

    async def _leave_while_sending(
        self, server: ApiServer, held: defer.Deferred[None], logs: LogCapture
    ) -> None:
        """Submit, close the connection while C{held} is the provider's send, then end it."""
        server.provider.outcomes.append(held)
        headers = Headers(
            {
                b"authorization": [f"Bearer {SECRET}".encode()],
                b"content-type": [b"application/json"],
            }
        )
        request = server.client.request(
            "POST",
            server.base + "/v1/messages",
            data=json.dumps(message()).encode(),
            headers=headers,
        )
        await _until(lambda: server.provider.emails)
        request.cancel()  # closes the connection
        with self.assertRaises(ResponseNeverReceived):
            await request
        await task.deferLater(reactor, 0.05, lambda: None)
        if not held.called:
            held.callback(None)
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(logs.named("http api request failed"), [])
        self.assertEqual(logs.named("http api request refused"), [])
        gc.collect()  # an error left in a Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])
        # The listener still answers.
        self.assertEqual((await server.send(message())).status, 200)

    @async_test
    async def test_client_gone_after_the_hand_over(self) -> None:
        """A client that closes its connection after the provider handed the message
        over: the send goes on (a cancel could not take it back), and when it completes,
        answering the gone client raises nothing (no logged error, none left in a
        Deferred, no answer written), the delivery's outcome is logged and the listener
        still answers the next request."""
        logs = LogCapture(self)
        server = ApiServer(self, provider=HandingOverProvider())
        await self._leave_while_sending(server, defer.Deferred(), logs)
        self.assertEqual(len(logs.named("message delivered")), 2, logs.text())
        self.assertEqual(len(logs.named(GONE_AFTER_HANDOVER)), 1, logs.text())
        self.assertEqual(logs.named(CLIENT_GONE), [])

    @async_test
    async def test_client_gone_before_the_hand_over(self) -> None:
        """A client that closes its connection while the provider has not handed the
        message over: the send is cancelled (the client will retry; the retry must be
        the only copy), one client-gone line says so, nothing is answered to the closed
        request and nothing raises."""
        logs = LogCapture(self)
        server = ApiServer(self)

        def cancel(d: defer.Deferred[None]) -> None:
            d.errback(SendCancelledError(handed_over=False))

        held: defer.Deferred[None] = defer.Deferred(cancel)
        await self._leave_while_sending(server, held, logs)
        [line] = logs.named(CLIENT_GONE)
        self.assertEqual(line["front_door"], "http")
        # Only the second submission, answered 200, was delivered.
        self.assertEqual(len(logs.named("message delivered")), 1, logs.text())
