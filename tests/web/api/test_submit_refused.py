"""An HTTP submission without a queue that the provider takes for some recipients only."""

from __future__ import annotations

from typing import cast

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.web.api.openapi import document
from smtpproxy.web.api.submit import Submitter
from tests.support import RecordingProvider, async_test, message
from tests.test_delivery import PartlyRefusingProvider
from tests.web.api.harness import ApiServer
from tests.web.api.harness import message as api_message


class PartlyRefusedOverHttpTests(TestCase):
    @async_test
    async def test_refused_recipients_named_at_error_as_over_smtp(self) -> None:
        """Direct mode over HTTP: the provider took the message for b@ and refused busy@
        with 450; the submission is delivered (200), and, as on the SMTP side, the refused
        recipient, whom nothing retries without a queue, is named in an error line.  Before,
        the HTTP path left no error-level trace of it."""
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = cast(IReactorTime, reactor)
        submitter = Submitter(PartlyRefusingProvider(), clock, MessageParser(clock))
        accepted = await submitter.submit(
            "a@example.com",
            ["b@example.org", "busy@example.org"],
            message("Partly"),
            {"request_id": "r1", "client": "127.0.0.1"},
        )
        self.assertEqual(accepted.status, "delivered")
        [line] = [
            e
            for e in events
            if e.get("log_format") == "recipients refused and not retried (no queue)"
        ]
        self.assertEqual(line["log_level"], LogLevel.error)
        self.assertEqual(line["id"], accepted.id)
        self.assertEqual(line["refused"], ["<busy@example.org> 450 4.2.1 Mailbox busy"])
        self.assertEqual((line["accepted"], line["temporary"]), (1, 1))


class PartlyRefusedAnswerTests(TestCase):
    @async_test
    async def test_answer_names_who_did_not_get_it(self) -> None:
        """Over real HTTP, direct mode: the provider took the message for b@ and refused
        busy@.  The answer stays 200 "delivered" (the client must not send it again to
        those who have it), and names busy@ with the provider's reply in
        C{not_delivered}, as the document's 200 schema describes; a message every
        recipient got has no such field."""
        server = ApiServer(self, provider=cast(RecordingProvider, PartlyRefusingProvider()))
        answer = await server.send(api_message(to=["b@example.org", "busy@example.org"]))
        self.assertEqual(answer.status, 200, answer.body)
        body = answer.json
        self.assertEqual(body["status"], "delivered")
        self.assertEqual(
            body["not_delivered"],
            [{"recipient": "busy@example.org", "reply": "450 4.2.1 Mailbox busy"}],
        )
        operation = document()["paths"]["/v1/messages"]["post"]
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        self.assertLessEqual(set(schema["required"]), set(body))
        self.assertLessEqual(set(body), set(schema["properties"]))
        items = schema["properties"]["not_delivered"]["items"]
        for entry in body["not_delivered"]:
            self.assertEqual(set(entry), set(items["required"]))
            self.assertEqual(set(entry), set(items["properties"]))
        whole = await ApiServer(self).send(api_message())
        self.assertEqual(whole.status, 200, whole.body)
        self.assertNotIn("not_delivered", whole.json)
