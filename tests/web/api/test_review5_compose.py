"""Review 5: messages the API builds that break the line limit or read back other than posted.

Each test builds a message from a valid request with L{compose.build_message}
and reads the bytes back, with the C{email} package (policy C{default}) or
the relay's own parser, as a recipient or a provider would.
"""

from __future__ import annotations

import email
import email.policy
import time
from datetime import UTC, datetime
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.web.api import compose
from smtpproxy.web.api.direct import direct_email
from tests.web.api.harness import message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _built(document: dict[str, Any]) -> tuple[compose.JsonMessage, bytes]:
    request = compose.read_json_message(document, max_recipients=50, max_size=1 << 20)
    built = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
    return request, compose.encode_message(built, 1 << 20)


class LineLimitTests(SynchronousTestCase):
    def test_form_feed_does_not_hide_a_long_line_from_the_7bit_rule(self) -> None:
        """An ASCII text body whose one wire line is longer than 998 octets is not sent 7bit.

        L{compose.transfer_encoding} measures lines with C{str.splitlines},
        which also splits at form feed, vertical tab and U+001C..U+001E; the
        generator (and every MTA) splits only at CR and LF.  A body of two
        600-character runs joined by a form feed is thus called C{7bit} and
        written as one 1201-octet line, which RFC 5322 2.1.1 forbids and
        strict MTAs refuse.  Right: every line of the message fits 998
        octets (the body quoted-printable or base64 when it must).
        """
        for separator in ("\x0c", "\x0b", "\x1c", "\x1d", "\x1e"):
            _, data = _built(message(text="a" * 600 + separator + "a" * 600))
            longest = max(len(line) for line in data.split(b"\r\n"))
            self.assertLessEqual(longest, compose.MAX_LINE, repr(separator))


class ReadBackTests(SynchronousTestCase):
    def test_display_name_that_looks_like_an_encoded_word_reads_back_as_posted(self) -> None:
        """A display name posted as C{=?utf-8?q?Boss?=} reads back as those characters.

        The ASCII path writes it with C{formataddr}, which does not quote it
        ('=' and '?' are not specials), so every reader decodes it as an
        RFC 2047 word and shows "Boss": the recipient sees a name the client
        never sent, and L{direct_email} (which copies the request's name)
        disagrees with L{parse_message} of the very same bytes.  Right: the
        name is written so that it reads back unchanged (for instance as
        encoded words of its own text), and both views agree.
        """
        posted = "=?utf-8?q?Boss?="
        document = message(to=[{"address": "rcpt@example.org", "name": posted}])
        _, data = _built(document)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(parsed["To"].addresses[0].display_name, posted)

    def test_direct_view_agrees_with_the_parsed_bytes_on_an_encoded_word_name(self) -> None:
        """L{direct_email} gives the names L{parse_message} reads from the same bytes.

        L{direct._plain_name} trusts any ASCII name without odd blanks, but
        a name holding C{=?...?=} is decoded by the parser: the view says
        C{=?utf-8?q?Boss?=} while the bytes say "Boss", so a provider
        that reads the view (the Graph JSON payload's recipient names)
        sends a name the message itself does not carry.  Right: the view
        equals the parse (None, leaving it to the parser, is right too).
        """
        document = message(
            **{"from": {"address": "app@example.com", "name": "=?utf-8?q?Boss?="}},
            to=[{"address": "rcpt@example.org", "name": "=?utf-8?q?Boss?="}],
        )
        request, data = _built(document)
        direct = direct_email(request, request.envelope_recipients, data)
        relay = parse_message(request.sender.address, request.envelope_recipients, data)
        if direct is not None:
            self.assertEqual((direct.from_, direct.to), (relay.from_, relay.to))

    def test_custom_header_that_looks_like_an_encoded_word_reads_back_as_posted(self) -> None:
        """An X- header's ASCII value C{=?utf-8?b?SGk=?=} reads back as those characters.

        The policy keeps a short ASCII value as set and writes it unchanged,
        so the literal text becomes an encoded word on the wire and reads
        back as "Hi".  Right: the value a client posted is the value a
        recipient reads.
        """
        posted = "=?utf-8?b?SGk=?="
        _, data = _built(message(headers={"X-Ticket": posted}))
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(str(parsed["X-Ticket"]), posted)

    def test_direct_view_agrees_with_the_parsed_bytes_on_odd_file_names(self) -> None:
        """Attachments named C{<report>} or C{=?utf-8?q?x?=.pdf} have the same file name in
        L{direct_email} as in L{parse_message} of the same bytes.

        The package's parameter reader unquotes a value by also dropping
        angle brackets at its ends, and decodes an encoded word inside a
        quoted parameter, so the parse says C{report} and C{x.pdf}; the
        direct view, which only leaves names with blanks at their ends to
        the parser, keeps the request's names.  A provider reading the view
        names the file otherwise than the message does.  Right: both agree
        (None from the view, leaving it to the parser, is right too).
        """
        for filename in ("<report>", "=?utf-8?q?x?=.pdf"):
            attachment = {"filename": filename, "content": "aGk="}
            request, data = _built(message(attachments=[attachment]))
            direct = direct_email(request, request.envelope_recipients, data)
            relay = parse_message(request.sender.address, request.envelope_recipients, data)
            if direct is not None:
                self.assertEqual(direct.attachments, relay.attachments, filename)


