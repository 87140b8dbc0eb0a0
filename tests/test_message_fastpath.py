"""The quick address-header path agrees with the standard library's parser."""

from __future__ import annotations

import email.policy

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.message import Mailbox, simple_mailboxes

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
addr = st.builds(lambda local, domain: f"{local}@{domain}", dot_atom, dot_atom)
name = st.lists(atom, min_size=0, max_size=3).map(" ".join)
space = st.sampled_from(["", " ", "  ", "\t"])
item = st.one_of(
    st.builds(lambda n, s1, a, s2: f"{s1}{n}{s1}<{a}>{s2}", name, space, addr, space),
    st.builds(lambda s1, a, s2: f"{s1}{a}{s2}", space, addr, space),
)
header = st.lists(item, min_size=1, max_size=4).map(",".join)


def stdlib(value: str) -> list[Mailbox]:
    parsed = email.policy.default.header_factory("to", value)
    return [Mailbox(a.display_name, a.addr_spec) for a in parsed.addresses]


class SimpleMailboxTests(SynchronousTestCase):
    @given(header)
    def test_agrees_with_stdlib(self, value: str) -> None:
        """Wherever the quick path answers, it gives what the full parser gives."""
        quick = simple_mailboxes(value)
        if quick is not None and "=?" not in value:
            self.assertEqual(quick, stdlib(value))

    def test_common_forms_take_the_quick_path(self) -> None:
        """The forms real clients send are handled without the full parser."""
        for value in ("Sender <sender@example.com>", "a@b.example", "A <a@b.c>, b@c.d"):
            self.assertIsNotNone(simple_mailboxes(value), value)

    def test_anything_unusual_is_left_to_the_full_parser(self) -> None:
        """Quotes, comments, groups, encoded words and obsolete syntax are not guessed at."""
        for value in (
            '"Q" <q@x.y>',
            "J. Smith <j@x.y>",
            "x@y.z (comment)",
            "undisclosed-recipients:;",
            "=?utf-8?q?J=C3=BCrgen?= <j@x.y>",
            "a@b.c,",
            "",
            "J\u00fcrgen <j@x.y>",
        ):
            self.assertIsNone(simple_mailboxes(value), value)
