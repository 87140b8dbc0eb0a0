"""The AUTH_CONFIG file format and provider selection: pure rules, no sockets."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from smtpproxy.identities.errors import IdentityConfigError
from smtpproxy.identities.fileformat import expand, parse
from smtpproxy.identities.ldapfilter import escape_value, user_filter
from smtpproxy.identities.selection import requested_names, select

YAML = """
providers:
- meta: {name: corp-ldap, type: ldap, domain: ldap.relay.test, unique_domain_auth: true}
  params: {server: ldap.test, base_dn: "dc=test", bind_pass: "${LDAP_PASS}"}
- meta: {name: tokens, type: jwt}
  params: {jwks_url: "https://idp.test/keys"}
- meta: {name: apps, type: userpass, fallback: true}
  params: {users: []}
  policy: {allowed_senders: ["@apps.test"], rate_limit_per_min: 5}
- meta: {name: partners, type: http_basic, fallback: true, domain: partners.relay.test}
  params: {url: "https://auth.test/check"}
cache: {seconds: 30, max_entries: 100}
"""


class FileTests(TestCase):
    def test_yaml_with_environment(self) -> None:
        """Providers come out in order with ${VAR} replaced, policy parsed and cache read."""
        parsed = parse(YAML, {"LDAP_PASS": "s3cret"})
        self.assertEqual(
            [p.name for p in parsed.providers], ["corp-ldap", "tokens", "apps", "partners"]
        )
        self.assertEqual(parsed.providers[0].params["bind_pass"], "s3cret")
        self.assertEqual(parsed.providers[0].written["bind_pass"], "${LDAP_PASS}")
        self.assertEqual(parsed.providers[2].policy.rate_limit_per_min, 5)
        self.assertTrue(parsed.providers[2].policy.allowed_senders.allows("a@apps.test"))
        self.assertFalse(parsed.providers[2].policy.allowed_senders.allows("a@other.test"))
        self.assertEqual((parsed.cache_seconds, parsed.cache_max_entries), (30.0, 100))

    def test_json_and_bare_list(self) -> None:
        """JSON (esmtpfa's other format) and a bare list of providers both load."""
        text = '{"providers": [{"meta": {"name": "a", "type": "jwt"}, "params": {}}]}'
        self.assertEqual(parse(text, {}).providers[0].type, "jwt")
        self.assertEqual(
            parse('[{"meta": {"name": "b", "type": "ldap"}}]', {}).providers[0].name, "b"
        )

    def test_missing_variable_names_it(self) -> None:
        """An unset ${VAR} refuses the file with a line naming the variable and where it is."""
        with self.assertRaises(IdentityConfigError) as caught:
            parse(YAML, {})
        self.assertIn("LDAP_PASS", str(caught.exception))
        self.assertIn("corp-ldap", str(caught.exception))

    def test_expand_is_single_pass(self) -> None:
        """A value from the environment is not expanded again; text around a reference stays."""
        self.assertEqual(expand("x-${A}-y", {"A": "${B}"}, "w"), "x-${B}-y")
        with self.assertRaises(IdentityConfigError):
            expand("${A", {"A": "1"}, "w")

    def test_refusals(self) -> None:
        """Each mistake is refused with a line naming it."""
        cases = {
            "[]": "non-empty providers",
            "- meta: {name: a, type: nope}": "meta.type",
            "- meta: {name: a, type: jwt}\n- meta: {name: a, type: jwt}": "used twice",
            "- meta: {name: a, type: jwt, unique_domain_auth: true}": "needs meta.domain",
            "- meta: {name: 'a:b', type: jwt}": "may not hold",
            "- meta: {name: a, type: jwt}\n  extra: 1": "unknown key",
            "- meta: {name: a, type: jwt}\n  policy: {mailbox: nope}": "mailbox",
            "providers: [{meta: {name: a, type: jwt}}]\ncache: {seconds: -1}": "cache.seconds",
            "{{{": "not valid YAML",
        }
        for text, expected in cases.items():
            with self.assertRaises(IdentityConfigError, msg=text) as caught:
                parse(text, {})
            self.assertIn(expected, str(caught.exception), text)


class SelectionTests(TestCase):
    def setUp(self) -> None:
        self.providers = parse(YAML, {"LDAP_PASS": "x"}).providers

    def names(self, attempts: list[Any]) -> list[tuple[str, str, str]]:
        return [(a.provider.name, a.user, a.secret) for a in attempts]

    def test_unique_domain_passes_credentials_as_given(self) -> None:
        """Asking for the unique domain (SNI or EHLO) selects that provider, credentials as
        given."""
        got = select(self.providers, "alice", "pw", requested_names("LDAP.relay.test.", None))
        self.assertEqual(self.names(got), [("corp-ldap", "alice", "pw")])
        got = select(self.providers, "alice", "pw", requested_names(None, "ldap.relay.test"))
        self.assertEqual(self.names(got), [("corp-ldap", "alice", "pw")])

    def test_provider_name_in_user_field(self) -> None:
        """The user field names the provider: user:secret split for user providers, token as is."""
        self.assertEqual(
            self.names(select(self.providers, "apps", "alice:pa:ss", ())),
            [("apps", "alice", "pa:ss")],
        )
        # A provider with a domain answers to its name only on that domain.
        self.assertEqual(
            self.names(select(self.providers, "corp-ldap", "alice:pw", ("ldap.relay.test",))),
            [("corp-ldap", "corp-ldap", "alice:pw")],
        )
        self.assertEqual(
            self.names(select(self.providers, "tokens", "eyJ.a.b", ())), [("tokens", "", "eyJ.a.b")]
        )
        self.assertEqual(select(self.providers, "apps", "no-colon", ()), [])

    def test_fallbacks_in_order_with_domain_filter(self) -> None:
        """Other names go to the fallbacks in file order; one with a domain only when asked
        for it."""
        self.assertEqual(
            self.names(select(self.providers, "bob", "pw", ("relay.test",))),
            [("apps", "bob", "pw")],
        )
        got = select(self.providers, "bob", "pw", ("partners.relay.test",))
        self.assertEqual(self.names(got), [("apps", "bob", "pw"), ("partners", "bob", "pw")])


class LdapFilterTests(TestCase):
    def test_escaping(self) -> None:
        """RFC 4515 specials are escaped, other text (UTF-8 too) stays."""
        self.assertEqual(escape_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a")
        self.assertEqual(escape_value("a\\b\x00"), "a\\5cb\\00")
        self.assertEqual(escape_value("jürgen"), "jürgen")
        self.assertEqual(user_filter("(&(o=p)(uid=%s))", "x*"), "(&(o=p)(uid=x\\2a))")