def _raw_header(data: bytes, name: str) -> str:
    """The value of header C{name} as written, unfolded (CRLF removed, blanks kept)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    value: list[str] = []
    for line in head.split("\r\n"):
        if value and line[:1] in (" ", "\t"):
            value.append(line)
        elif value:
            break
        elif line.lower().startswith(name.lower() + ":"):
            value.append(line[len(name) + 1 :])
    return "".join(value)


class LongAsciiValueTests(SynchronousTestCase):
    def test_long_list_unsubscribe_keeps_its_urls(self) -> None:
        """A List-Unsubscribe of two angle-bracketed URIs, the first 200 characters long
        (an unsubscribe link with its token), goes out with those URIs as written,
        folded only at the blank between them.

        The policy hands an ASCII value longer than a line to the header
        registry, which treats List-Unsubscribe as unstructured text and,
        finding the URL longer than a line, rewrites it as RFC 2047 encoded
        words (C{=?utf-8?q?=3Chttps=3A//...?=}).  RFC 2369 fields hold
        angle-bracketed URIs, where encoded words mean nothing: mail clients
        and one-click unsubscribe (RFC 8058) then find no usable link.
        Right: an ASCII value is folded at its blanks only (a run longer
        than a line stays whole, up to RFC 5322's 998), never encoded.
        """
        link = "<https://news.example.com/unsubscribe?list=weekly&token=" + "Ab9" * 50 + ">"
        posted = link + ", <mailto:unsub@news.example.com?subject=unsubscribe>"
        _, data = _built(message(headers={"List-Unsubscribe": posted}))
        written = _raw_header(data, "List-Unsubscribe")
        self.assertNotIn("=?", written)
        self.assertEqual(" ".join(written.split()), posted)

    def test_threading_headers_keep_an_exchange_length_message_id(self) -> None:
        """In-Reply-To and References naming one 88-character message id (the length
        Exchange Online's ids have) go out with that id as written.

        "In-Reply-To: " and the id make 101 columns, so the policy has the
        header registry fold the value, which encodes the id as RFC 2047
        words (C{=?utf-8?q?=3CAM0PR01...?=}); msg-id fields are never
        decoded, so the reply no longer threads with the message it answers
        in any mail client.  Right: a msg-id is written whole on its own
        line when it does not fit the first (RFC 5322 allows 998).
        """
        message_id = (
            "<AM0PR01MB1234567890ABCDEF1234567890ABCDEF@AM0PR01MB1234.eurprd01.prod."
            "exchangelabs.com>"
        )
        headers = {"In-Reply-To": message_id, "References": message_id}
        _, data = _built(message(headers=headers))
        for name in headers:
            self.assertEqual(_raw_header(data, name).strip(), message_id, name)


class AddressInjectionTests(SynchronousTestCase):
    def test_long_display_name_with_specials_stays_one_quoted_name(self) -> None:
        """A display name holding RFC 5322 specials (a comma, angle brackets, an
        address) reads back as that one name of that one mailbox, however long.

        L{compose._addresses} quotes it with C{formataddr}, but a header
        longer than 78 columns is re-parsed and folded by the header
        registry when written (C{refold_source="long"}), and that folder
        drops the quotes of a quoted string it splits.  The name
        C{"Support <evil@attacker.example>, yyy..."} then goes out as the
        mailbox list C{Support <evil@attacker.example>, yyy... <app@...>}:
        a client chooses a From (and To, Cc, Reply-To) address that the key's
        sender checks never saw, and every reader, the relay's own parser
        included, sees two mailboxes.  Right: the name is written so that
        folding cannot break it (encoded words, or quoting kept on each
        line), and reads back as posted with the one address posted.
        """
        name = "Support <evil@attacker.example>, " + "y" * 60
        document = message(
            **{"from": {"address": "app@example.com", "name": name}},
            to=[{"address": "rcpt@example.org", "name": name}],
        )
        request, data = _built(document)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        for header, address in (("From", "app@example.com"), ("To", "rcpt@example.org")):
            found = [(a.display_name, a.addr_spec) for a in parsed[header].addresses]
            self.assertEqual(found, [(name, address)], header)
        relay = parse_message(request.sender.address, request.envelope_recipients, data)
        self.assertEqual([m.address for m in relay.from_], ["app@example.com"])
        self.assertEqual([m.address for m in relay.to], ["rcpt@example.org"])

    def test_long_display_name_with_a_semicolon_or_backslash_reads_back(self) -> None:
        """Names with C{;}, C{:}, C{\\} or C{"} longer than a line read back unchanged
        (the same folding loses their quotes: C{a;xxx...} becomes the bare address
        C{a} followed by a malformed list)."""
        for name in ("a;" + "x" * 80, "%:\\;\\" + "x" * 80, 'a"b ' + "x" * 80):
            _, data = _built(message(to=[{"address": "rcpt@example.org", "name": name}]))
            parsed = email.message_from_bytes(data, policy=email.policy.default)
            found = [(a.display_name, a.addr_spec) for a in parsed["To"].addresses]
            self.assertEqual(found, [(name, "rcpt@example.org")], repr(name))


class CostTests(SynchronousTestCase):
    def test_many_non_ascii_display_names_build_in_linear_time(self) -> None:
        """A request with 100 recipients, each with a 256-character non-ASCII name (both
        within the API's limits: SMTP_MAX_RECIPIENTS defaults to 500, MAX_NAME is 256),
        is built in well under a second.

        The names are handed to the header registry, whose folder
        (C{_fold_as_ew}) re-encodes a shrinking word once per character to
        find what fits a line: quadratic in each name's length, about 4 s
        of CPU here for 27 kB of names (and some 45 s at 500 recipients),
        all of it in the reactor thread, so one authenticated request
        stalls every SMTP session and HTTP client meanwhile (the previous
        builder had the same cost; the new one kept it).  Right: the
        names are encoded in linear time (for instance RFC 2047 words of
        a fixed size cut by the builder in one pass), so this takes
        milliseconds; the 1 s bound leaves a hundredfold margin for a
        loaded machine.
        """
        names = [{"address": f"r{i}@example.org", "name": "\u00f1" * 256} for i in range(100)]
        request = compose.read_json_message(message(to=names), max_recipients=500, max_size=1 << 20)
        started = time.perf_counter()
        built = compose.build_message(request, message_id="<id@relay.test>", now=NOW)
        compose.encode_message(built, 1 << 20)
        self.assertLess(time.perf_counter() - started, 1.0)
