"""The raw To/Cc/From reading that decides MIME vs JSON: quick path and full parser agree.

L{_header_pairs} reads the everyday forms with L{simple_mailboxes} and
leaves the rest to the standard library's C{getaddresses}, which is what it
used for everything before (and what stands in for Graph's own reading).
"""

from __future__ import annotations

from email.utils import getaddresses

from hypothesis import given
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.addresses import mailbox_key, simple_mailboxes
from smtpproxy.providers.graph.payload import _header_pairs
from tests.test_addresses import header


class HeaderPairsTests(SynchronousTestCase):
    @given(header)
    def test_quick_path_agrees_with_getaddresses(self, value: str) -> None:
        """Wherever the quick path answers, the pairs are exactly getaddresses' pairs."""
        if simple_mailboxes(value) is None:
            return
        self.assertEqual(_header_pairs(value.encode("utf-8")), getaddresses([value]))

    def test_everyday_and_unusual_forms(self) -> None:
        """Folded, named, bare and listed forms; groups and quotes still go to getaddresses."""
        for raw in (
            b" Bench Client <bench@client.example>",
            b" a@x.example,\r\n\tB <b@y.example>",
            b" <a@x.example>",
            b' "Smith, J." <j@x.example>',
            b" undisclosed-recipients:;",
            b" a@x.example (the boss)",
        ):
            text = raw.replace(b"\r", b"").replace(b"\n", b"").decode()
            self.assertEqual(_header_pairs(raw), getaddresses([text]), raw)

    def test_mailbox_key_same_for_long_addresses(self) -> None:
        """Keys of addresses too long to be remembered are computed the same way."""
        long_local = "A" * 300 + "@X.example"
        self.assertEqual(mailbox_key(f" <{long_local}> "), long_local.casefold())
        self.assertEqual(mailbox_key(" <Zoe@Exämple.test> "), "zoe@xn--exmple-cua.test")
