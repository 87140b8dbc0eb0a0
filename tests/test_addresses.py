"""Address syntax and comparison keys (smtpproxy.addresses), without sockets."""

from __future__ import annotations

import email.policy
from email.utils import getaddresses

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.addresses import (
    Mailbox,
    Problem,
    ascii_address,
    ascii_domain,
    default_domain,
    envelope_key,
    has_ascii_local_part,
    is_deliverable,
    is_hostname,
    mailbox_key,
    mailbox_problem,
    pattern_key,
    qualify,
    salvage_addresses,
    simple_mailboxes,
    split,
    split_address_list,
)

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
#: Blanks, and the ASCII controls str.strip() and \\s take for blanks while the full parsers do not.
odd_space = st.sampled_from(["", " ", "\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x00"])
odd_item = st.one_of(
    st.builds(lambda n, s1, a, s2: f"{s1}{n}{s1}<{a}>{s2}", name, odd_space, addr, odd_space),
    st.builds(lambda s1, a, s2: f"{s1}{a}{s2}", odd_space, addr, odd_space),
)
odd_header = st.lists(odd_item, min_size=1, max_size=4).map(",".join)


def stdlib(value: str) -> list[Mailbox]:
    parsed = email.policy.default.header_factory("to", value)
    return [Mailbox(a.display_name, a.addr_spec) for a in parsed.addresses]


class SyntaxTests(SynchronousTestCase):
    def test_split_at_the_last_at(self) -> None:
        """A quoted local part may hold an C{@}; the domain is what follows the last one."""
        self.assertEqual(split('"a@b"@c.example'), ('"a@b"', "c.example"))
        self.assertEqual(split("a@b.example"), ("a", "b.example"))
        self.assertEqual(split("root"), ("", "root"))

    def test_mailbox_problems(self) -> None:
        """Each way an envelope address can be wrong is named, path length first."""
        for good in (
            "a@b.example",
            '"a b"@b.example',
            "a@[192.0.2.1]",
            "a@[IPv6:2001:db8::1]",
            "jörg@müller.example",
            "a@" + ("b" * 62 + ".") * 4 + "bc",  # a 254-character domain: only the path counts
        ):
            self.assertIsNone(mailbox_problem(good), good)
        cases = {
            "a" * 300 + "@b.example": Problem.TOO_LONG,
            "a": Problem.SYNTAX,
            "a b@c.example": Problem.SYNTAX,
            "a@-b.example": Problem.SYNTAX,
            "a@ex..ämple": Problem.SYNTAX,
            "a" * 65 + "@b.example": Problem.LOCAL_PART_TOO_LONG,
        }
        for address, problem in cases.items():
            self.assertEqual(mailbox_problem(address), problem, address)

    def test_hostname(self) -> None:
        """ASCII LDH labels of at most 253 characters: what an allow-list domain must be."""
        self.assertTrue(is_hostname("mail.example.org"))
        self.assertTrue(is_hostname("b" * 63 + "." + "c" * 63))
        for bad in ("", "-a.example", "a..b", "a_b.example", "b" * 64, ("a" * 62 + ".") * 4 + "ab"):
            self.assertFalse(is_hostname(bad), bad)

    @given(st.text(alphabet='a@."\\ <>[]:ä-', max_size=300))
    def test_never_raises(self, text: str) -> None:
        """Whatever a client sends, the syntax check answers and never raises."""
        mailbox_problem(text)
        is_hostname(text)


class KeyTests(SynchronousTestCase):
    """The three comparison keys answer three different questions, on purpose."""

    def test_envelope_key_folds_the_domain_only(self) -> None:
        """Two RCPTs differing only in the domain's case are one recipient; in the local
        part's case, two (the destination decides what the local part means)."""
        self.assertEqual(envelope_key("Bob@EXAMPLE.org"), envelope_key("Bob@example.org"))
        self.assertNotEqual(envelope_key("Bob@example.org"), envelope_key("bob@example.org"))

    def test_pattern_key_is_ascii_only(self) -> None:
        """Allow-lists compare ASCII case-blind; a non-ASCII address never matches, so
        the Kelvin sign cannot stand in for a listed C{k}."""
        self.assertEqual(pattern_key("Bob@Example.ORG"), "bob@example.org")
        self.assertIsNone(pattern_key("\u212aate@example.org"))
        self.assertIsNone(pattern_key("no-at-sign"))

    def test_mailbox_key_is_exchange_s_view(self) -> None:
        """The provider ignores brackets, blanks and case, and reads IDNs by A-labels."""
        self.assertEqual(mailbox_key(" <Bob@Example.org> "), mailbox_key("bob@example.org"))


class AddressListTests(SynchronousTestCase):
    def test_split_address_list(self) -> None:
        """Commas inside quotes, comments and angle brackets do not separate addresses;
        a group is left whole (None)."""
        self.assertEqual(
            split_address_list('"a, b" <a@b.c>, (x, y) d@e.f, <g,h@i.j>'),
            ['"a, b" <a@b.c>', " (x, y) d@e.f", " <g,h@i.j>"],
        )
        self.assertIsNone(split_address_list("team: a@b.c, d@e.f;"))
        self.assertEqual(split_address_list(""), [""])

    def test_salvage_keeps_the_parsed_and_adds_new(self) -> None:
        """Address-like runs are added once each, compared case-blind to what was parsed."""
        parsed = [Mailbox("A", "a@b.example")]
        found = salvage_addresses("A@B.example, junk <c@d.example> @x y@", parsed)
        self.assertEqual(found, [Mailbox("A", "a@b.example"), Mailbox("", "c@d.example")])


