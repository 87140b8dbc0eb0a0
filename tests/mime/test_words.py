"""RFC 2047 6.2 in the relay's parsed view: blanks between adjacent encoded words are not text.

The cases are read through L{parse_message} (Subject, display names in
From, To, Cc and Reply-To) and through Graph's JSON message built from
it, and L{join_adjacent_words} is checked on its own for what it must
keep exactly (text that only looks like an encoded word, words separated
by other text, runs that do not decode) and for linear time.
"""

from __future__ import annotations

import json
import time
from email.header import decode_header, make_header

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.mime.message import Email, parse_message
from smtpproxy.mime.words import join_adjacent_words
from smtpproxy.providers.graph.payload import JsonSend, plan_delivery
from tests.mime.test_corpus import CORPUS

MAILBOX = "relay@contoso.example"


def _parsed(headers: str) -> Email:
    """The relay's reading of a message with these header lines (CRLF folded as written)."""
    raw = (headers + "\r\n\r\nbody\r\n").encode("utf-8")
    return parse_message("app@example.org", ["a@x.example"], raw)


def _stdlib(value: str) -> str:
    """The standard library's RFC 2047 reading of an unstructured value (the reference)."""
    return str(make_header(decode_header(value)))


class ParsedViewTests(SynchronousTestCase):
    def test_split_character_in_subject_and_display_name(self) -> None:
        """A character cut across two words reads once, without the blank between
        them, in the Subject and in a display name (not as two lone surrogates
        with a space, which is how CPython's address parser reads it)."""
        parsed = _parsed(
            "From: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?= <a@example.org>\r\n"
            "To: a@x.example\r\n"
            "Subject: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?="
        )
        self.assertEqual(parsed.subject, "café")
        self.assertEqual([(m.name, m.address) for m in parsed.from_], [("café", "a@example.org")])
        self.assertEqual(parsed.warnings, ())

    def test_folded_words_in_every_address_field(self) -> None:
        """Words folded over lines (CRLF and a blank, or a tab) join in From, To, Cc,
        Reply-To and the Subject: the folding is not text."""
        name = "=?UTF-8?B?TXlTdXJ2ZXk=?=\r\n =?UTF-8?B?LmNvbSAmIEM=?=\r\n\t=?UTF-8?Q?arol?="
        parsed = _parsed(
            f"From: {name} <carol@example.org>\r\n"
            f"To: {name} <a@x.example>, Bob <b@x.example>\r\n"
            f"Cc: {name} <c@x.example>\r\n"
            f"Reply-To: {name} <r@x.example>\r\n"
            f"Subject: {name}"
        )
        self.assertEqual(parsed.subject, "MySurvey.com & Carol")
        for mailboxes in (parsed.from_, parsed.to[:1], parsed.cc, parsed.reply_to):
            self.assertEqual(mailboxes[0].name, "MySurvey.com & Carol")
        self.assertEqual(parsed.to[1].name, "Bob")

    def test_last_word_glued_to_the_address(self) -> None:
        """Many mailers write no blank between a name and its C{<address>}: the words
        before it join all the same, and the address is read as before."""
        parsed = _parsed(
            "From: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?=<a@example.org>\r\nTo: a@x.example"
        )
        self.assertEqual([(m.name, m.address) for m in parsed.from_], [("café", "a@example.org")])

    def test_different_charsets_join(self) -> None:
        """Adjacent words in different charsets each decode in their own and join."""
        parsed = _parsed(
            "From: =?ISO-8859-1?Q?Fran=E7ois?= =?UTF-8?B?IETDqWrDoA==?= <f@example.org>\r\n"
            "To: a@x.example"
        )
        self.assertEqual(parsed.from_[0].name, "François Déjà")

    def test_spacing_kept_where_rfc_2047_keeps_it(self) -> None:
        """Words separated by ordinary text keep the blanks around it, a quoted
        word stays as it was read before, and a word inside a comment does
        not reach the name."""
        parsed = _parsed(
            "From: =?UTF-8?Q?Anne?= and =?UTF-8?Q?Bob?= <ab@example.org>, "
            "x=?UTF-8?Q?a?= =?UTF-8?Q?b?= <x@example.org>, "
            "=?UTF-8?Q?C?= (=?UTF-8?Q?note?=) <c@example.org>\r\n"
            "To: a@x.example"
        )
        self.assertEqual([m.name for m in parsed.from_], ["Anne and Bob", "x=?UTF-8?Q?a?= b", "C"])

    def test_graph_json_message(self) -> None:
        """Graph's JSON message carries the joined Subject and display names."""
        parsed = _parsed(
            "From: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?= <a@example.org>\r\n"
            "To: =?UTF-8?Q?Ren?=\r\n =?UTF-8?Q?=C3=A9e?= <a@x.example>\r\n"
            "Subject: =?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?="
        )
        plan = plan_delivery(parsed, (MAILBOX,), "json")
        assert isinstance(plan, JsonSend)
        message = json.loads(plan.body)["message"]
        self.assertEqual(message["subject"], "café")
        self.assertEqual(
            message["toRecipients"], [{"emailAddress": {"address": "a@x.example", "name": "Renée"}}]
        )
        self.assertEqual(
            message["replyTo"], [{"emailAddress": {"address": "a@example.org", "name": "café"}}]
        )

    def test_corpus_message_with_a_name_cut_into_words(self) -> None:
        """The shared corpus's message whose From name is cut into four base64 words
        (one of them in mid-word) reads as the sender wrote it; the rest of the corpus
        agrees with the standard library except for such blanks (tests.mime.test_corpus)."""
        path = CORPUS / "mail" / "bad_subject.eml"
        if not path.is_file():
            raise SkipTest(f"the shared corpus is not at {CORPUS}")
        parsed = parse_message("app@example.org", ["a@x.example"], path.read_bytes())
        self.assertEqual(
            [(m.name, m.address) for m in parsed.from_],
            [("MySurvey.com & Carol Adams", "carol@mysurvey.com")],
        )
        self.assertTrue(parsed.subject.startswith("MySurvey.com:  You have a survey waiting"))


