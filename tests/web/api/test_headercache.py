"""L{smtpproxy.web.api.headercache}: the kept header objects change no byte of a message."""

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
    """The message built and written with the kept tables, and with the stock SMTP policy."""
    request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
    ours = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    mine = compose.encode_message(ours, 1 << 20)
    # The same message with every header made again by the stock policy's
    # own registry (in every part), so nothing kept is reused.
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
        """Messages built twice (the second from kept objects) write the same bytes as the
        stock C{email.policy.SMTP} writes them: text, HTML, attachments, non-ASCII."""
        documents = [
            message(text="plain"),
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
        self.assertLessEqual(len(headercache._folded), headercache.KEPT)
