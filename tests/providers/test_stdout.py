"""The stdout provider: one readable block per message, written in one piece."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from typing import IO

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Attachment, Email, Mailbox
from smtpproxy.providers import stdout
from smtpproxy.providers.stdout import (
    MAX_LISTED_ATTACHMENTS,
    MAX_LISTED_WARNINGS,
    StdoutProvider,
    html_to_text,
    human_size,
    render,
    render_json,
)
from tests.support import RecordingStream


def email(**fields: object) -> Email:
    values: dict[str, object] = {
        "envelope_from": "sender@example.com",
        "envelope_to": ("a@example.com", "b@example.com"),
        "raw": b"x" * 2048,
        "from_": (Mailbox("Alice", "alice@example.com"),),
        "to": (Mailbox("", "a@example.com"),),
        "subject": "Hello",
        "message_id": "<id@example.com>",
        "date": "Mon, 3 Mar 2025 10:00:00 +0000",
        "text": "Body text.",
    }
    values.update(fields)
    return Email(**values)  # type: ignore[arg-type]


OPENING = re.compile(r"----- smtpproxy message ([0-9a-f]{16}) -----")


def marker_of(block: str) -> str:
    """The random marker of C{block}, checked to open and close it."""
    lines = block.splitlines()
    match = OPENING.fullmatch(lines[0])
    assert match is not None, lines[0]
    assert lines[-1] == f"----- end {match.group(1)} -----", lines[-1]
    return match.group(1)


class RenderTests(SynchronousTestCase):
    def test_fields_in_order(self) -> None:
        """The block lists the header fields in a fixed order between separator lines."""
        block = render(
            email(cc=(Mailbox("", "c@example.com"),), bcc=(Mailbox("", "d@example.com"),))
        )
        lines = block.splitlines()
        marker_of(block)
        self.assertEqual(
            lines[1:10],
            [
                "From: Alice <alice@example.com>",
                "To: a@example.com",
                "Cc: c@example.com",
                "Bcc: d@example.com",
                "Envelope-From: <sender@example.com>",
                "Envelope-To: <a@example.com>, <b@example.com>",
                "Subject: Hello",
                "Date: Mon, 3 Mar 2025 10:00:00 +0000",
                "Message-ID: <id@example.com>",
            ],
        )
        self.assertEqual(lines[11:13], ["Body:", "| Body text."])

    def test_no_cc_or_bcc_lines_when_empty(self) -> None:
        """Cc and Bcc appear only when the message has them."""
        block = render(email())
        self.assertNotIn("Cc:", block)
        self.assertNotIn("Bcc:", block)

    def test_null_sender(self) -> None:
        """The null reverse-path is shown as <>."""
        self.assertIn("Envelope-From: <>\n", render(email(envelope_from="")))

    def test_truncation(self) -> None:
        """A body past the limit is cut, with a note saying how much was left out."""
        block = render(email(text="a" * 5000), max_body_chars=4000)
        self.assertIn("\n| " + "a" * 4000 + "\n[... 1000 more characters not shown]\n", block)
        self.assertNotIn("a" * 4001, block)

    def test_no_note_at_exact_limit(self) -> None:
        """A body exactly at the limit is shown whole, without a note."""
        self.assertNotIn("not shown", render(email(text="a" * 4000), max_body_chars=4000))

    def test_html_only(self) -> None:
        """Without a text body, the HTML body is shown with its tags stripped."""
        html = (
            "<html><head><style>p {}</style></head><p>Hi &amp; bye</p><script>x()</script></html>"
        )
        block = render(email(text=None, html=html))
        self.assertIn("Hi & bye", block)
        self.assertNotIn("<p>", block)
        self.assertNotIn("x()", block)
        self.assertNotIn("p {}", block)

    def test_no_body(self) -> None:
        """A message without text or HTML says so."""
        self.assertIn("(no text body)", render(email(text=None)))

    def test_attachments(self) -> None:
        """Attachments are listed with name, type, human size, and inline when they are."""
        block = render(
            email(
                attachments=(
                    Attachment("report.pdf", "application/pdf", b"x" * 1_258_291),
                    Attachment(None, "image/png", b"x" * 10, inline=True, content_id="a@b"),
                )
            )
        )
        self.assertIn(
            "Attachments:\n"
            "  report.pdf (application/pdf, 1.2 MiB)\n"
            "  (no name) (image/png, 10 B, inline)\n",
            block,
        )

    def test_warnings(self) -> None:
        """Parser warnings are shown under their own heading."""
        block = render(email(warnings=("part 2: damaged base64 data",)))
        self.assertIn("Warnings:\n  part 2: damaged base64 data\n", block)

    def test_control_characters_neutralised(self) -> None:
        """Terminal escape sequences and line breaks in content cannot forge output."""
        block = render(email(subject="a\x1b[2Jb\nFrom: forged", text="x\x1b]0;title\x07y\r\nz"))
        self.assertNotIn("\x1b", block)
        self.assertNotIn("\x07", block)
        self.assertIn("Subject: a\ufffd[2Jb From: forged\n", block)
        self.assertIn("| x\ufffd]0;title\ufffdy\n| z\n", block)

    def test_unicode_line_breaks_and_bidi_neutralised(self) -> None:
        """Unicode line separators and bidi overrides, which a reader's splitlines() or a
        terminal would act on, are replaced in header values, bodies and file names."""
        tricky = "a\u2028b\u2029c\u202ed\u2066e\x85f"
        block = render(
            email(
                subject=tricky,
                text=tricky,
                attachments=(Attachment(tricky, "text/plain", b""),),
            )
        )
        for character in "\u2028\u2029\u202e\u2066\x85":
            self.assertNotIn(character, block)
        self.assertEqual(block.splitlines(), block.split("\n")[:-1])

    def test_body_lines_are_prefixed(self) -> None:
        """Every body line, blank ones included, starts with the body prefix."""
        block = render(email(text="one\n\n----- end x -----\r\nFrom: x\rlast"))
        self.assertIn("Body:\n| one\n| \n| ----- end x -----\n| From: x\n| last\n", block)

    def test_markers_differ(self) -> None:
        """Each block gets its own marker, so no earlier output reveals the next one."""
        markers = {marker_of(render(email())) for _ in range(20)}
        self.assertEqual(len(markers), 20)

    def test_long_lists_are_bounded(self) -> None:
        """Past the listing limits, attachments and warnings are counted, not listed."""
        block = render(
            email(
                attachments=tuple(
                    Attachment(f"f{i}.txt", "text/plain", b"")
                    for i in range(MAX_LISTED_ATTACHMENTS + 5)
                ),
                warnings=tuple(f"warning {i}" for i in range(MAX_LISTED_WARNINGS + 1)),
            )
        )
        self.assertIn(f"f{MAX_LISTED_ATTACHMENTS - 1}.txt", block)
        self.assertNotIn(f"f{MAX_LISTED_ATTACHMENTS}.txt", block)
        self.assertIn("  ... and 5 more attachments\n", block)
        self.assertNotIn(f"warning {MAX_LISTED_WARNINGS}", block)
        self.assertIn("  ... and 1 more warning\n", block)

    def test_human_size(self) -> None:
        """Sizes use binary multiples with one decimal, labelled as binary units (KiB, not
        KB): 25 MiB, the default size limit, reads as 25.0 MiB, not as a 26.2 MB figure."""
        self.assertEqual(
            [
                human_size(n)
                for n in (0, 1023, 1024, 1536, 1_258_291, 26_214_400, 3 * 1024**3, 5 * 1024**4)
            ],
            ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.2 MiB", "25.0 MiB", "3.0 GiB", "5120.0 GiB"],
        )

    def test_size_line_units(self) -> None:
        """The Size line of a block uses the binary label too."""
        self.assertIn("\nSize: 2.0 KiB\n", render(email()))

    def test_display_names_quoted_when_needed(self) -> None:
        """A display name with a comma or another RFC 5322 special is shown quoted, so
        "Smith, John" reads as one mailbox; quotes and backslashes inside are escaped; plain
        and non-ASCII names stay as they are (not RFC 2047-encoded)."""
        block = render(
            email(
                from_=(Mailbox("Smith, John", "js@example.com"),),
                to=(
                    Mailbox('J. R. "Bob" Dobbs', "bob@example.com"),
                    Mailbox("Jürgen Groß", "jg@example.de"),
                    Mailbox("Plain Name", "p@example.com"),
                    Mailbox("a\\b", "ab@example.com"),
                ),
            )
        )
        self.assertIn('\nFrom: "Smith, John" <js@example.com>\n', block)
        self.assertIn(
            '\nTo: "J. R. \\"Bob\\" Dobbs" <bob@example.com>, Jürgen Groß <jg@example.de>, '
            'Plain Name <p@example.com>, "a\\\\b" <ab@example.com>\n',
            block,
        )

    def test_quoted_name_still_one_neutralised_line(self) -> None:
        """Quoting does not undo the framing rules: a name with a line break and an escape
        sequence is still one line with its controls replaced."""
        block = render(email(from_=(Mailbox("Evil,\r\nFrom: x\x1b[2J", "e@example.com"),)))
        self.assertIn('\nFrom: "Evil,  From: x\ufffd[2J" <e@example.com>\n', block)
        marker_of(block)

    def test_absent_date_and_message_id_left_out(self) -> None:
        """A message without Date or Message-ID gets no empty Date:/Message-ID: line."""
        lines = render(email(date=None, message_id=None)).splitlines()
        self.assertFalse([line for line in lines if line.startswith(("Date:", "Message-ID:"))])
        self.assertEqual(lines[5:7], ["Subject: Hello", "Size: 2.0 KiB"])
        only_date = render(email(message_id=None)).splitlines()
        self.assertEqual(only_date[6:8], ["Date: Mon, 3 Mar 2025 10:00:00 +0000", "Size: 2.0 KiB"])

    def test_html_to_text_blocks(self) -> None:
        """Block elements become line breaks; runs of blanks and blank lines collapse."""
        self.assertEqual(
            html_to_text("<div>one   two</div>\n\n\n<p>three<br>four</p>"),
            "one two\n\nthree\nfour",
        )

    def test_broken_html(self) -> None:
        """Unclosed and malformed markup still yields its text (a cut-off tag is shown as is)."""
        text = html_to_text("<p>fine <b>bold</p></div></span> <i x='")
        self.assertEqual(text, "fine bold\n\n<i x='")


class SendTests(SynchronousTestCase):
    def test_one_write_per_message(self) -> None:
        """Each send is exactly one write of a whole block, then a flush."""
        stream = RecordingStream()
        provider = StdoutProvider(stream)
        self.assertIsNone(self.successResultOf(provider.send(email())))
        self.assertEqual(len(stream.writes), 1)
        self.assertEqual(stream.writes[0], render(email(), marker=marker_of(stream.writes[0])))
        self.assertEqual(stream.flushes, 1)

    def test_many_messages_do_not_interleave(self) -> None:
        """Fifty messages give fifty writes, each a complete block, in order."""
        stream = RecordingStream()
        provider = StdoutProvider(stream)
        results = [provider.send(email(subject=f"message {i}")) for i in range(50)]
        for result in results:
            self.successResultOf(result)
        self.assertEqual(len(stream.writes), 50)
        for i, block in enumerate(stream.writes):
            marker = marker_of(block)
            self.assertEqual(block.count(marker), 2)
            self.assertIn(f"Subject: message {i}\n", block)
        self.assertEqual(stream.getvalue(), "".join(stream.writes))

    def test_max_body_chars(self) -> None:
        """The limit given to the provider is the one applied."""
        stream = io.StringIO()
        StdoutProvider(stream, max_body_chars=10).send(email(text="0123456789abc"))
        self.assertIn("| 0123456789\n[... 3 more characters not shown]", stream.getvalue())

    def test_binary_stream(self) -> None:
        """A binary stream receives the block as UTF-8."""
        stream = io.BytesIO()
        self.successResultOf(StdoutProvider(stream).send(email(subject="Grüße")))
        self.assertIn("Subject: Grüße\n".encode(), stream.getvalue())

    def test_narrow_terminal_encoding(self) -> None:
        """A text stream that only speaks ASCII gets escapes instead of an error."""
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")
        self.successResultOf(StdoutProvider(stream).send(email(subject="Grüße")))
        self.assertIn(b"Subject: Gr\\xfc\\xdfe\n", raw.getvalue())

    def test_closed_stream(self) -> None:
        """A closed stream fails the delivery as transient instead of raising."""
        stream = io.StringIO()
        stream.close()
        failure = self.failureResultOf(StdoutProvider(stream).send(email()), TransientDeliveryError)
        self.assertIn("stdout", failure.value.reason)

    def test_broken_pipe(self) -> None:
        """Writing to a pipe nobody reads any more is a transient failure, not a crash."""
        reader, writer = os.pipe()
        os.close(reader)
        stream = os.fdopen(writer, "w", encoding="utf-8")
        self.addCleanup(_close_quietly, stream)
        failure = self.failureResultOf(StdoutProvider(stream).send(email()), TransientDeliveryError)
        self.assertIn("BrokenPipeError", failure.value.reason)

    def test_close(self) -> None:
        """close() has nothing to wait for."""
        self.assertIsNone(self.successResultOf(StdoutProvider(io.StringIO()).close()))

    def test_name(self) -> None:
        """The provider calls itself stdout in logs."""
        self.assertEqual(StdoutProvider(io.StringIO()).name, "stdout")

    def test_registered(self) -> None:
        """The provider registry builds a StdoutProvider for the name 'stdout'."""
        from smtpproxy import providers

        try:
            provider = providers.create("stdout", Config(), Clock())
        except ImportError as error:  # another built-in provider is not importable yet
            raise SkipTest(f"provider registry cannot load: {error}") from error
        self.assertIsInstance(provider, StdoutProvider)


class JsonTests(SynchronousTestCase):
    """STDOUT_FORMAT=json: one JSON object per line per message."""

    def test_fields(self) -> None:
        """Envelope, parsed headers, excerpts, attachments with SHA-256 and the size."""
        pdf = b"%PDF" * 100
        record = json.loads(
            render_json(
                email(
                    cc=(Mailbox("C", "c@example.com"),),
                    reply_to=(Mailbox("", "r@example.com"),),
                    html="<p>hi</p>",
                    attachments=(Attachment("r.pdf", "application/pdf", pdf),),
                )
            )
        )
        self.assertEqual(
            record["envelope"],
            {"from": "sender@example.com", "to": ["a@example.com", "b@example.com"]},
        )
        self.assertEqual(
            record["headers"],
            {
                "from": [{"name": "Alice", "address": "alice@example.com"}],
                "to": [{"name": "", "address": "a@example.com"}],
                "cc": [{"name": "C", "address": "c@example.com"}],
                "bcc": [],
                "reply_to": [{"name": "", "address": "r@example.com"}],
                "subject": "Hello",
                "date": "Mon, 3 Mar 2025 10:00:00 +0000",
                "message_id": "<id@example.com>",
            },
        )
        self.assertEqual(record["size"], 2048)
        self.assertEqual(
            record["text"], {"excerpt": "Body text.", "length": 10, "truncated": False}
        )
        self.assertEqual(record["html"], {"excerpt": "<p>hi</p>", "length": 9, "truncated": False})
        self.assertEqual(
            record["attachments"],
            [
                {
                    "filename": "r.pdf",
                    "content_type": "application/pdf",
                    "size": 400,
                    "sha256": hashlib.sha256(pdf).hexdigest(),
                    "inline": False,
                }
            ],
        )
        self.assertEqual((record["attachments_not_listed"], record["warnings_not_listed"]), (0, 0))

    def test_one_line_bounded(self) -> None:
        """The record is one line; bodies are cut and long lists counted, not listed."""
        line = render_json(
            email(
                text="line\n" * 2000,
                html=None,
                attachments=tuple(
                    Attachment(None, "text/plain", b"") for _ in range(MAX_LISTED_ATTACHMENTS + 3)
                ),
                warnings=("w",) * (MAX_LISTED_WARNINGS + 2),
            ),
            max_body_chars=100,
        )
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.endswith("\n"))
        record = json.loads(line)
        self.assertEqual(
            record["text"], {"excerpt": "line\n" * 20, "length": 10_000, "truncated": True}
        )
        self.assertIsNone(record["html"])
        self.assertEqual(len(record["attachments"]), MAX_LISTED_ATTACHMENTS)
        self.assertEqual(record["attachments_not_listed"], 3)
        self.assertEqual(len(record["warnings"]), MAX_LISTED_WARNINGS)
        self.assertEqual(record["warnings_not_listed"], 2)

    def test_surrogates_and_controls(self) -> None:
        """Lone surrogates become U+FFFD and the line is ASCII: valid JSON for any reader,
        and no raw control character reaches the terminal."""
        line = render_json(email(subject="bad \udcff byte \x1b[2J", text="caf\xe9\r\n\u2028"))
        self.assertTrue(line.isascii())
        self.assertNotIn("\x1b", line)
        line.encode("utf-8")  # strict: would raise on a surrogate
        record = json.loads(line)
        self.assertEqual(record["headers"]["subject"], "bad \ufffd byte \x1b[2J")
        self.assertEqual(record["text"]["excerpt"], "caf\xe9\r\n\u2028")

    def test_provider_writes_json_lines(self) -> None:
        """A provider built with output_format="json" writes one parseable line per message,
        also to a stream whose encoding is ASCII."""
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")
        provider = StdoutProvider(stream, output_format="json")
        for subject in ("one", "Grüße"):
            self.successResultOf(provider.send(email(subject=subject)))
        lines = raw.getvalue().decode("ascii").splitlines()
        self.assertEqual(
            [json.loads(line)["headers"]["subject"] for line in lines], ["one", "Grüße"]
        )

    def test_unknown_format_refused(self) -> None:
        """A format the provider does not know is a programming error, caught at once."""
        self.assertRaises(ValueError, StdoutProvider, io.StringIO(), output_format="xml")

    def test_setting_chooses_the_format(self) -> None:
        """STDOUT_FORMAT=json in the configuration makes the registered provider print JSON."""
        from smtpproxy.config import load

        config = load({"STDOUT_FORMAT": "JSON"}, fqdn=lambda: "host.example")
        self.assertEqual(config.stdout_format, "json")
        provider = stdout._create(config, Clock())
        self.assertIs(provider._render, render_json)
        self.assertIs(stdout._create(Config(), Clock())._render, render)


def _close_quietly(stream: IO[str]) -> None:
    with contextlib.suppress(OSError):  # the unflushed block still cannot be written
        stream.close()


# Characters either side of every edge of the control set: tab and line feed
# (kept), vertical tab, unit separator, DEL, the C1 range and no-break space.
_EDGES = "\x00\x08\t\n\x0b\x0c\r\x1f \x7e\x7f\x80\x9f\xa0"
_ASCII_TEXT = st.text(st.one_of(st.sampled_from(_EDGES[:10]), st.characters(max_codepoint=0x7F)))
_ANY_TEXT = st.text(
    st.one_of(
        st.sampled_from(_EDGES),
        st.characters(max_codepoint=0xA0),
        st.characters(max_codepoint=0xA0),
        st.characters(),
    )
)


def _reference_excerpt(text: str) -> str:
    """The excerpt rules spelled out: LF line ends, controls replaced, no trailing space."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return stdout._CONTROL.sub("\ufffd", text).rstrip()


