"""Every envelope recipient receives every message, whatever its header block looks like.

Each message of the project's own MIME set (tests/data/mime, in every
clone), of the shared corpus when it is present (see tests/test_corpus.py)
and of the project's own hostile set (tests/hostile_messages.py) goes
through the real parser and the real Graph provider to the strict fake
Graph, in two envelope shapes:

  - header-plus-one: every To/Cc/Bcc address an SMTP client could name in
    RCPT TO and Graph would deliver to (a header's C{xx@xx} is left out:
    Graph refuses it, rightly, whatever the relay does), plus one address
    no header names (it must travel as Bcc);
  - stranger-only: one address that no header names.

A signed or encrypted message goes only as raw MIME (a JSON rebuild would
break its signature): in the stranger-only shape, when its To/Cc name
anyone, raw MIME would mail them, so the relay must refuse it with 554
5.3.4 and send nothing; in every other case it must arrive as raw MIME.

The fake reads what it is sent the way Graph would (the standard library's
MIME parser stands in for Graph's): the To/Cc/Bcc it parses out must be
exactly the envelope, no recipient lost and nobody added, and the
attachments it sees must be byte for byte the ones the original carries.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.addresses import mailbox_key
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.mimeparts import is_signed
from smtpproxy.smtp.commands import CommandError, check_address
from tests.fakegraph import (
    Delivery,
    graph_accepts,
    mime_addresses,
    mime_attachments,
    parse_mime,
)
from tests.hostile_messages import MESSAGES, PAYLOAD
from tests.mime.test_corpus import CORPUS, OWN_SET, corpus_files, own_files
from tests.providers.graph.test_provider import MAILBOX, Harness

EXTRA = "one-more@elsewhere.example"
STRANGER = "stranger-only@elsewhere.example"
SHAPES = ("header_plus_one", "stranger_only")


def rcpt_acceptable(address: str) -> bool:
    """Whether an SMTP client could name C{address} in RCPT TO (the relay's own check)."""
    try:
        check_address(address, "recipient")
    except CommandError:
        return False
    return True


def envelope_for(raw: bytes, shape: str) -> list[str]:
    """The RCPT TO list of one envelope shape for C{raw}, without repeats."""
    if shape == "stranger_only":
        return [STRANGER]
    parsed = parse_message("sender@example.com", [], raw)
    named = [m.address for m in (*parsed.to, *parsed.cc, *parsed.bcc)]
    unique = {mailbox_key(a): a for a in named if rcpt_acceptable(a) and graph_accepts(a)}
    return [*unique.values(), EXTRA]


def digests(attachments: list[tuple[str, bytes]]) -> Counter[tuple[int, str]]:
    """Sizes and SHA-256 of attachments, as a multiset."""
    return Counter((len(data), hashlib.sha256(data).hexdigest()) for _, data in attachments)


def original_attachments(raw: bytes, *, open_embedded: bool) -> list[tuple[str, bytes]]:
    """The attachments of the message as the client sent it, read as Graph would.

    @param open_embedded: count the parts inside embedded messages (what a
        raw MIME delivery carries), or leave embedded messages out (the JSON
        form sends each as one attachment, compared in its own test).
    """
    message = parse_mime(raw)
    if open_embedded:
        return mime_attachments(message)
    found: list[tuple[str, bytes]] = []
    stack: list[Any] = [message]
    while stack:
        part = stack.pop(0)
        if part.get_content_maintype() == "message":
            continue
        if part.is_multipart():
            stack[:0] = list(part.get_payload())
            continue
        found += mime_attachments(part)
    return found


class RecipientTests(SynchronousTestCase):
    """One test per message and envelope shape, added below."""

    def deliver(self, raw: bytes, envelope: list[str]) -> Delivery:
        """Send C{raw} to C{envelope} through the provider; the one delivery the fake made."""
        harness = Harness()
        email = parse_message("sender@example.com", envelope, raw)
        done = harness.send(email)
        harness.run()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(harness.fake.violations, [])
        (delivery,) = harness.fake.deliveries
        return delivery

    def refused_as_signed(self, raw: bytes, envelope: list[str]) -> None:
        """C{raw} (signed) to C{envelope} is refused 554 5.3.4 and nothing reaches Graph."""
        harness = Harness()
        done = harness.send(parse_message("sender@example.com", envelope, raw))
        harness.run()
        error = self.failureResultOf(done, PermanentDeliveryError).value
        self.assertEqual((error.code, error.status), (554, "5.3.4"), str(error))
        self.assertEqual(harness.fake.deliveries, [])
        self.assertEqual(
            [r.route for r in harness.fake.requests if r.route != "token"], [], "requests"
        )

    def check(self, raw: bytes, shape: str) -> Delivery | None:
        envelope = envelope_for(raw, shape)
        signed = is_signed(raw)
        if signed and shape == "stranger_only":
            parsed = parse_message("sender@example.com", envelope, raw)
            if parsed.to or parsed.cc:
                self.refused_as_signed(raw, envelope)
                return None
        delivery = self.deliver(raw, envelope)
        if signed:
            self.assertEqual(delivery.method, "mime", "a signed message rebuilt")
        # Graph delivers one copy per address, however often the headers name it.
        received = {mailbox_key(a) for a in delivery.recipients}
        expected = {mailbox_key(a) for a in envelope}
        self.assertEqual(received, expected, f"recipients ({delivery.method})")
        if delivery.mime is not None:
            sent = delivery.attachments
            self.assertEqual(digests(sent), digests(original_attachments(raw, open_embedded=True)))
        else:
            before = digests(original_attachments(raw, open_embedded=False))
            self.assertEqual(before - digests(delivery.attachments), Counter(), "attachments")
        return delivery

    def test_corpus_present(self) -> None:
        """The shared corpus exists (otherwise its recipient tests are skipped)."""
        if not corpus_files():
            raise SkipTest(f"no MIME corpus at {CORPUS}")

    def test_from_root_delivered_with_qualified_reply_to(self) -> None:
        """C{From: root} is delivered in both shapes, its Reply-To qualified with the
        sending mailbox's domain (Graph refuses a bare local part)."""
        raw = MESSAGES["from_root"]
        qualified = "root@" + MAILBOX.partition("@")[2]
        for shape in SHAPES:
            delivery = self.check(raw, shape)
            assert delivery is not None
            if delivery.mime is not None:
                reply_to = mime_addresses(parse_mime(delivery.mime), "reply-to")
            else:
                assert delivery.message is not None
                reply_to = tuple(r["emailAddress"]["address"] for r in delivery.message["replyTo"])
            self.assertEqual(reply_to, (qualified,), shape)
            self.assertIn(("dump.bin", PAYLOAD), delivery.attachments)

    def test_bare_cr_hides_no_recipient(self) -> None:
        """A Bcc behind a bare CR (a field of its own to the reader) is removed like any
        other Bcc: sent as raw MIME, the stranger it names, not in the envelope, receives
        nothing."""
        delivery = self.deliver(MESSAGES["bare_cr"], ["carol@example.net", EXTRA])
        self.assertEqual(delivery.method, "mime")
        self.assertEqual(set(delivery.recipients), {"carol@example.net", EXTRA})

    def test_line_without_colon_goes_as_mime(self) -> None:
        """The message that used to lose its Bcc still goes as raw MIME: the Bcc the relay
        adds is at the top, where the parser still reads fields."""
        delivery = self.check(MESSAGES["line_without_colon"], "header_plus_one")
        assert delivery is not None
        self.assertEqual(delivery.method, "mime")
        self.assertEqual(delivery.bcc, (EXTRA,))


def _add(name: str, raw: Callable[[], bytes], where: str) -> None:
    for shape in SHAPES:

        def test(self: RecipientTests, shape: str = shape) -> None:
            self.check(raw(), shape)

        test.__name__ = "test_" + re.sub(r"\W", "_", name) + "_" + shape
        test.__doc__ = (
            f"{where}, envelope {shape.replace('_', ' ')}: every envelope recipient and nobody "
            "else in the To/Cc/Bcc the fake parses; attachments unchanged."
        )
        setattr(RecipientTests, test.__name__, test)


def _reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _constant(raw: bytes) -> Callable[[], bytes]:
    return lambda: raw


for _name, _raw in MESSAGES.items():
    _add("own_" + _name, _constant(_raw), f"own message {_name}")
for _path in own_files():
    _relative = _path.relative_to(OWN_SET)
    _add("mime_" + str(_relative), _reader(_path), f"own MIME set {_relative}")
for _path in corpus_files():
    _relative = _path.relative_to(CORPUS)
    _add("corpus_" + str(_relative), _reader(_path), f"corpus {_relative}")