class JoinTests(SynchronousTestCase):
    def test_reads_as_the_standard_library_reads_text(self) -> None:
        """A run rewritten as one word decodes to what RFC 2047 (and the standard
        library's unstructured reader) says the run means."""
        for value in (
            "=?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?=",
            "=?UTF-8?Q?a_?=\t =?UTF-8?B?Yg?= =?utf-8?q?c?=",
            "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?= =?ISO-2022-JP?B?GyRCJWEhPCVrGyhC?=",
        ):
            joined = join_adjacent_words(value)
            self.assertEqual(len(joined.split()), 1, value)
            self.assertEqual(_stdlib(joined), _stdlib(value), value)
        # RFC 2231's language tag names no charset of its own.
        self.assertEqual(_stdlib(join_adjacent_words("=?utf-8*en?q?a?= =?utf-8?q?b?=")), "ab")

    def test_kept_exactly(self) -> None:
        """Values without a run of two adjacent words that decode come back unchanged,
        blanks included: one word, look-alikes inside words, words with text or
        a comment or an address between them, damaged or unknown runs, a bad encoding
        letter."""
        for value in (
            "plain  text\t here",
            "=?UTF-8?Q?one?=   word",
            "x=?UTF-8?Q?a?= =?UTF-8?Q?b?=y",
            "=?UTF-8?Q?a?= and =?UTF-8?Q?b?=",
            "=?UTF-8?Q?a?= (=?UTF-8?Q?b?=)",
            "=?UTF-8?Q?caf=C3?= =?UTF-8?Q?x?=",
            "=?bogus?Q?a?= =?bogus?Q?b?=",
            "=?UTF-8?X?a?= =?UTF-8?X?b?=",
            "=?UTF-8?B?w6k?= =?UTF-8?B?A?=",
            "=?unicode_escape?Q?=5Cud800?= =?unicode_escape?Q?a?=",
            "=?zlib?Q?a?= =?zlib?Q?b?=",
            "=?UTF-8?Q?a?==?UTF-8?Q?b?=",
            "=?UTF-8?Q?a?=<x@example.org> =?UTF-8?Q?b?=",
        ):
            self.assertEqual(join_adjacent_words(value), value)

    def test_only_the_run_changes(self) -> None:
        """Text and blanks around a run, and between two runs, stay as written."""
        joined = join_adjacent_words(
            "  Re:  =?UTF-8?Q?a?= =?UTF-8?Q?b?=  -  =?UTF-8?Q?c?=\r\n =?UTF-8?Q?d?= end "
        )
        self.assertEqual(joined, "  Re:  =?utf-8?b?YWI=?=  -  =?utf-8?b?Y2Q=?= end ")

    def test_linear_time(self) -> None:
        """Twenty thousand adjacent words (and as many look-alikes glued to text) are
        read in well under a few seconds: the work grows with the value, not its square."""
        words = " ".join(["=?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?="] * 10_000)
        glued = " ".join(["x=?UTF-8?Q?a?="] * 20_000)
        started = time.perf_counter()
        joined = join_adjacent_words(words)
        kept = join_adjacent_words(glued)
        elapsed = time.perf_counter() - started
        self.assertEqual(_stdlib(joined), "café" * 10_000)
        self.assertEqual(kept, glued)
        self.assertLess(elapsed, 3.0)
