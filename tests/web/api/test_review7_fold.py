"""Review 7: L{names.fold} must never return a line longer than RFC 5322's 998.

Its contract: the lines, or None when a word is too long for any line.
When the first word does not fit on the name's line it moves to a line
of its own after a blank, but that line is appended without the length
check when the next piece starts a new line: a 999-character line comes
back, and L{names.fits} then says the value fits unencoded.  The API's
998-character value limit hides it today (the first word can be at most
996 characters when another follows); any caller with a longer value
(the policy in L{headercache} folds every long ASCII value it writes)
gets an RFC-breaking line.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.web.api import names


class FoldLineLimitTests(SynchronousTestCase):
    def test_first_word_too_long_for_any_line_is_refused(self) -> None:
        """A first word of 998 characters followed by another word: no line can carry
        the first (998 plus its blank), so fold returns None and fits is False;
        never a line of 999."""
        value = "b" * 998 + " a"
        folded = names.fold("X-A", value)
        if folded is not None:
            lengths = [len(line) for line in folded.split("\r\n")]
            self.assertLessEqual(max(lengths), names.MAX_LINE, f"line lengths {lengths}")
        self.assertIsNone(folded)
        self.assertFalse(names.fits("X-A", value))
