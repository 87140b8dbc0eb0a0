"""What the provider counts and logs per request, by log level.

/metrics reads the Graph requests by status from the provider's own
counter; the per-request and per-message log events are built only at
the levels that keep them (building an event the filter then drops costs
CPU on every message: docs/performance.md, "Graph path CPU").
"""

from __future__ import annotations

import dataclasses
from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from tests.fakegraph import Fault, make_email
from tests.providers.graph.test_provider import Harness


def _run(level: str, *faults: Fault) -> tuple[GraphProvider, list[str]]:
    """Send one message at LOG_LEVEL C{level}; the provider and its events' formats.

    Only the events of the sending are kept, not those of the start-up.
    """
    h = Harness()
    if faults:
        h.fake.script("sendMail", *faults)
    config = dataclasses.replace(h.config, log_level=level)
    h.provider = GraphProvider(config, h.clock, cast(HTTPRequester, h.stub), jitter=lambda: 0)
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        d = h.send(make_email(("a@x.example",), to=("a@x.example",)))
        h.run()
        assert d.called
    finally:
        globalLogPublisher.removeObserver(observer)
    return h.provider, [str(e.get("log_format")) for e in events]


class RequestLogTests(SynchronousTestCase):
    def test_statuses_counted(self) -> None:
        """Every answered request is counted by status: the token, a 503, the retried send."""
        provider, _ = _run("warn", Fault(503))
        self.assertEqual(dict(provider.request_statuses), {200: 1, 503: 1, 202: 1})

    def test_debug_logs_each_request(self) -> None:
        """At debug, each request is logged; the message's acceptance too."""
        _, formats = _run("debug")
        self.assertEqual(formats.count("Graph request"), 2)
        self.assertEqual(formats.count("Graph accepted the message"), 1)

    def test_info_logs_the_message_not_the_requests(self) -> None:
        """At info, the acceptance is logged, no event per request."""
        _, formats = _run("info")
        self.assertEqual(formats.count("Graph request"), 0)
        self.assertEqual(formats.count("Graph accepted the message"), 1)

    def test_warn_builds_no_event_for_a_good_message(self) -> None:
        """At warn, a message accepted at once makes no Graph event at all."""
        _, formats = _run("warn")
        self.assertEqual([f for f in formats if "Graph" in f], [])

    def test_retries_logged_at_every_level(self) -> None:
        """A retry is a warning, logged (and counted by /metrics) whatever the level."""
        _, formats = _run("warn", Fault(503))
        self.assertEqual(formats.count("Graph request failed; retrying"), 1)
