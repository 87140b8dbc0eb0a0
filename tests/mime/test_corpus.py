"""parse_message over two sets of real and deliberately broken messages.

The standard library's own parser is the reference: wherever it can read a
message, we must agree with it on the number of leaf parts (so no part is
ever silently dropped), on which leaves are the text and HTML bodies and
what they say, on every attachment's name and decoded bytes, and on subject,
From, To and Cc.

Two sources run the same checks:

  - the project's own set in C{tests/data/mime} (see its README.md), about
    thirty small messages written for this project that cover the kinds of
    message the shared corpus holds; it is in every clone, so these tests
    never skip;
  - the shared corpus (MimeKit's, CPython's and the Ruby mail gem's test
    messages, see its SOURCES.md), outside the repository, next to it in
    C{shared/corpus/mime}; without it those tests are skipped.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.mime.message import Email, Mailbox, parse_message
from smtpproxy.providers.stdout import StdoutProvider

CORPUS = Path(__file__).parents[3] / "shared" / "corpus" / "mime"
OWN_SET = Path(__file__).parents[1] / "data" / "mime"
_SURROGATE_OR_REPLACEMENT = re.compile("[\udc80-\udcff\ufffd]")
#: Two encoded words with only blanks (a folding line break included) between them.
_ADJACENT_WORDS = re.compile(r"\?=[ \t\r\n]+=\?")


def message_files(folder: Path) -> list[Path]:
    """Every message file under C{folder} (its documentation left out), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".eml", ".txt"))


def corpus_files() -> list[Path]:
    """Every message file in the shared corpus; none when it is absent."""
    return message_files(CORPUS)


def own_files() -> list[Path]:
    """Every message file of the project's own set."""
    return message_files(OWN_SET)


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


def reference_bodies(
    leaves: list[Message],
) -> tuple[Message | None, Message | None, list[Message]]:
    """The standard library's leaves sorted the way an Email sorts them.

    The first text/plain and the first text/html leaf that are neither
    attachments nor named are the text and HTML bodies; every other leaf,
    embedded messages included, is an attachment, in order.  Stated here
    over the reference's tree so that a walk that reaches different leaves,
    or picks another one as the body, shows up as a difference.
    """
    text: Message | None = None
    html: Message | None = None
    rest: list[Message] = []
    for leaf in leaves:
        body = (
            leaf.get_content_maintype() != "message"
            and leaf.get_content_disposition() != "attachment"
            and leaf.get_filename() is None
        )
        if body and text is None and leaf.get_content_type() == "text/plain":
            text = leaf
        elif body and html is None and leaf.get_content_type() == "text/html":
            html = leaf
        else:
            rest.append(leaf)
    return text, html, rest


class _Comparison(SynchronousTestCase):
    """The comparison with the standard library, shared by both sources below."""

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
        self.check_mailboxes(parsed.from_, reference, "from")
        self.check_mailboxes(parsed.to, reference, "to")
        self.check_mailboxes(parsed.cc, reference, "cc")
        try:
            text, html, rest = reference_bodies(leaves)
        except Exception:  # a parameter the reference cannot read: the count must do
            return
        self.check_body(parsed.text, text, "text")
        self.check_body(parsed.html, html, "html")
        self.check_attachments(parsed, rest)

    def check_body(self, body: str | None, leaf: Message | None, what: str) -> None:
        """The same leaf is the body, and it says the same where the reference can read it."""
        self.assertEqual(body is None, leaf is None, f"{what} body present")
        if body is None or leaf is None:
            return
        assert isinstance(leaf, EmailMessage)  # what policy.default builds
        try:
            expected = leaf.get_content()
        except Exception:
            return
        if _readable(expected):
            self.assertEqual(body, expected, f"{what} body")

    def check_attachments(self, parsed: Email, leaves: list[Message]) -> None:
        """Each attachment has the name and the decoded bytes of its reference leaf.

        Content-IDs are compared too.  Two kinds of leaf have no decoded
        bytes to compare: an embedded message (the parser keeps its bytes
        whole, and names an rfc822 or global one without a name of its own
        C{<subject>.eml}), and a multipart the reference could not split
        either (the parser keeps its body as raw bytes, without the part's
        Content-ID).
        """
        self.assertEqual(len(parsed.attachments), len(leaves), "attachments")
        for number, (attachment, leaf) in enumerate(zip(parsed.attachments, leaves, strict=True)):
            where = f"attachment {number + 1}"
            name = leaf.get_filename()
            if name is None and leaf.get_content_type() in ("message/rfc822", "message/global"):
                self.assertTrue((attachment.filename or "").endswith(".eml"), where)
                continue
            if name is None or _readable(name):
                self.assertEqual(attachment.filename, name, where)
            if leaf.get_content_maintype() == "multipart":
                continue
            self.assertEqual(attachment.content_id, _content_id(leaf), where)
            if leaf.get_content_maintype() != "message":
                self.assertEqual(attachment.data, leaf.get_payload(decode=True), where)

    def check_subject(self, parsed: Email, reference: Message) -> None:
        try:
            expected = str(reference.get("subject", ""))
        except Exception:
            return
        if _readable(expected):
            self.assertEqual(parsed.subject, expected, "subject")

    def check_mailboxes(
        self, mailboxes: tuple[Mailbox, ...], reference: Message, field: str
    ) -> None:
        """The same names and addresses in C{field}, where the reference reads it cleanly.

        The reference keeps a space between adjacent encoded words in a
        display name, where RFC 2047 6.2 says there is none: in a field that
        has such words, a name may differ from the reference's only by
        spaces the reference has and we do not.
        """
        try:
            headers: list[Any] = reference.get_all(field) or []
            if any(h.defects for h in headers):
                return
            expected = [(a.display_name, a.addr_spec) for h in headers for a in h.addresses]
        except Exception:
            return
        if not all(_readable(name + address) for name, address in expected):
            return
        found = [(m.name, m.address) for m in mailboxes]
        adjacent = any(
            _ADJACENT_WORDS.search(value)
            for name, value in reference.raw_items()
            if name.lower() == field
        )
        if not adjacent:
            self.assertEqual(found, expected, field)
            return
        self.assertEqual([a for _, a in found], [a for _, a in expected], field)
        for (name, _), (wanted, _) in zip(found, expected, strict=True):
            self.assertEqual("".join(name.split()), "".join(wanted.split()), field)
            self.assertLessEqual(len(name), len(wanted), field)

    def check_rendering(self, parsed: Email) -> None:
        stream = io.StringIO()
        self.assertIsNone(self.successResultOf(StdoutProvider(stream).send(parsed)))
        self.assertIn("Envelope-From: <sender@example.com>", stream.getvalue())


