"""Pure tests of L{smtpproxy.web.api.compose}: strict reading, field checks, building."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import Message
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.smtp.commands import CommandError, parse_rcpt
from smtpproxy.web.api import compose
from smtpproxy.web.api.headercache import POLICY
from smtpproxy.web.api.problems import ApiError
from tests.web.api.harness import message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def read(document: dict[str, Any], **kw: Any) -> compose.JsonMessage:
    kw.setdefault("max_recipients", 50)
    kw.setdefault("max_size", 1 << 20)
    return compose.read_json_message(document, **kw)


def built(document: dict[str, Any]) -> email.message.EmailMessage:
    data = compose.encode_message(
        compose.build_message(read(document), message_id="<id@relay.test>", now=NOW), 1 << 20
    )
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


class JsonTests(SynchronousTestCase):
    def refused(self, body: bytes) -> ApiError:
        with self.assertRaises(ApiError) as caught:
            compose.parse_json(body)
        error: ApiError = caught.exception
        return error

    def test_strict_json(self) -> None:
        """Not UTF-8, not JSON, not an object, NaN, a duplicate name or absurd nesting are
        each 400 invalid_json, never an exception of another kind."""
        for body in (
            b"\xff{}",
            b"{",
            b"[]",
            b'{"a": NaN}',
            b'{"from": "a@b.example", "from": "c@d.example"}',
            b"[" * 100_000 + b"]" * 100_000,
        ):
            error = self.refused(body)
            self.assertEqual((error.status, error.code), (400, "invalid_json"), body[:20])

    def test_duplicate_names_the_field(self) -> None:
        """A field given twice is named, so the client knows which."""
        self.assertEqual(self.refused(b'{"to": [], "to": []}').field, "to")


class FieldTests(SynchronousTestCase):
    def refused(self, document: dict[str, Any], **kw: Any) -> ApiError:
        with self.assertRaises(ApiError) as caught:
            read(document, **kw)
        error: ApiError = caught.exception
        return error

    def test_unknown_fields_named(self) -> None:
        """An unknown field at the top, in an attachment or in an address object is 400
        unknown_field naming where it is."""
        cases = {
            "bogus": message(bogus=1),
            "attachments[0].size": message(
                attachments=[{"filename": "a", "content": "", "size": 1}]
            ),
            "from.email": message(**{"from": {"address": "a@b.example", "email": "x"}}),
        }
        for field, document in cases.items():
            error = self.refused(document)
            self.assertEqual((error.code, error.field), ("unknown_field", field))

    def test_control_characters_in_header_fields(self) -> None:
        """CR, LF, NUL, tab, DEL, a C1 control or U+2028 in any header-bound field is 400
        header_injection naming the field."""
        fields: dict[str, Any] = {
            "subject": lambda v: message(subject=v),
            "from": lambda v: message(**{"from": "a@b.example" + v}),
            "from.name": lambda v: message(**{"from": {"address": "a@b.example", "name": v}}),
            "to[0]": lambda v: message(to=["c@d.example" + v]),
            "reply_to": lambda v: message(reply_to="r@d.example" + v),
            "attachments[0].filename": lambda v: message(
                attachments=[{"filename": "x" + v, "content": ""}]
            ),
            "headers.X-Tag": lambda v: message(headers={"X-Tag": "t" + v}),
        }
        for field, make in fields.items():
            for bad in (
                "\r\nBcc: x@evil.example",
                "\n",
                "\r",
                "\x00",
                "\t",
                "\x7f",
                "\x85",
                "\u2028",
            ):
                error = self.refused(make(bad))
                self.assertEqual((error.code, error.field), ("header_injection", field), repr(bad))

    def test_addresses(self) -> None:
        """Syntax errors, quoted local parts, address literals, single-label domains and
        over-long addresses are 400 invalid_address; an IDN domain becomes A-labels."""
        for bad in (
            "no-at",
            "a@",
            "@b.example",
            '"quoted"@b.example',
            "a@[127.0.0.1]",
            "root@localhost",
            "a" * 65 + "@b.example",
            "a@" + "b" * 250 + ".example",
            "a b@c.example",
            "zoë@b.example",
        ):
            error = self.refused(message(to=[bad]))
            self.assertEqual((error.code, error.field), ("invalid_address", "to[0]"), bad)
        checked = read(message(to=["zoe@exämple.test"]))
        self.assertEqual(checked.to[0].address, "zoe@xn--exmple-cua.test")

    def test_types_and_counts(self) -> None:
        """Wrong types, no recipient, too many recipients, bad base64 and disallowed
        headers are refused with the field named."""
        cases = [
            (message(to="a@b.example"), "invalid_field", "to"),
            (message(to=[]), "missing_field", "to"),
            (message(to=["a@b.example"] * 3), "too_many_recipients", "to"),
            (message(subject=5), "invalid_field", "subject"),
            (message(text=["x"]), "invalid_field", "text"),
            (
                message(attachments=[{"filename": "a", "content": "not base64!"}]),
                "invalid_field",
                "attachments[0].content",
            ),
            (
                message(attachments=[{"filename": "a", "content": "", "inline": "yes"}]),
                "invalid_field",
                "attachments[0].inline",
            ),
            (message(headers={"From": "x@evil.example"}), "header_not_allowed", "headers.From"),
            (message(headers={"X-A:b": "c"}), "header_injection", "headers.X-A:b"),
        ]
        for document, code, field in cases:
            error = self.refused(document, max_recipients=2)
            self.assertEqual((error.code, error.field), (code, field), document)

    def test_missing_sender(self) -> None:
        """No from: 400 missing_field from."""
        document = message()
        del document["from"]
        self.assertEqual(self.refused(document).field, "from")

    def test_oversize_attachment_refused_before_decoding(self) -> None:
        """base64 longer than the size limit could ever hold is 413 before it is decoded."""
        big = "A" * 4000
        error = self.refused(message(attachments=[{"filename": "a", "content": big}]), max_size=100)
        self.assertEqual((error.status, error.field), (413, "attachments[0].content"))


class BuildTests(SynchronousTestCase):
    def test_headers_built_by_email(self) -> None:
        """Display names with specials and non-ASCII are quoted or encoded by the email
        package, and read back as given; Bcc is not a header."""
        parsed = built(
            message(
                **{"from": {"address": "a@b.example", "name": 'Smith, "Jo" é'}},
                bcc=["secret@b.example"],
                subject="Grüße, 100%",
            )
        )
        self.assertEqual(parsed["From"].addresses[0].display_name, 'Smith, "Jo" é')
        self.assertEqual(parsed["Subject"], "Grüße, 100%")
        self.assertIsNone(parsed["Bcc"])
        self.assertEqual(parsed["Date"], "Mon, 30 Nov 2026 12:00:00 +0000")

    def test_bodies_and_attachments(self) -> None:
        """text + html make multipart/alternative; attachments follow, inline ones with
        their Content-ID; a UTF-8 file name survives."""
        parsed = built(
            message(
                html="<p>hi <img src='cid:logo@x'></p>",
                attachments=[
                    {
                        "filename": "logo.png",
                        "content_type": "image/png",
                        "content": base64.b64encode(b"\x89PNG").decode(),
                        "content_id": "logo@x",
                        "inline": True,
                    },
                    {"filename": "résumé.pdf", "content": base64.b64encode(b"%PDF").decode()},
                ],
            )
        )
        self.assertEqual(parsed.get_content_type(), "multipart/mixed")
        body = parsed.get_body(("html",))
        assert body is not None
        self.assertIn("cid:logo@x", body.get_content())
        parts = list(parsed.iter_attachments())
        self.assertEqual([p.get_filename() for p in parts], ["logo.png", "résumé.pdf"])
        self.assertEqual(parts[0]["Content-ID"], "<logo@x>")
        self.assertEqual(parts[0].get_content_disposition(), "inline")
        self.assertEqual(parts[1].get_content(), b"%PDF")

    def test_encoded_size_limit(self) -> None:
        """Past the size limit after encoding (base64 grows content by a third): 413."""
        content = base64.b64encode(b"x" * 900).decode()
        request = read(message(attachments=[{"filename": "a", "content": content}]))
        with self.assertRaises(ApiError) as caught:
            compose.encode_message(
                compose.build_message(request, message_id="<i@r>", now=NOW), 1000
            )
        self.assertEqual(caught.exception.status, 413)

    @given(st.text(max_size=200))
    def test_any_subject_is_refused_or_read_back_unchanged(self, subject: str) -> None:
        """Whatever the subject, it is either refused (400) or arrives as sent (blanks at
        its ends and runs of them aside, which folding may change): nothing a client
        writes there can add a header."""
        try:
            parsed = built(message(subject=subject, headers={"X-Marker": "m"}))
        except ApiError as e:
            self.assertEqual(e.status, 400)
            return
        self.assertEqual(" ".join(str(parsed["Subject"]).split()), " ".join(subject.split()))
        self.assertEqual(len(parsed.get_all("X-Marker") or []), 1)
        self.assertIsNone(parsed["Bcc"])


class RawTests(SynchronousTestCase):
    def test_query_envelope(self) -> None:
        """from exactly once, to at least once, nothing else; addresses checked."""
        data = b"Subject: x\r\n\r\n"
        raw = compose.read_raw_query(
            {b"from": [b"a@b.example"], b"to": [b"c@d.example", b"e@f.example"]},
            data,
            max_recipients=5,
        )
        self.assertEqual(raw.envelope_recipients, ["c@d.example", "e@f.example"])
        self.assertIs(raw.data, data)
        for args, field in (
            ({b"to": [b"c@d.example"]}, "from"),
            ({b"from": [b"a@b.example", b"x@b.example"], b"to": [b"c@d.example"]}, "from"),
            ({b"from": [b"a@b.example"]}, "to"),
            ({b"from": [b"a@b.example"], b"to": [b"c@d.example"], b"cc": [b"x"]}, "cc"),
            ({b"from": [b"a@b.example\r\n"], b"to": [b"c@d.example"]}, "from"),
            ({b"from": [b"a@b.example"], b"to": [b"\xff@d.example"]}, "to[0]"),
        ):
            with self.assertRaises(ApiError) as caught:
                compose.read_raw_query(args, data, max_recipients=5)
            self.assertEqual(caught.exception.field, field, args)

    def test_json_form(self) -> None:
        """{"from", "to", "data"} and nothing else; data is strict base64."""
        data = b"Subject: x\r\n\r\nbody\r\n"
        raw = compose.read_raw_json(
            {"from": "a@b.example", "to": ["c@d.example"], "data": base64.b64encode(data).decode()},
            max_recipients=5,
            max_size=1000,
        )
        self.assertEqual(raw.data, data)
        with self.assertRaises(ApiError) as caught:
            compose.read_raw_json(
                {"from": "a@b.example", "to": ["c@d.example"], "data": "", "subject": "x"},
                max_recipients=5,
                max_size=1000,
            )
        self.assertEqual(
            (caught.exception.code, caught.exception.field), ("unknown_field", "subject")
        )

    def test_utf8_local_parts_follow_the_smtp_front_door(self) -> None:
        """Both raw forms take a UTF-8 local part exactly when SMTP takes it after
        SMTPUTF8 (parse_rcpt's check: syntax, lengths in octets, IDN domains); the domain
        becomes A-labels, the local part stays as typed."""
        data = b"Subject: x\r\n\r\nbody\r\n"

        def both(address: str) -> list[str]:
            by_query = compose.read_raw_query(
                {b"from": [b"a@b.example"], b"to": [address.encode()]}, data, max_recipients=5
            )
            by_json = compose.read_raw_json(
                {"from": address, "to": ["c@d.example"], "data": base64.b64encode(data).decode()},
                max_recipients=5,
                max_size=1000,
            )
            return [by_query.envelope_recipients[0], by_json.sender.address]

        for good, expected in (
            ("zo\u00eb@b.example", "zo\u00eb@b.example"),
            ("\u7528\u6237@ex\u00e4mple.test", "\u7528\u6237@xn--exmple-cua.test"),
            ("\u00e9" * 32 + "@b.example", "\u00e9" * 32 + "@b.example"),
        ):
            parse_rcpt(f"TO:<{good}>", smtputf8=True)
            self.assertEqual(both(good), [expected, expected])
        for bad in (
            "\u00e9" * 33 + "@b.example",  # 66 octets: longer than a local part may be
            "zo\u00eb..x@b.example",
            ".zo\u00eb@b.example",
            "zo\u00eb@\u00e4..test",
        ):
            with self.assertRaises(CommandError):
                parse_rcpt(f"TO:<{bad}>", smtputf8=True)
            with self.assertRaises(ApiError) as caught:
                both(bad)
            self.assertEqual(caught.exception.code, "invalid_address", bad)

    def test_query_plus_is_a_space(self) -> None:
        """A '+' sent unencoded arrives as a space: refused, and the message says to write
        %2B (never delivered to a different address)."""
        with self.assertRaises(ApiError) as caught:
            compose.read_raw_query(
                {b"from": [b"a@b.example"], b"to": [b"a b@d.example"]}, b"x", max_recipients=5
            )
        error = caught.exception
        self.assertEqual((error.status, error.code, error.field), (400, "invalid_address", "to[0]"))
        self.assertIn("%2B", str(error))

    def test_empty_message_refused_in_both_forms(self) -> None:
        """An empty message is 400 invalid_field in both forms (body / data), not handed on."""
        with self.assertRaises(ApiError) as caught:
            compose.read_raw_query(
                {b"from": [b"a@b.example"], b"to": [b"c@d.example"]}, b"", max_recipients=5
            )
        self.assertEqual((caught.exception.status, caught.exception.field), (400, "body"))
        with self.assertRaises(ApiError) as caught:
            compose.read_raw_json(
                {"from": "a@b.example", "to": ["c@d.example"], "data": ""},
                max_recipients=5,
                max_size=1000,
            )
        self.assertEqual(
            (caught.exception.status, caught.exception.code, caught.exception.field),
            (400, "invalid_field", "data"),
        )


class KeptAddressTests(SynchronousTestCase):
    @given(
        st.one_of(
            st.text(max_size=40),
            st.emails(),
            st.sampled_from(["a@b.example", "A@B", "zo\u00eb@b.example"]),
        )
    )
    def test_kept_result_is_the_checked_result(self, value: str) -> None:
        """An address checked again (its result kept) gives what the checks give: the same
        mailbox, or the same refusal naming the field of this call, with and without UTF-8
        local parts allowed (a result kept for one is never given for the other)."""
        for field, utf8_local in (("to[0]", False), ("from", False), ("from", True)):
            try:
                fresh: compose.Mailbox | ApiError = compose._check_address(value, field, utf8_local)
            except ApiError as e:
                fresh = e
            for _ in range(2):
                try:
                    kept: compose.Mailbox | ApiError = compose.check_address(
                        value, field, utf8_local=utf8_local
                    )
                except ApiError as e:
                    kept = e
                if isinstance(fresh, ApiError):
                    assert isinstance(kept, ApiError)
                    self.assertEqual(
                        (kept.status, kept.code, kept.field), (fresh.status, fresh.code, field)
                    )
                else:
                    self.assertEqual(kept, fresh)

    def test_overlong_text_never_kept(self) -> None:
        """A text longer than any address is refused without entering the table of kept
        results, so large values cannot pile up in it."""
        before = compose._valid_mailbox.cache_info().currsize
        with self.assertRaises(ApiError):
            compose.check_address("a" * 5000 + "@example.org", "to[0]")
        self.assertEqual(compose._valid_mailbox.cache_info().currsize, before)
        self.assertLessEqual(
            compose._valid_mailbox.cache_info().maxsize or 0, compose.KEPT_ADDRESSES
        )


class LinesFitTests(SynchronousTestCase):
    @given(
        st.text(alphabet=st.sampled_from("ab\n\r\x0b\x1c\x85\u2028é"), max_size=200),
        st.integers(min_value=0, max_value=12),
    )
    def test_same_as_the_wire_lines(self, text: str, limit: int) -> None:
        """L{compose.lines_fit} answers what the longest line cut at CR and LF only says
        (as the wire cuts; form feeds, VT, NEL and the Unicode separators stay inside a
        line), for text with LF only (the fast way) and with CR too."""
        lines = re.split("\r\n|\r|\n", text)
        if text.endswith(("\r", "\n")):
            lines.pop()
        expected = max(map(len, lines), default=0) <= limit
        self.assertEqual(compose.lines_fit(text, limit), expected)

    @given(st.lists(st.integers(min_value=0, max_value=30), max_size=30), st.integers(0, 30))
    def test_lf_only_lines_of_every_length(self, lengths: list[int], limit: int) -> None:
        """Lines of every length around the limit, joined by LF, with or without a last LF."""
        for text in ("\n".join("x" * n for n in lengths), "".join("x" * n + "\n" for n in lengths)):
            expected = max(map(len, text.splitlines()), default=0) <= limit
            self.assertEqual(compose.lines_fit(text, limit), expected)


class PlainPartTests(SynchronousTestCase):
    @given(
        st.lists(
            st.sampled_from(["a", " ", "\n", "\r", "é", "€", "\x0b", "x" * 90, "y" * 1000]),
            max_size=40,
        ).map("".join)
    )
    def test_plain_part_as_set_charset_makes_it(self, text: str) -> None:
        """A C{text/plain} part (7bit, 8bit, quoted-printable or base64) is written byte
        for byte as the part the package makes with C{set_payload(text, Charset)}, which
        adds its MIME headers itself: same headers in the same order, same body."""
        mine = compose._text_part(text, "plain")
        reference = Message(policy=POLICY)
        cte = compose.transfer_encoding(text)
        body = text if text.endswith(("\n", "\r")) else text + "\n"
        if cte == "base64":
            reference.set_payload(compose.wire_text(text), compose._BASE64)
        elif cte == "quoted-printable":
            reference.set_payload(body, compose._QUOTED)
        else:
            reference["Content-Transfer-Encoding"] = cte
            reference.set_payload(body, compose._AS_IS)
        self.assertEqual(mine.as_bytes(policy=POLICY), reference.as_bytes(policy=POLICY))
        self.assertEqual(mine.items(), reference.items())
