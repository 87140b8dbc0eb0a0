"""Review attacks on the API compose module: hostile JSON ends in an ApiError, never a traceback."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api import compose
from smtpproxy.web.api.problems import ApiError

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _submit(body: bytes) -> bytes:
    document = compose.parse_json(body)
    request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
    message = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    return compose.encode_message(message, 1 << 20)


class LoneSurrogateTests(SynchronousTestCase):
    """JSON lets a string escape a lone UTF-16 surrogate (C{\\ud800}); UTF-8 cannot carry one."""

    def assertRefused(self, field: bytes) -> None:
        body = b'{"from":"a@b.example","to":["c@d.example"],"' + field + b'":"a\\ud800b"}'
        try:
            _submit(body)
        except ApiError as e:
            self.assertEqual(e.status, 400)
        else:
            self.fail("a lone surrogate was accepted")

    def test_subject(self) -> None:
        """A lone surrogate in the subject is a 400, not a UnicodeEncodeError (a 500)."""
        self.assertRefused(b"subject")

    def test_text(self) -> None:
        """A lone surrogate in the text body is a 400, not a UnicodeEncodeError (a 500)."""
        self.assertRefused(b"text")

    def test_html(self) -> None:
        """A lone surrogate in the HTML body is a 400, not a UnicodeEncodeError (a 500)."""
        self.assertRefused(b"html")

    def test_sender_address(self) -> None:
        """A lone surrogate in the sender's domain is a 400, not a crash in the address checks."""
        body = b'{"from":"a@b\\ud800.example","to":["c@d.example"]}'
        with self.assertRaises(ApiError):
            compose.read_json_message(compose.parse_json(body), max_recipients=50, max_size=1 << 20)

    def test_raw_recipient(self) -> None:
        """A lone surrogate in a raw submission's recipient is a 400, not a UnicodeEncodeError."""
        body = b'{"from":"a@b.example","to":["c@d\\udc00.example"],"data":"QQ=="}'
        with self.assertRaises(ApiError):
            compose.read_raw_json(compose.parse_json(body), max_recipients=50, max_size=1 << 20)
