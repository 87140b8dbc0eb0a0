"""Relay policy without sockets: networks, address patterns, the connect rule."""

from __future__ import annotations

import ipaddress
import itertools

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.policy.rules import (
    DEFAULT_PRIVATE_NETWORKS,
    RULES,
    UNIX_CLIENT,
    Decision,
    address_in,
    client_key,
    client_name,
    connection_decision,
    is_public_exposure,
    parse_address_patterns,
    parse_networks,
)


class ParseNetworksTests(SynchronousTestCase):
    def test_separators_and_forms(self) -> None:
        """Commas, spaces or both separate entries; bare addresses are one host."""
        self.assertEqual(
            parse_networks(" 10.0.0.0/8,192.0.2.7 , 2001:db8::/32\t::1,,"),
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.0.2.7/32"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("::1/128"),
            ),
        )
        self.assertEqual(parse_networks(""), ())
        self.assertEqual(parse_networks(" , "), ())

    def test_host_bits_are_dropped(self) -> None:
        """10.0.0.1/8 means 10.0.0.0/8 rather than an error."""
        self.assertEqual(parse_networks("10.0.0.1/8"), (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(parse_networks("fe80::1/10"), (ipaddress.ip_network("fe80::/10"),))

    def test_junk_names_the_entry_and_the_reason(self) -> None:
        """Bad entries raise ValueError quoting the entry and saying what is wrong."""
        cases = {
            "10.0.0.0/8, bogus": "'bogus' is not an IPv4 or IPv6 address",
            "10.0.0.0/33": "bad prefix length '33'",
            "::/129": "bad prefix length '129'",
            "10.0.0.0/": "bad prefix length ''",
            "300.1.2.3": "'300.1.2.3' is not an IPv4",
            "fe80::1%eth0": "interface scopes",
            "x" * 200: "...' is not an IPv4",
        }
        for text, reason in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_networks(text)
            self.assertIn(reason, str(caught.exception), text)
            self.assertLess(len(str(caught.exception)), 200)

    def test_default_private_networks(self) -> None:
        """The zero-config default is loopback, RFC 1918, unique-local and link-local."""
        self.assertEqual(
            {str(n) for n in DEFAULT_PRIVATE_NETWORKS},
            {
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fc00::/7",
                "fe80::/10",
            },
        )
        self.assertFalse(is_public_exposure(DEFAULT_PRIVATE_NETWORKS))

    @given(st.text(max_size=200))
    def test_parse_only_raises_value_error(self, text: str) -> None:
        """Any text parses to networks or raises ValueError, nothing else."""
        try:
            networks = parse_networks(text)
        except ValueError:
            return
        for network in networks:
            self.assertIsInstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)

    @given(st.ip_addresses())
    def test_a_bare_address_contains_itself(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> None:
        """Parsing any address gives a one-host network that matches it and its own form."""
        networks = parse_networks(str(address))
        self.assertEqual(networks[0].num_addresses, 1)
        self.assertTrue(address_in(str(address), networks))
        self.assertTrue(address_in(address.exploded, networks))


class AddressInTests(SynchronousTestCase):
    def test_plain_addresses(self) -> None:
        """IPv4 and IPv6 clients match the networks that hold them and no others."""
        self.assertTrue(address_in("10.1.2.3", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in("172.31.255.255", DEFAULT_PRIVATE_NETWORKS))
        self.assertFalse(address_in("172.32.0.1", DEFAULT_PRIVATE_NETWORKS))
        self.assertFalse(address_in("8.8.8.8", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in("fd12:3456::1", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in("::1", DEFAULT_PRIVATE_NETWORKS))
        self.assertFalse(address_in("2001:db8::1", DEFAULT_PRIVATE_NETWORKS))
        self.assertFalse(address_in("10.1.2.3", ()))

    def test_ipv4_mapped(self) -> None:
        """A dual-stack listener's ::ffff:10.1.2.3 is the IPv4 client 10.1.2.3."""
        self.assertTrue(address_in("::ffff:10.1.2.3", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in("::ffff:127.0.0.1", parse_networks("127.0.0.0/8")))
        self.assertFalse(address_in("::ffff:8.8.8.8", DEFAULT_PRIVATE_NETWORKS))
        # A mapped network written in IPv6 form still matches both spellings.
        mapped = parse_networks("::ffff:10.0.0.0/104")
        self.assertTrue(address_in("::ffff:10.9.9.9", mapped))
        self.assertTrue(address_in("10.9.9.9", parse_networks("10.0.0.0/8, ::ffff:0:0/96")))

    def test_scopes_and_brackets(self) -> None:
        """Zone suffixes and brackets around IPv6 are ignored for matching."""
        self.assertTrue(address_in("fe80::1%eth0", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in("[::1]", DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in(" 10.0.0.1 ", DEFAULT_PRIVATE_NETWORKS))

    def test_garbage_is_outside_everything(self) -> None:
        """Non-addresses match nothing, even 0.0.0.0/0 and ::/0, and never raise."""
        everything = parse_networks("0.0.0.0/0 ::/0")
        for junk in ("", "localhost", "/run/smtp.sock", "10.0.0.1/8", "%", "[", "\x00", "1" * 999):
            self.assertFalse(address_in(junk, everything), junk)

    @given(st.text(max_size=100))
    def test_never_raises(self, text: str) -> None:
        """address_in returns a bool for any text whatever."""
        self.assertIsInstance(address_in(text, DEFAULT_PRIVATE_NETWORKS), bool)
        self.assertIsInstance(client_key(text), str)


class ClientKeyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """IPv4 counts per address, mapped IPv4 as IPv4, IPv6 per /64."""
        self.assertEqual(client_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(client_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(client_key("2001:db8:1:2:bbbb::9%eth0"), "2001:db8:1:2::/64")
        self.assertNotEqual(client_key("2001:db8:1:3::1"), client_key("2001:db8:1:2::1"))
        self.assertEqual(client_key("unix-socket"), "unix-socket")


class PublicExposureTests(SynchronousTestCase):
    def test_public(self) -> None:
        """Anything reaching a globally routable address counts as public."""
        for text in (
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/8, 0.0.0.0/0",
            "8.8.8.8",
            "2001:4860::/32",
            "10.0.0.0/7",  # covers 11/8, which is public
            "::ffff:0:0/96",  # every IPv4 client in mapped form
            "::ffff:8.8.8.8",
        ):
            self.assertTrue(is_public_exposure(parse_networks(text)), text)

    def test_not_public(self) -> None:
        """Loopback, private, link-local, CGNAT and reserved ranges are not public."""
        for text in (
            "",
            "127.0.0.1",
            "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "fc00::/7 fe80::/10 ::1",
            "::ffff:10.0.0.0/104",
            "198.18.0.0/15",
        ):
            self.assertFalse(is_public_exposure(parse_networks(text)), text)


class AddressPatternTests(SynchronousTestCase):
    def test_empty_allows_all(self) -> None:
        """An unset list allows every address, the null sender included."""
        patterns = parse_address_patterns(" , ")
        self.assertTrue(patterns.empty)
        for address in ("", "a@example.com", "anything"):
            self.assertTrue(patterns.allows(address))

    def test_exact_addresses_ignore_case(self) -> None:
        """user@example.com matches in any ASCII case, and nothing else."""
        patterns = parse_address_patterns("Alerts@Example.COM, <ops@example.net>")
        self.assertTrue(patterns.allows("alerts@example.com"))
        self.assertTrue(patterns.allows("ALERTS@EXAMPLE.COM"))
        self.assertTrue(patterns.allows("ops@example.net"))
        self.assertFalse(patterns.allows("other@example.com"))
        self.assertFalse(patterns.allows("alerts@mail.example.com"))
        self.assertFalse(patterns.allows("alerts"))

    def test_domains(self) -> None:
        """@example.com covers that domain only; @.example.com covers subdomains only."""
        patterns = parse_address_patterns("@example.com @.corp.example")
        self.assertTrue(patterns.allows("anyone@EXAMPLE.com"))
        self.assertFalse(patterns.allows("anyone@mail.example.com"))
        self.assertFalse(patterns.allows("anyone@badexample.com"))
        self.assertTrue(patterns.allows("x@eu.corp.example"))
        self.assertTrue(patterns.allows("x@a.b.corp.example"))
        self.assertFalse(patterns.allows("x@corp.example"))
        self.assertFalse(patterns.allows("x@evilcorp.example"))
        self.assertFalse(patterns.allows("x@corp.example.evil"))

    def test_null_sender(self) -> None:
        """Once a list is set, <> passes only if it is listed explicitly."""
        self.assertFalse(parse_address_patterns("@example.com").allows(""))
        listed = parse_address_patterns("<>, @example.com")
        self.assertTrue(listed.allows(""))
        self.assertTrue(listed.allows("a@example.com"))
        only_null = parse_address_patterns("<>")
        self.assertFalse(only_null.empty)
        self.assertTrue(only_null.allows(""))
        self.assertFalse(only_null.allows("a@example.com"))

    def test_unicode_case_folding_cannot_forge(self) -> None:
        """A Kelvin sign (lowers to 'k') or other non-ASCII never matches a listed address."""
        patterns = parse_address_patterns("kate@example.com, @example.org")
        self.assertFalse(patterns.allows("\u212aate@example.com"))
        self.assertFalse(patterns.allows("x@example.\u212aorg"))

    def test_literals_and_quoted(self) -> None:
        """Whole addresses follow the MAIL grammar, literals and quoted local parts included."""
        patterns = parse_address_patterns('x@[192.0.2.1] "a.b"@example.com')
        self.assertTrue(patterns.allows("X@[192.0.2.1]"))
        self.assertTrue(patterns.allows('"A.B"@example.com'))

    def test_junk(self) -> None:
        """Entries that are no pattern raise ValueError naming the entry."""
        for text in (
            "user",
            "@",
            "@.",
            "@-bad-.example",
            "@example..com",
            "user@",
            "@exa mple.com",  # splits into '@exa' (fine) and 'mple.com' (bad)
            "<user@example.com",
            "<>>",
            "\u00e9@example.com",
            "@\u00e9xample.com",
            "a@b@c.example",
            "@example.com.",
        ):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_address_patterns(text)
            self.assertLess(len(str(caught.exception)), 250)

    @given(st.text(max_size=200))
    def test_parse_only_raises_value_error(self, text: str) -> None:
        """Any text parses to patterns or raises ValueError; allows() never raises."""
        try:
            patterns = parse_address_patterns(text)
        except ValueError:
            return
        for probe in (text, "", "a@example.com"):
            self.assertIsInstance(patterns.allows(probe), bool)

    @given(st.text(max_size=100), st.text(max_size=100))
    def test_allows_never_raises(self, listed: str, probe: str) -> None:
        """allows() returns a bool for any probe, whatever was listed."""
        patterns = parse_address_patterns("@example.com a@example.org <> @.example.net")
        self.assertIsInstance(patterns.allows(probe), bool)
        self.assertIsInstance(patterns.allows(listed + "@" + probe), bool)

    @given(
        st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,20}[a-z0-9]", fullmatch=True).filter(
            lambda local: ".." not in local
        ),
        st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    )
    def test_listed_address_round_trip(self, local: str, domain: str) -> None:
        """Every listed address and domain matches itself in any case."""
        address = f"{local}@{domain}"
        self.assertTrue(parse_address_patterns(address).allows(address.upper()))
        self.assertTrue(parse_address_patterns("@" + domain).allows(address.upper()))
        self.assertTrue(parse_address_patterns("@." + domain).allows(f"{local}@sub.{domain}"))
        self.assertFalse(parse_address_patterns("@." + domain).allows(address))


class DecisionTests(SynchronousTestCase):
    def test_rule_table_is_complete(self) -> None:
        """Every (auth, allowed, trusted) combination has exactly one decision."""
        self.assertEqual(set(RULES), set(itertools.product((False, True), repeat=3)))

    def test_rule_table(self) -> None:
        """AUTH off: allowed networks relay, others are refused; AUTH on: trusted
        networks relay, everyone else must authenticate, nobody is refused."""
        allowed = parse_networks("10.0.0.0/8, 192.168.1.0/24")
        trusted = parse_networks("192.168.1.0/24, 172.16.0.0/12")
        # client: (in allowed, in trusted)
        clients = {
            "192.168.1.5": (True, True),
            "10.0.0.5": (True, False),
            "172.16.0.5": (False, True),
            "203.0.113.5": (False, False),
        }
        expected = {
            (False, True, True): Decision.RELAY_WITHOUT_AUTH,
            (False, True, False): Decision.RELAY_WITHOUT_AUTH,
            (False, False, True): Decision.REJECT,
            (False, False, False): Decision.REJECT,
            (True, True, True): Decision.RELAY_WITHOUT_AUTH,
            (True, False, True): Decision.RELAY_WITHOUT_AUTH,
            (True, True, False): Decision.NEEDS_AUTH,
            (True, False, False): Decision.NEEDS_AUTH,
        }
        for (ip, (in_allowed, in_trusted)), auth in itertools.product(
            clients.items(), (False, True)
        ):
            self.assertEqual(
                connection_decision(ip, allowed, auth, trusted),
                expected[(auth, in_allowed, in_trusted)],
                (ip, auth),
            )

    def test_zero_config(self) -> None:
        """Defaults: LAN and Docker clients relay, the internet is refused; with AUTH
        and no trusted networks, everyone (loopback too) must authenticate."""
        private = DEFAULT_PRIVATE_NETWORKS
        self.assertEqual(
            connection_decision("172.17.0.1", private, False, ()), Decision.RELAY_WITHOUT_AUTH
        )
        self.assertEqual(
            connection_decision("::ffff:192.168.0.9", private, False, ()),
            Decision.RELAY_WITHOUT_AUTH,
        )
        self.assertEqual(connection_decision("198.51.100.1", private, False, ()), Decision.REJECT)
        self.assertEqual(connection_decision("127.0.0.1", private, True, ()), Decision.NEEDS_AUTH)
        self.assertEqual(connection_decision("8.8.8.8", private, True, ()), Decision.NEEDS_AUTH)

    def test_unparseable_client(self) -> None:
        """A client address that is not an IP is refused without AUTH, challenged with it."""
        everything = parse_networks("0.0.0.0/0 ::/0")
        self.assertEqual(connection_decision("???", everything, False, ()), Decision.REJECT)
        self.assertEqual(connection_decision("???", (), True, everything), Decision.NEEDS_AUTH)


class UnixClientTests(SynchronousTestCase):
    """Issue 10: a client of a unix: listener is judged as loopback is."""

    def test_client_name(self) -> None:
        """A UNIX socket peer, named or not, is "unix"; IP peers give their host."""
        self.assertEqual(client_name(UNIXAddress(None)), UNIX_CLIENT)
        self.assertEqual(client_name(UNIXAddress(b"/run/client.sock")), UNIX_CLIENT)
        self.assertEqual(client_name(IPv4Address("TCP", "192.0.2.1", 25)), "192.0.2.1")
        self.assertEqual(client_name(IPv6Address("TCP", "2001:db8::1", 25)), "2001:db8::1")

    def test_inside_the_networks_that_hold_loopback(self) -> None:
        """Allowed and trusted where 127.0.0.1 is, outside lists without it."""
        self.assertTrue(address_in(UNIX_CLIENT, DEFAULT_PRIVATE_NETWORKS))
        self.assertTrue(address_in(UNIX_CLIENT, parse_networks("127.0.0.1")))
        self.assertFalse(address_in(UNIX_CLIENT, parse_networks("10.0.0.0/8 ::1")))
        self.assertFalse(address_in(UNIX_CLIENT, ()))

    def test_decisions_match_loopback(self) -> None:
        """For every setting combination the unix client gets loopback's decision."""
        lists = [(), DEFAULT_PRIVATE_NETWORKS, parse_networks("10.0.0.0/8")]
        for allowed, trusted, auth in itertools.product(lists, lists, (False, True)):
            self.assertEqual(
                connection_decision(UNIX_CLIENT, allowed, auth, trusted),
                connection_decision("127.0.0.1", allowed, auth, trusted),
                (allowed, trusted, auth),
            )

    def test_counted_apart_from_tcp_loopback(self) -> None:
        """Local socket clients share one per-address bucket, not 127.0.0.1's."""
        self.assertEqual(client_key(UNIX_CLIENT), UNIX_CLIENT)
        self.assertNotEqual(client_key(UNIX_CLIENT), client_key("127.0.0.1"))