class SimpleMailboxTests(SynchronousTestCase):
    @given(header)
    def test_agrees_with_stdlib(self, value: str) -> None:
        """Wherever the quick path answers, it gives what the full parser gives."""
        quick = simple_mailboxes(value)
        if quick is not None and "=?" not in value:
            self.assertEqual(quick, stdlib(value))

    @given(odd_header)
    def test_agrees_with_stdlib_around_control_characters(self, value: str) -> None:
        """With control characters next to names and addresses, the quick path declines
        or agrees with the header registry and with C{getaddresses} (review 5)."""
        quick = simple_mailboxes(value)
        if quick is not None and "=?" not in value:
            self.assertEqual(quick, stdlib(value))
            self.assertEqual([(m.name, m.address) for m in quick], getaddresses([value]))

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


class DomainTests(SynchronousTestCase):
    def test_u_labels_become_a_labels(self) -> None:
        """Unicode labels become IDNA 2008 A-labels; upper case is folded (UTS 46)."""
        self.assertEqual(ascii_domain("exämple.test"), "xn--exmple-cua.test")
        self.assertEqual(ascii_domain("EXÄMPLE.test"), "xn--exmple-cua.test")
        self.assertEqual(ascii_domain("例え.テスト"), "xn--r8jz45g.xn--zckzah")
        self.assertEqual(ascii_domain("plain.example"), "plain.example")

    def test_idna_2008_not_2003(self) -> None:
        """C{faß.de} keeps its sharp s (IDNA 2008), where the standard library's IDNA 2003
        codec would send the mail to C{fass.de}, a different domain."""
        self.assertEqual("faß.de".encode("idna"), b"fass.de")
        self.assertEqual(ascii_domain("faß.de"), "xn--fa-hia.de")

    def test_invalid_domains(self) -> None:
        """Empty labels, hyphens at the ends, spaces, over-long labels and domains: None."""
        for domain in ("ex..ämple", "-ä.de", "ä-.de", "ä b.de", "ä" * 64 + ".de", "ä." * 130):
            self.assertIsNone(ascii_domain(domain), domain)

    def test_addresses(self) -> None:
        """Only the domain is converted; a UTF-8 local part has no ASCII form and stays."""
        self.assertEqual(ascii_address("josé@exämple.test"), "josé@xn--exmple-cua.test")
        self.assertEqual(ascii_address("a@b.example"), "a@b.example")
        self.assertEqual(ascii_address("a@ex..ämple"), "a@ex..ämple")
        self.assertFalse(has_ascii_local_part("josé@b.example"))
        self.assertTrue(has_ascii_local_part("jose@exämple.test"))

    def test_mailbox_key_matches_both_forms(self) -> None:
        """The same mailbox written with U-labels and with A-labels is one recipient."""
        self.assertEqual(mailbox_key("Zoe@EXÄMPLE.test"), mailbox_key("zoe@xn--exmple-cua.test"))


class QualifyTests(SynchronousTestCase):
    def test_bare_local_part_gets_the_domain(self) -> None:
        """C{root} and dotted local parts become C{local@domain}; anything else is unchanged."""
        self.assertEqual(qualify("root", "example.org"), "root@example.org")
        self.assertEqual(qualify("cron.daily", "example.org"), "cron.daily@example.org")
        for unchanged in ("a@b.example", "", "two words", '"quoted"', ".dot", "a..b", "a<b"):
            self.assertEqual(qualify(unchanged, "example.org"), unchanged)
        self.assertEqual(qualify("root", ""), "root")

    def test_deliverable(self) -> None:
        """Plain C{local@domain.tld} addresses (UTF-8 too) pass; what Graph refuses does not."""
        for good in ("a@b.example", "first.last+tag@mail.example.org", "jörg@müller.example"):
            self.assertTrue(is_deliverable(good), good)
        bad = (
            "root",
            "root@localhost",
            "a@b",
            "@b.example",
            "a@",
            '"a b"@c.example',
            "a@[192.0.2.1]",
            "a b@c.example",
            "a@b..example",
            ".a@b.example",
            "a@b@c.example",
            "a\x00@b.example",
            "x" * 65 + "@b.example",
            "a@" + "b" * 250 + ".example",
        )
        for address in bad:
            self.assertFalse(is_deliverable(address), address)

    def test_default_domain(self) -> None:
        """SMTP_DEFAULT_DOMAIN wins; else the first GRAPH_SENDER's domain; else empty."""
        self.assertEqual(default_domain("set.example", ("r@contoso.example",)), "set.example")
        self.assertEqual(default_domain("", ("r@contoso.example",)), "contoso.example")
        self.assertEqual(default_domain("", ()), "")

    @given(st.text(max_size=400), st.sampled_from(["", "example.org"]))
    def test_never_raises(self, text: str, domain: str) -> None:
        """Any text is answered, and a qualified address is deliverable when the input
        was a plain local part."""
        qualified = qualify(text, domain)
        is_deliverable(qualified)
        if domain and qualified != text:
            self.assertTrue(is_deliverable(qualified), qualified)