class ExcerptTests(SynchronousTestCase):
    """The quick excerpt cleaner gives exactly what the plain rules give."""

    @example("\x7f")
    @example("\t\n")
    @example("a\r\nb\rc\n\r\n")
    @example("text\x1b[31m")
    @example("\x9f")
    @example("caf\xe9 \xa0\r\n")
    @example("\u2028\x0b\x0c\x1c")
    @given(text=st.one_of(_ASCII_TEXT, _ANY_TEXT))
    def test_same_as_the_plain_rules(self, text: str) -> None:
        """For any text, ASCII or not, the excerpt equals the plain replace-and-substitute."""
        self.assertEqual(stdout._excerpt(text), _reference_excerpt(text))

    @example("")
    @example(" \t\r\n")
    @example("a \r\n \r\n")
    @example("a\x0c")
    @example("a\n\n\x1f")
    @example("| a\r\n\r\nb\t")
    @given(text=st.one_of(_ASCII_TEXT, _ANY_TEXT))
    def test_prefixed_same_as_prefixing_after(self, text: str) -> None:
        """The one-join prefixed excerpt equals the excerpt prefixed line by line."""
        expected = stdout.BODY_PREFIX + _reference_excerpt(text).replace(
            "\n", "\n" + stdout.BODY_PREFIX
        )
        self.assertEqual(stdout._prefixed_excerpt(text), expected)
