"""Review 4: C{NO_PROXY} entries in brackets (proxyconfig._split_port).

Pure tests; each fails on the code as reviewed.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.graph.proxyconfig import parse_no_proxy


class BracketedEntryTests(SynchronousTestCase):
    """_split_port (proxyconfig.py:132-135) takes what is inside C{[...]} as the
    host and looks after the bracket only for C{:port}; anything else there is
    dropped without a word.  parse_no_proxy promises a ValueError for "an
    entry that is none of the forms above"."""

    def test_bracketed_cidr_is_not_read_as_one_address(self) -> None:
        """C{[fd00::]/8} is read as the single address fd00:: (the C{/8} is
        dropped), so fd12::1 still goes through the proxy although the operator
        listed the whole block.  Expected: either the block fd00::/8, or a
        start-up error; never a silently narrower entry."""
        try:
            no_proxy = parse_no_proxy("[fd00::]/8")
        except ValueError:
            return
        self.assertTrue(no_proxy.bypasses("fd12::1", 443), no_proxy)

    def test_trailing_junk_after_brackets_is_refused(self) -> None:
        """C{[fd00::]junk} is taken as fd00:: with no complaint.  Expected:
        ValueError (neither C{[v6]} nor C{[v6]:port})."""
        with self.assertRaises(ValueError):
            parse_no_proxy("[fd00::]junk")
