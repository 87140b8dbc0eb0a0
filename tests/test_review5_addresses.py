"""Review 5: where the quick To/Cc reader and the full parsers disagree.

L{simple_mailboxes} promises to answer only where its reading equals the
standard library's (C{getaddresses} for the Graph payload, the header
registry for the relay's parse).  The property tests generate printable
ASCII only; these are the forms they do not generate.
"""

from __future__ import annotations

from email.utils import getaddresses

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.addresses import simple_mailboxes
from smtpproxy.providers.graph.payload import _header_pairs
from tests.test_addresses import stdlib

#: ASCII controls that C{str.strip} removes and neither full parser does.
CONTROL_FORMS = (
    "\x1cx@y.example",
    "\x0bA <a@b.example>",
    "A\x0c<a@b.example>",
    "A B\x1d <a@b.example>",
)


class ControlCharacterTests(SynchronousTestCase):
    def test_quick_path_agrees_with_the_header_registry(self) -> None:
        """For a value with a C0 control next to an address or name, simple_mailboxes
        either declines (None) or gives what the header registry gives.

        C{simple_mailboxes} cuts each item with C{str.strip()}, which also
        removes vertical tab, form feed and U+001C..U+001F, so it reads
        C{"\\x1cx@y.example"} as C{x@y.example} while the full parser keeps
        the control (another address, compared by L{mailbox_key}).  Right:
        strip only blanks and tabs, or return None for any control character.
        """
        for value in CONTROL_FORMS:
            quick = simple_mailboxes(value)
            if quick is not None:
                self.assertEqual(quick, stdlib(value), repr(value))

    def test_graph_header_pairs_agree_with_getaddresses(self) -> None:
        """The Graph payload's L{_header_pairs} (quick path first) gives C{getaddresses}'
        pairs for the same control-character forms, as its docstring promises."""
        for value in CONTROL_FORMS:
            self.assertEqual(
                _header_pairs(value.encode("ascii")), getaddresses([value]), repr(value)
            )
