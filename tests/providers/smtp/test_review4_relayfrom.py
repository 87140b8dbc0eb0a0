"""Review 4: RELAY_FROM's header edit on a header block of many folded lines.

L{force_sender} runs on the reactor thread for every message when
C{RELAY_FROM} is set.  The existing linear-time test covers many fields and a
big body, not one field folded over many lines: L{split_fields} grows that
field with C{fields[-1] += line}, which copies the whole field again for every
continuation line, so the edit is quadratic in the field's length.  A client
can send a header block of tens of megabytes (C{SMTP_MAX_MESSAGE_SIZE} is
25 MB by default; the message parser reads only its first 256 KB) and hold the
reactor, so every other session, for hours.
"""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.providers.smtp.relayfrom import force_sender


class FoldedHeaderTests(SynchronousTestCase):
    def test_long_folded_field_is_edited_in_linear_time(self) -> None:
        """One field folded over 250,000 lines (1 MB) is edited in under two seconds, as
        200,000 unfolded fields are; a quadratic split takes tens of seconds (and a
        25 MB header block hours)."""
        raw = (
            b"From: a@apps.example\r\nX-Long: x\r\n"
            + b" a\r\n" * 250_000
            + b"Subject: s\r\n\r\nbody\r\n"
        )
        email = parse_message("a@apps.example", ["b@example.org"], raw)
        started = time.perf_counter()
        out = force_sender(email, "relay@example.com").raw
        elapsed = time.perf_counter() - started
        self.assertTrue(out.endswith(raw[raw.index(b"X-Long") :]))
        self.assertLess(elapsed, 2.0)
