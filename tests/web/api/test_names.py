"""L{smtpproxy.web.api.names}: header values written so that they read back as posted.

Unit and property tests of the encoder and the folder on their own, then
of whole messages the API builds: display names holding specials, C{=?},
long runs or non-ASCII; subjects and custom headers of any length up to
the limits.  Each message is read back as a recipient reads it: by the
C{email} package (policy C{default}), by the relay's own parser, and, for
encoded words, by C{email.header.decode_header} (RFC 2047 6.2's rule on
blanks between words).
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import time
from datetime import UTC, datetime
from email.header import decode_header, make_header
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.web.api import compose, names
from smtpproxy.web.api.problems import ApiError
from tests.web.api.harness import message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_BLANKS = re.compile("[ \t]+")

#: Printable ASCII, every RFC 5322 special among it, and the blank.
_ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_SPECIALS = '()<>[]:;@\\,."'
#: Any character the API takes in a header value (no controls, no line separators).
_ALLOWED = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
#: Text with what makes header values hard: specials, "=?", long runs, non-ASCII.
_hard_text = st.lists(
    st.one_of(
        st.text(_ASCII, max_size=20),
        st.sampled_from(["=?", "?=", "=?utf-8?q?Boss?=", "<evil@attacker.example>, ", '"', "\\"]),
        st.text(st.sampled_from(_SPECIALS + " y"), max_size=30),
        st.text(st.sampled_from("y"), min_size=70, max_size=300),
        st.text(_ALLOWED, max_size=20),
    ),
    max_size=12,
).map("".join)


def _built(document: dict[str, Any]) -> tuple[compose.JsonMessage, bytes]:
    """A valid C{document} built and serialised (a document the checks refuse is skipped)."""
    try:
        request = compose.read_json_message(document, max_recipients=500, max_size=1 << 22)
    except ApiError:
        assume(False)
        raise
    built = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    return request, compose.encode_message(built, 1 << 22)


def _raw(data: bytes, name: str) -> str:
    """Header C{name} as written after its colon, unfolded (line ends removed, blanks kept)."""
    fields: list[str] = []
    for line in data.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n"):
        if line[:1] in (" ", "\t"):
            fields[-1] += line
        else:
            fields.append(line)
    for field in fields:
        if field.lower().startswith(name.lower() + ":"):
            return field[len(name) + 1 :]
    raise AssertionError(f"no {name} header")


def _assert_lines(test: SynchronousTestCase, data: bytes) -> None:
    """Every line fits RFC 5322 (998) and no header line is only blanks."""
    head = data.split(b"\r\n\r\n", 1)[0]
    test.assertTrue(all(len(line) <= names.MAX_LINE for line in data.split(b"\r\n")))
    test.assertTrue(all(line.strip(b" \t") for line in head.split(b"\r\n")))


class EncodedWordTests(SynchronousTestCase):
    @given(st.text(_ALLOWED | st.sampled_from(" \t"), max_size=600))
    def test_words_decode_to_the_text(self, text: str) -> None:
        """Any text (blanks at the ends and between words included) decodes back exactly,
        by RFC 2047's rule and by the package's unstructured reader; no word is longer
        than RFC 2047's 75 characters."""
        written = names.encoded_words(text)
        self.assertTrue(written.isascii())
        self.assertTrue(all(len(word) <= 75 for word in written.split(" ")))
        self.assertEqual(str(make_header(decode_header(written))) if written else "", text)
        read = email.policy.default.header_factory("X-T", written)
        self.assertEqual(str(read), text)

    def test_needs_words(self) -> None:
        """Non-ASCII text and text holding C{=?} need encoded words; other ASCII does not."""
        for text in ("é", "=?", "a=?b", "\U0001f600"):
            self.assertTrue(names.needs_words(text), text)
        for text in ("", "Smith, John", "a=b?c", "?="):
            self.assertFalse(names.needs_words(text), text)

    def test_linear_time(self) -> None:
        """Encoding grows linearly: 500 names of 256 non-ASCII characters and 50 values
        of 998 (the API's limits) take well under a second together; the header
        registry's folder took some 45 s for the names alone."""
        started = time.perf_counter()
        for _ in range(500):
            names.mailbox("\u00f1" * 256, "r@example.org")
        for _ in range(50):
            names.unstructured("X-Long", "\U0001f600" * 998)
        self.assertLess(time.perf_counter() - started, 1.0)


