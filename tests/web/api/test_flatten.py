"""L{smtpproxy.web.api.flatten}: a body written in one piece gives C{as_bytes}'s bytes exactly.

The API serialises its messages with L{OnePieceGenerator}, which writes a
leaf part's ASCII body with one call instead of the generator's call per
line and line end.  These tests hold its output equal, byte for byte, to
C{Message.as_bytes} of the same message: over generated API requests (as
built by L{compose.build_message}: single parts, alternatives, attachments)
and over generated messages the API never builds (bare CRs, CR before
CRLF, no body, 8-bit and surrogate-escaped bodies, other charsets, other
policies, payloads the generator refuses), where it must write what the
generator writes or fail as the generator fails.
"""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime
from email.charset import BASE64, QP, Charset
from email.message import Message
from email.policy import Policy
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api import compose, flatten
from smtpproxy.web.api.flatten import as_bytes
from smtpproxy.web.api.headercache import POLICY
from smtpproxy.web.api.problems import ApiError
from tests.web.api.test_direct import requests

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

_POLICIES: list[Policy] = [
    POLICY,
    email.policy.SMTP,
    email.policy.default,
    email.policy.compat32,
    email.policy.SMTP.clone(cte_type="7bit"),
]
#: Text whose line ends are any mix of CRLF, CR and LF (a CR before a CRLF too).
_body_text = st.lists(
    st.one_of(
        st.text(alphabet="ab -=.From>", max_size=90),
        st.sampled_from(["\r\n", "\n", "\r", "\r\r\n", "\n\r", ""]),
        st.text(max_size=20),
    ),
    max_size=12,
).map("".join)


def outcome(write: Any) -> bytes | str:
    """The bytes C{write()} returns, or the name of the exception it raises."""
    try:
        data: bytes = write()
    except Exception as e:
        return type(e).__name__
    return data


@st.composite
def leaf_messages(draw: st.DrawFn) -> tuple[Message, Policy]:
    """A single-part message of any content type, charset and body, and a policy to write it."""
    policy = draw(st.sampled_from(_POLICIES))
    message = Message(policy=policy)
    for name, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from(["Subject", "X-Tag", "Comments", "X-Other"]),
                st.text(alphabet="abc <>@.,\"'é", max_size=120),
            ),
            max_size=3,
            unique_by=lambda header: header[0],
        )
    ):
        message[name] = value
    kind = draw(
        st.sampled_from(
            ["text/plain", "text/html", "application/octet-stream", "multipart/mixed", None]
        )
    )
    body = draw(st.one_of(st.none(), _body_text))
    how = draw(st.sampled_from(["str", "bytes", "charset", "param"]))
    charset = draw(st.sampled_from(["utf-8", "UTF-8", "us-ascii", "iso-8859-1", "koi8-r"]))
    if kind is not None:
        message["Content-Type"] = kind
    if body is None:
        return message, policy
    if how == "str":
        # As set, possibly non-ASCII: the generator refuses to encode that.
        message.set_payload(body)
    elif how == "bytes":
        # 8-bit bytes, kept surrogate-escaped.
        message.set_payload(body.encode("utf-8"))
    elif how == "param":
        message.set_param("charset", charset)
        message.set_payload(body.encode("utf-8", "replace"))
    else:
        encoded = Charset("utf-8")
        encoded.body_encoding = draw(st.sampled_from([QP, BASE64, None]))  # type: ignore[assignment]
        message.set_payload(body, encoded)
    return message, policy


class OnePieceTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(requests())
    def test_api_messages(self, document: dict[str, Any]) -> None:
        """Every message the API builds from a valid request is written byte for byte as
        C{as_bytes(policy=POLICY)} writes it (the one-piece writer first, so it also
        chooses the boundaries the second run then reuses)."""
        try:
            request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
        except ApiError:
            assume(False)
            raise
        message = compose.build_message(request, message_id="<a@relay.test>", now=NOW)
        mine = as_bytes(message, POLICY)
        self.assertEqual(mine, message.as_bytes(policy=POLICY))

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(leaf_messages())
    def test_any_leaf(self, case: tuple[Message, Policy]) -> None:
        """A single part of any content type, charset, policy and body (line ends of every
        kind, none, 8-bit, non-ASCII as set) is written as C{as_bytes} writes it, or fails
        with the same exception."""
        message, policy = case
        mine = outcome(lambda: as_bytes(message, policy))
        self.assertEqual(mine, outcome(lambda: message.as_bytes(policy=policy)))

    def test_line_ends(self) -> None:
        """CRLF, a lone CR, a lone LF and a CR before a CRLF each become one CRLF, as the
        generator's split makes them; a last line without a line end gets none."""
        message = Message(policy=POLICY)
        message["Content-Type"] = "text/plain"
        message.set_payload("a\r\nb\rc\nd\r\r\ne")
        self.assertEqual(as_bytes(message, POLICY), message.as_bytes(policy=POLICY))
        self.assertEqual(
            as_bytes(message, POLICY),
            b"Content-Type: text/plain\r\n\r\na\r\nb\r\nc\r\nd\r\n\r\ne",
        )

    def test_multipart_parts(self) -> None:
        """In a multipart message each part goes the short way and the container the
        generator's: preamble, epilogue and a given boundary are written as before."""
        outer = Message(policy=POLICY)
        outer["Content-Type"] = 'multipart/mixed; boundary="XYZ"'
        outer.preamble = "before"
        outer.epilogue = "after"
        for text in ("one\nline", "two\r\n"):
            part = Message(policy=POLICY)
            part["Content-Type"] = "text/plain"
            part.set_payload(text)
            outer.attach(part)
        self.assertEqual(as_bytes(outer, POLICY), outer.as_bytes(policy=POLICY))
        self.assertIn(
            b"--XYZ\r\nContent-Type: text/plain\r\n\r\none\r\nline\r\n--XYZ",
            as_bytes(outer, POLICY),
        )

    def test_kept_types_bounded(self) -> None:
        """Content types a client chooses cannot grow the table of known types past
        L{flatten.KEPT}, and parts whose types are no longer kept are still written as
        C{as_bytes} writes them."""
        for number in range(flatten.KEPT + 50):
            part = Message(policy=POLICY)
            part["Content-Type"] = f"application/x-kind{number}"
            part.set_payload("body\n")
            self.assertEqual(as_bytes(part, POLICY), part.as_bytes(policy=POLICY))
        self.assertLessEqual(len(flatten._LEAF_TYPES), flatten.KEPT)
