"""Review 4: C{POST /v1/messages/raw}'s envelope readers (compose.read_raw_query / read_raw_json).

Pure tests of the readers the endpoint calls; each fails on the code as
reviewed and says what is wrong and what is expected.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api import compose
from smtpproxy.web.api.problems import ApiError

LOCAL = "jos\u00e9@example.org"


class NonAsciiLocalPartTests(SynchronousTestCase):
    """docs/http-api.md says "a non-ASCII local part must go through
    /v1/messages/raw", and /v1/messages refuses one with "a non-ASCII local
    part can only be sent with /v1/messages/raw".  But both raw readers check
    their addresses with the same compose.check_address (compose.py:258), which
    refuses every non-ASCII local part with that very message: the client is
    sent to an endpoint that refuses it too, and no API endpoint can send to
    or from such an address.  Expected: the raw endpoint takes an address
    with a UTF-8 local part (the provider or SMTPUTF8 decides further on)."""

    def test_query_form_takes_a_utf8_local_part(self) -> None:
        """?from=app@example.com&to=jos%C3%A9@example.org is read, not refused."""
        data = b"Subject: x\r\n\r\nbody\r\n"
        try:
            raw = compose.read_raw_query(
                {b"from": [b"app@example.com"], b"to": [LOCAL.encode("utf-8")]},
                data,
                max_recipients=5,
            )
        except ApiError as e:
            self.fail(f"refused: {e.status} {e.code} {e} (field {e.field})")
        self.assertEqual(raw.envelope_recipients, [LOCAL])

    def test_json_form_takes_a_utf8_local_part(self) -> None:
        """{"from": "jos\u00e9@example.org", ...} is read, not refused."""
        data = b"Subject: x\r\n\r\nbody\r\n"
        try:
            raw = compose.read_raw_json(
                {"from": LOCAL, "to": ["c@d.example"], "data": base64.b64encode(data).decode()},
                max_recipients=5,
                max_size=1000,
            )
        except ApiError as e:
            self.fail(f"refused: {e.status} {e.code} {e} (field {e.field})")
        self.assertEqual(raw.sender.address, LOCAL)


class EmptyJsonRawMessageTests(SynchronousTestCase):
    def test_json_form_refuses_an_empty_message(self) -> None:
        """The query form refuses an empty body ("the message is empty",
        compose.py:461), but the JSON form (read_raw_json, compose.py:436)
        takes C{"data": ""} and hands a zero-byte message to the queue or the
        provider (Graph answers it with an error, or a blank mail goes out).
        Expected: the same 400 invalid_field on C{data}."""
        with self.assertRaises(ApiError) as caught:
            compose.read_raw_json(
                {"from": "a@b.example", "to": ["c@d.example"], "data": ""},
                max_recipients=5,
                max_size=1000,
            )
        self.assertEqual((caught.exception.status, caught.exception.field), (400, "data"))
