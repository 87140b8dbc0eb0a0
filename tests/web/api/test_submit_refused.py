"""An HTTP submission without a queue that the provider takes for some recipients only."""

from __future__ import annotations

from typing import cast

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.web.api.submit import Submitter
from tests.support import async_test, message
from tests.test_delivery import PartlyRefusingProvider


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
