"""parse_message over a corpus of real and deliberately broken messages.

The corpus (MimeKit's, CPython's and the Ruby mail gem's test messages, see
its SOURCES.md) lives outside the repository, next to it in
C{shared/corpus/mime}; without it these tests are skipped.  The standard
library's own parser is the reference: wherever it can read a message, we
must agree with it on subject, sender and the number of leaf parts, so no
part is ever silently dropped.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.mime.message import Email, parse_message
from smtpproxy.providers.stdout import StdoutProvider

CORPUS = Path(__file__).parents[3] / "shared" / "corpus" / "mime"
_SURROGATE_OR_REPLACEMENT = re.compile("[\udc80-\udcff\ufffd]")


def corpus_files() -> list[Path]:
    """Every message file in the corpus (its documentation left out), sorted."""
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in (".eml", ".txt"))


def leaf_parts(part: Message) -> list[Message]:
    """The standard library's leaves, an embedded message counting as one leaf."""
    if part.get_content_maintype() == "message" or not part.is_multipart():
        return [part]
    leaves: list[Message] = []
    for child in part.get_payload():
        assert isinstance(child, Message)
        leaves += leaf_parts(child)
    return leaves


def accounted_parts(parsed: Email) -> int:
    return (parsed.text is not None) + (parsed.html is not None) + len(parsed.attachments)


def text_fields(parsed: Email) -> list[str]:
    """Every str an Email holds, for checks that they are all valid Unicode."""
    texts = [parsed.subject, parsed.message_id or "", parsed.date or "", *parsed.warnings]
    texts += [parsed.text or "", parsed.html or ""]
    for mailbox in (*parsed.from_, *parsed.to, *parsed.cc, *parsed.bcc, *parsed.reply_to):
        texts += [mailbox.name, mailbox.address]
    for name, value in parsed.headers:
        texts += [name, value]
    for attachment in parsed.attachments:
        texts += [attachment.filename or "", attachment.content_type, attachment.content_id or ""]
    return texts


def assert_encodable(test: SynchronousTestCase, parsed: Email) -> None:
    """Every str in C{parsed} encodes to UTF-8 (no lone surrogates leak out)."""
    for text in text_fields(parsed):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            test.fail(f"not valid Unicode: {text[:80]!r}")


def _readable(value: str) -> bool:
    return not _SURROGATE_OR_REPLACEMENT.search(value)


class CorpusTests(SynchronousTestCase):
    """One test per corpus file, added below."""

    def check(self, path: Path) -> None:
        raw = path.read_bytes()
        parsed = parse_message("sender@example.com", ["rcpt@example.com"], raw)
        self.assertIs(parsed.raw, raw)
        self.assertEqual(parsed.raw, path.read_bytes())
        self.assertFalse([w for w in parsed.warnings if "could not be parsed" in w])
        assert_encodable(self, parsed)
        self.check_rendering(parsed)
        try:
            reference = email.message_from_bytes(raw, policy=email.policy.default)
            leaves = leaf_parts(reference)
        except Exception:  # the reference cannot read it: surviving is all we ask
            return
        self.assertEqual(accounted_parts(parsed), len(leaves), "leaf parts")
        if any(_has_content(leaf) for leaf in leaves):
            self.assertTrue(parsed.text or parsed.html or parsed.attachments, "no content")
        self.check_subject(parsed, reference)
        self.check_from(parsed, reference)

    def check_subject(self, parsed: Email, reference: Message) -> None:
        try:
            expected = str(reference.get("subject", ""))
        except Exception:
            return
        if _readable(expected):
            self.assertEqual(parsed.subject, expected, "subject")

    def check_from(self, parsed: Email, reference: Message) -> None:
        try:
            headers: list[Any] = reference.get_all("from") or []
            if any(h.defects for h in headers):
                return
            expected = [(a.display_name, a.addr_spec) for h in headers for a in h.addresses]
        except Exception:
            return
        if all(_readable(name + address) for name, address in expected):
            self.assertEqual([(m.name, m.address) for m in parsed.from_], expected, "from")

    def check_rendering(self, parsed: Email) -> None:
        stream = io.StringIO()
        self.assertIsNone(self.successResultOf(StdoutProvider(stream).send(parsed)))
        self.assertIn("Envelope-From: <sender@example.com>", stream.getvalue())

    def test_corpus_present(self) -> None:
        """The corpus folder exists (otherwise every corpus test is skipped)."""
        if not corpus_files():
            raise SkipTest(f"no MIME corpus at {CORPUS}")


def _has_content(part: Message) -> bool:
    payload = part.get_payload()
    if isinstance(payload, list):
        return bool(payload)
    return bool(str(payload).strip())


def _corpus_test(path: Path) -> Callable[[CorpusTests], None]:
    def test(self: CorpusTests) -> None:
        self.check(path)

    relative = path.relative_to(CORPUS)
    test.__name__ = "test_" + re.sub(r"\W", "_", str(relative))
    test.__doc__ = f"{relative}: parsed without error, raw kept, every part accounted for."
    return test


for _path in corpus_files():
    _test = _corpus_test(_path)
    setattr(CorpusTests, _test.__name__, _test)
