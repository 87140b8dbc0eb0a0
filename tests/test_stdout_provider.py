"""The stdout provider: one readable block per message, written in one piece."""

from __future__ import annotations

import contextlib
import io
import os
from typing import IO

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.message import Attachment, Email, Mailbox
from smtpproxy.providers import stdout
from smtpproxy.providers.stdout import (
    SEPARATOR,
    StdoutProvider,
    html_to_text,
    human_size,
    render,
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


class RenderTests(SynchronousTestCase):
    def test_fields_in_order(self) -> None:
        """The block lists the header fields in a fixed order between separator lines."""
        block = render(
            email(cc=(Mailbox("", "c@example.com"),), bcc=(Mailbox("", "d@example.com"),))
        )
        lines = block.splitlines()
        self.assertEqual(lines[0], SEPARATOR)
        self.assertEqual(lines[-1], SEPARATOR)
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
        self.assertIn("Body text.", lines)

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
        self.assertIn("a" * 4000 + "\n[... 1000 more characters not shown]", block)
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
            "  report.pdf (application/pdf, 1.2 MB)\n"
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
        self.assertIn("x\ufffd]0;title\ufffdy\nz", block)

    def test_human_size(self) -> None:
        """Sizes use binary multiples with one decimal."""
        self.assertEqual(
            [human_size(n) for n in (0, 1023, 1024, 1536, 1_258_291, 3 * 1024**3, 5 * 1024**4)],
            ["0 B", "1023 B", "1.0 KB", "1.5 KB", "1.2 MB", "3.0 GB", "5120.0 GB"],
        )

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
        self.assertEqual(stream.writes[0], render(email()))
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
            self.assertTrue(block.startswith(SEPARATOR + "\n"))
            self.assertTrue(block.endswith(SEPARATOR + "\n"))
            self.assertEqual(block.count(SEPARATOR), 2)
            self.assertIn(f"Subject: message {i}\n", block)
        self.assertEqual(stream.getvalue(), "".join(stream.writes))

    def test_max_body_chars(self) -> None:
        """The limit given to the provider is the one applied."""
        stream = io.StringIO()
        StdoutProvider(stream, max_body_chars=10).send(email(text="0123456789abc"))
        self.assertIn("0123456789\n[... 3 more characters not shown]", stream.getvalue())

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