class FoldTests(SynchronousTestCase):
    @given(
        st.text(_ASCII | st.just("\t"), max_size=998),
        st.sampled_from(["X-A", "Subject", "X-" + "n" * 74]),
    )
    def test_fold_only_at_blanks(self, value: str, name: str) -> None:
        """Folding inserts line ends and nothing else, only in front of a blank; every
        line fits 998 and has something besides blanks; a line over 78 holds one word
        (with the blanks in front of it) or the first; None only when a word cannot fit."""
        folded = names.fold(name, value)
        if folded is None:
            self.assertLessEqual(len(value.split()), 1)
            self.assertGreaterEqual(len(value), names.MAX_LINE)
            return
        self.assertTrue(folded.endswith("\r\n"))
        lines = folded[:-2].split("\r\n")
        self.assertEqual("".join(lines), f"{name}: {value}")
        for line in lines[1:]:
            self.assertIn(line[:1], (" ", "\t"))
        for number, line in enumerate(lines):
            self.assertLessEqual(len(line), names.MAX_LINE)
            self.assertTrue(line.strip(" \t"))
            if len(line) > names.WIDTH and number > 0:
                self.assertEqual(len(line.split()), 1, line)

    def test_long_first_word(self) -> None:
        """A first word that cannot share the first line goes, whole, on the second;
        one too long for any line is refused (None)."""
        folded = names.fold("References", "<" + "a" * 985 + ">")
        self.assertEqual(folded, "References:\r\n <" + "a" * 985 + ">\r\n")
        self.assertIsNone(names.fold("References", "<" + "a" * 996 + ">"))

    def test_short_values_as_set(self) -> None:
        """A value that fits a line is written exactly as the stock policy writes it."""
        self.assertEqual(names.fold("X-A", "a  b "), "X-A: a  b \r\n")
        self.assertEqual(names.fold("Subject", ""), "Subject: \r\n")


class DisplayNameTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_hard_text, min_size=1, max_size=4))
    def test_each_name_is_one_mailbox(self, posted: list[str]) -> None:
        """However long, and whatever specials, quotes, C{=?} or non-ASCII they hold,
        the names posted read back as that many mailboxes with the addresses posted,
        in From, To and Reply-To, by the package and by the relay's parser; a name
        in one encoded word or quoted reads back exactly (the package tidies blanks
        only outside quotes), and every encoded name decodes exactly by RFC 2047."""
        to = [{"address": f"r{i}@example.org", "name": n} for i, n in enumerate(posted)]
        document = message(
            **{"from": {"address": "app@example.com", "name": posted[0]}},
            to=to,
            reply_to={"address": "reply@example.com", "name": posted[-1]},
        )
        request, data = _built(document)
        _assert_lines(self, data)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        relay = parse_message(request.sender.address, request.envelope_recipients, data)
        assert request.reply_to is not None  # the document has one
        expected = {
            "From": (request.sender,),
            "To": request.to,
            "Reply-To": (request.reply_to,),
        }
        for header, mailboxes in expected.items():
            found = parsed[header].addresses
            self.assertEqual([a.addr_spec for a in found], [m.address for m in mailboxes], header)
            for address, mailbox in zip(found, mailboxes, strict=True):
                name = mailbox.name
                if not names.needs_words(name):
                    quoted = names.mailbox(name, mailbox.address).startswith('"')
                    if quoted or name == " ".join(name.split()):
                        self.assertEqual(address.display_name, name)
                elif len(names.encoded_words(name).split(" ")) == 1:
                    # The package reads each blank run in a word as one space.
                    self.assertEqual(address.display_name, _BLANKS.sub(" ", name))
        self.assertEqual([m.address for m in relay.from_], ["app@example.com"])
        self.assertEqual([m.address for m in relay.to], [m.address for m in request.to])
        self.assertEqual([m.address for m in relay.reply_to], ["reply@example.com"])
        # RFC 2047 6.2: the single-recipient From decodes to the posted name exactly,
        # and the relay reads a name cut into several words as it reads the same name
        # in one word (no space between the words).
        if names.needs_words(posted[0]):
            decoded = str(make_header(decode_header(_raw(data, "From"))))
            self.assertEqual(decoded, f"{posted[0]} <app@example.com>")
            whole = base64.b64encode(posted[0].encode("utf-8")).decode("ascii")
            one_word = email.policy.default.header_factory(
                "from", f"=?utf-8?b?{whole}?= <app@example.com>"
            )
            self.assertEqual(relay.from_[0].name, one_word.addresses[0].display_name)

    def test_injection_forms(self) -> None:
        """The names of review 5 (an address and a comma in a long name, C{;}, C{\\\\},
        C{"}, an encoded-word look-alike, a non-ASCII name holding an address) are
        one mailbox each, with the address posted."""
        for name in (
            "Support <evil@attacker.example>, " + "y" * 60,
            "a;" + "x" * 80,
            '%:\\;\\"' + "x" * 80,
            "=?utf-8?q?Boss?= <evil@attacker.example>, " + "y" * 60,
            "Müller <evil@attacker.example>, " + "y" * 60,
        ):
            _, data = _built(message(to=[{"address": "rcpt@example.org", "name": name}]))
            parsed = email.message_from_bytes(data, policy=email.policy.default)
            self.assertEqual(
                [a.addr_spec for a in parsed["To"].addresses], ["rcpt@example.org"], name
            )


class TextValueTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_hard_text, _hard_text)
    def test_subject_and_x_header_read_back(self, subject: str, value: str) -> None:
        """A subject and an C{X-} value read back as posted (the package drops the blanks
        at the start of an unencoded value, as it always has); an ASCII value without
        C{=?} is written unencoded whenever its words fit a line."""
        assume(len(subject) <= compose.MAX_SUBJECT and len(value) <= compose.MAX_HEADER_VALUE)
        _, data = _built(message(subject=subject, headers={"X-Value": value}))
        _assert_lines(self, data)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        for header, posted in (("Subject", subject), ("X-Value", value)):
            encoded = names.needs_words(posted) or not names.fits(header, posted)
            read = str(parsed[header])
            self.assertEqual(read, posted if encoded else posted.lstrip(" \t"), header)
            if not encoded:
                self.assertEqual(_raw(data, header), " " + posted)

    @given(
        st.lists(
            st.one_of(
                st.text(_VISIBLE, min_size=1, max_size=20),
                st.text(_VISIBLE, min_size=70, max_size=400),
            ),
            min_size=1,
            max_size=8,
        ).map(" ".join),
        st.sampled_from(["In-Reply-To", "References", "List-Unsubscribe"]),
    )
    def test_threading_and_list_headers_as_posted(self, value: str, header: str) -> None:
        """Message ids and URLs go out exactly as posted (no encoded words, folded only at
        their blanks), or the request is refused when a word cannot fit any line."""
        assume(len(value) <= compose.MAX_HEADER_VALUE)
        document = message(headers={header: value})
        try:
            compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
        except ApiError:
            self.assertFalse(names.fits(header, value))
            return
        _, data = _built(document)
        _assert_lines(self, data)
        self.assertEqual(_raw(data, header).lstrip(" "), value)

    def test_unfoldable_message_id_refused(self) -> None:
        """A References word longer than any line can carry is refused naming the header
        (written as encoded words it would no longer be a message id)."""
        document = message(headers={"References": "<" + "a" * 996 + ">"})
        with self.assertRaises(ApiError) as caught:
            compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
        self.assertEqual(
            (caught.exception.status, caught.exception.field), (400, "headers.References")
        )

    def test_unfoldable_text_is_encoded(self) -> None:
        """An C{X-} value or subject with a word too long for any line is sent as encoded
        words, which reads back as posted; nothing goes over 998."""
        long_name = "X-" + "n" * 74
        _, data = _built(message(subject="x" * 998, headers={long_name: "y" * 998}))
        _assert_lines(self, data)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(str(parsed["Subject"]), "x" * 998)
        self.assertEqual(str(parsed[long_name]), "y" * 998)

    def test_long_content_id_not_encoded(self) -> None:
        """A 250-character content id is written whole (the registry made encoded words of
        it, which no C{cid:} reference matches)."""
        attachment = {"filename": "a.png", "content": "aGk=", "content_id": "c" * 250}
        _, data = _built(message(html="<img>", attachments=[attachment]))
        self.assertIn(b"Content-ID: <" + b"c" * 250 + b">\r\n", data)

    def test_many_long_non_ascii_values_in_linear_time(self) -> None:
        """50 custom headers and a subject of 998 non-ASCII characters each (the API's
        limits) are built in well under a second (1.3 s through the registry)."""
        headers = {f"X-H{i}": "\u00fc" * 998 for i in range(50)}
        request = compose.read_json_message(
            message(headers=headers, subject="\u00df" * 998), max_recipients=50, max_size=1 << 22
        )
        started = time.perf_counter()
        compose.encode_message(
            compose.build_message(request, message_id="<id@relay.test>", now=NOW), 1 << 22
        )
        self.assertLess(time.perf_counter() - started, 1.0)


class TransferEncodingTests(SynchronousTestCase):
    @given(
        st.lists(
            st.one_of(
                st.integers(0, 700).map(lambda n: ("ab " * 240)[:n]),
                st.sampled_from(["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r\n", "\n", "\r"]),
            ),
            max_size=6,
        ).map("".join)
    )
    def test_7bit_only_when_every_wire_line_fits(self, text: str) -> None:
        """An ASCII body is called 7bit exactly when every line cut at CR and LF (as the
        wire cuts it) fits 998; form feeds and other separators do not cut."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        fits = max(map(len, lines)) <= compose.MAX_LINE
        self.assertEqual(compose.transfer_encoding(text) == "7bit", fits)
