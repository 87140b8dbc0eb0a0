"""Splitting a raw header block into fields (L{smtpproxy.mime.fields.split_fields})."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.fields import split_fields


class SplitFieldsTests(SynchronousTestCase):
    def test_folded_fields_and_rest(self) -> None:
        """Each field keeps its continuation lines and line breaks; the rest starts at the
        blank line, so joining the parts gives back the message byte for byte."""
        raw = b"A: 1\r\n 2\r\n\t3\r\nB: x\rC: y\n z\n\r\nbody\r\n"
        fields, rest = split_fields(raw)
        self.assertEqual(fields, [b"A: 1\r\n 2\r\n\t3\r\n", b"B: x\r", b"C: y\n z\n"])
        self.assertEqual(rest, b"\r\nbody\r\n")
        self.assertEqual(b"".join(fields) + rest, raw)

    def test_leading_continuation_and_no_body(self) -> None:
        """A continuation line with no field before it is a field of its own (callers drop
        it), and a header block with no blank line and no last line break ends the message."""
        fields, rest = split_fields(b" stray\r\nA: 1\r\n more")
        self.assertEqual(fields, [b" stray\r\n", b"A: 1\r\n more"])
        self.assertEqual(rest, b"")
        self.assertEqual(split_fields(b""), ([], b""))
        self.assertEqual(split_fields(b"\r\nbody"), ([], b"\r\nbody"))