class OwnSetTests(_Comparison):
    """One test per message of the project's own set, added below; none ever skips."""

    def test_own_set_present(self) -> None:
        """The own set is in the checkout: a clone without it fails instead of
        silently comparing nothing."""
        self.assertGreaterEqual(len(own_files()), 30)

    def test_own_set_listed(self) -> None:
        """The set's README.md describes exactly the messages that are there."""
        readme = (OWN_SET / "README.md").read_text(encoding="utf-8")
        listed = sorted(re.findall(r"^\| `([^`]+\.eml)` \|", readme, re.MULTILINE))
        self.assertEqual(listed, [p.name for p in own_files()])

    def test_line_endings_byte_exact(self) -> None:
        """Each message still has the line endings it was written with (CRLF, or CR
        or LF alone where its name says so): git must never convert them
        (.gitattributes marks the files -text)."""
        for path in own_files():
            raw = path.read_bytes()
            crlf = raw.count(b"\r\n")
            if "cr_only" in path.name:
                expected = (raw.count(b"\r"), 0, 0)
            elif "lf_only" in path.name:
                expected = (0, raw.count(b"\n"), 0)
            else:
                expected = (0, 0, crlf)
            counts = (raw.count(b"\r") - crlf, raw.count(b"\n") - crlf, crlf)
            self.assertEqual(counts, expected, f"{path.name}: bare CR, bare LF, CRLF")


class CorpusTests(_Comparison):
    """One test per shared corpus file, added below."""

    def test_corpus_present(self) -> None:
        """The corpus folder exists (otherwise every corpus test is skipped)."""
        if not corpus_files():
            raise SkipTest(f"no MIME corpus at {CORPUS}")


def _content_id(leaf: Message) -> str | None:
    """The reference's Content-ID without angle brackets, or None."""
    value = str(leaf.get("content-id", "")).strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value or None


def _has_content(part: Message) -> bool:
    payload = part.get_payload()
    if isinstance(payload, list):
        return bool(payload)
    return bool(str(payload).strip())


def _add_test(cls: type[_Comparison], path: Path, root: Path, prefix: str) -> None:
    def test(self: _Comparison) -> None:
        self.check(path)

    relative = path.relative_to(root)
    test.__name__ = "test_" + prefix + re.sub(r"\W", "_", str(relative))
    test.__doc__ = (
        f"{relative}: parsed without error, raw kept, every part accounted for, bodies, "
        "attachments and addresses as the standard library reads them."
    )
    setattr(cls, test.__name__, test)


for _path in own_files():
    _add_test(OwnSetTests, _path, OWN_SET, "own_")
for _path in corpus_files():
    _add_test(CorpusTests, _path, CORPUS, "")
