"""L{smtpproxy.web.api.headercache}: values kept as set and kept header objects change no byte."""

from __future__ import annotations

import base64
import email.policy
import re
from datetime import UTC, datetime
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api import compose, headercache
from tests.web.api.harness import message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_BOUNDARY = re.compile(rb"={15}\d+==")


def both(document: dict[str, Any]) -> tuple[bytes, bytes]:
    """The message built and written with L{headercache.POLICY}, and with the stock SMTP policy."""
    request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
    ours = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    mine = compose.encode_message(ours, 1 << 20)
    # The same message with every header made again by the stock policy's
    # own registry (in every part): each value parsed and folded, nothing
    # kept as set and nothing kept is reused.
    fresh = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    for part in fresh.walk():
        part.policy = email.policy.SMTP
        for name, value in list(part.items()):
            del part[name]
            part[name] = str(value)
    stock = fresh.as_bytes(policy=email.policy.SMTP)
    return _BOUNDARY.sub(b"B", mine), _BOUNDARY.sub(b"B", stock)


class HeaderCacheTests(SynchronousTestCase):
    def test_same_bytes_as_the_stock_policy(self) -> None:
        """Messages built twice (the second from kept objects), their short ASCII values
        written as set, give the same bytes as the stock C{email.policy.SMTP} writes when it
        parses and folds every value: text, HTML, attachments, non-ASCII, quoted names."""
        documents = [
            message(text="plain"),
            message(
                **{"from": {"address": "a@b.example", "name": 'Smith, "Jo" (EU)'}},
                to=["c@d.example", {"address": "e@f.example", "name": "Zoë"}],
                subject="a " * 60,
                headers={"X-Tag": "t", "References": "<a@b> <c@d>"},
            ),
            message(text="é" * 100, html="<p>" + "x" * 1200 + "</p>"),
            message(
                html="<b>x</b>",
                attachments=[
                    {
                        "filename": "ä b.png",
                        "content_type": "image/png",
                        "inline": True,
                        "content": base64.b64encode(b"\x89PNG" * 50).decode(),
                        "content_id": "a@b",
                    },
                    {"filename": "r.pdf", "content": base64.b64encode(b"%PDF").decode()},
                ],
            ),
        ]
        for document in documents * 2:
            mine, stock = both(document)
            self.assertEqual(mine, stock)

    def test_tables_bounded(self) -> None:
        """Content types a client chooses cannot grow the kept tables past KEPT entries."""
        for i in range(headercache.KEPT + 50):
            document = message(
                attachments=[
                    {"filename": "f", "content_type": f"application/x-t{i}", "content": "AA=="}
                ]
            )
            compose.encode_message(
                compose.build_message(
                    compose.read_json_message(document, max_recipients=50, max_size=1 << 20),
                    message_id="<id@relay.test>",
                    now=NOW,
                ),
                1 << 20,
            )
        registry = headercache.POLICY.header_factory
        assert isinstance(registry, headercache._HeaderClasses)
        self.assertLessEqual(len(registry._mime), headercache.KEPT)
        self.assertLessEqual(len(registry._classes), headercache.KEPT)

    def test_line_breaks_refused(self) -> None:
        """A value with a line break is refused when set, as the stock policy refuses it:
        kept as set, it would end the header and start another."""
        for value in ("a\r\nBcc: x@evil.example", "a\nb", "a\rb"):
            with self.assertRaises(ValueError):
                headercache.POLICY.header_store_parse("Subject", value)
