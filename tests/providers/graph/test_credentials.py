"""Credentials, the proxy settings and the one-credential rule, without sockets."""

from __future__ import annotations

from urllib.parse import parse_qs

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import ConfigError, load
from smtpproxy.providers.graph.credentials import (
    CredentialError,
    ManagedIdentity,
    client_assertion,
    load_certificate,
)
from smtpproxy.providers.graph.proxyconfig import parse_no_proxy, parse_proxy
from smtpproxy.providers.graph.settings import GraphSettings
from tests.fakegraph import check_assertion, client_certificate

AUDIENCE = "https://login.microsoftonline.com/t-1/oauth2/v2.0/token"
BASE = {"GRAPH_TENANT_ID": "t-1", "GRAPH_CLIENT_ID": "c-1", "GRAPH_SENDER": "r@contoso.example"}


def _load(env: dict[str, str]) -> GraphSettings:
    return GraphSettings.from_config(load(env, fqdn=lambda: "relay.test"))


class AssertionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        pem, cert = client_certificate()
        with open(self.path, "wb") as f:
            f.write(pem)
        self.cert = x509.load_pem_x509_certificate(cert)

    def test_fake_accepts_what_microsoft_documents(self) -> None:
        """The assertion passes the fake's independent check (PS256 signature against the
        certificate, x5t#S256, aud, iss = sub, GUID jti, ten-minute validity)."""
        loaded = load_certificate(self.path, None)
        token = client_assertion(
            loaded, "c-1", AUDIENCE, 1_700_000_000.0, "0" * 8 + "-0000-0000-0000-" + "0" * 12
        )
        self.assertIsNone(
            check_assertion(token, self.cert, "c-1", AUDIENCE, 1_700_000_000.0, set())
        )

    def test_fake_refuses_what_is_wrong(self) -> None:
        """Another audience, another client, an expired or replayed assertion, a tampered
        signature: each refused (so the test above can fail)."""
        loaded = load_certificate(self.path, None)
        jti = "12345678-1234-1234-1234-123456789abc"
        now = 1_700_000_000.0
        token = client_assertion(loaded, "c-1", AUDIENCE, now, jti)
        self.assertIsNotNone(check_assertion(token, self.cert, "c-1", AUDIENCE + "x", now, set()))
        self.assertIsNotNone(check_assertion(token, self.cert, "c-2", AUDIENCE, now, set()))
        self.assertIsNotNone(check_assertion(token, self.cert, "c-1", AUDIENCE, now + 3600, set()))
        self.assertIsNotNone(check_assertion(token, self.cert, "c-1", AUDIENCE, now, {jti}))
        head, claims, signature = token.split(".")
        forged = f"{head}.{claims}.{'A' * len(signature)}"
        self.assertEqual(check_assertion(forged, self.cert, "c-1", AUDIENCE, now, set())[0], 700027)  # type: ignore[index]

    def test_unusable_files(self) -> None:
        """No file, no key, an encrypted key without password, a wrong password, a key of
        another certificate: each a one-line reason that quotes no secret."""
        cert_only = self.mktemp()
        _, cert = client_certificate()
        with open(cert_only, "wb") as f:
            f.write(cert)
        encrypted = self.mktemp()
        with open(encrypted, "wb") as f:
            f.write(client_certificate(password=b"hunter2")[0])
        mixed = self.mktemp()
        with open(mixed, "wb") as f:
            f.write(cert + client_certificate("other")[0].split(b"-----END CERTIFICATE-----\n")[1])
        cases = [
            (self.mktemp(), None, "cannot read"),
            (cert_only, None, "no private key"),
            (encrypted, None, "GRAPH_CLIENT_CERTIFICATE_PASSWORD"),
            (encrypted, "wrong-pass", "password is wrong"),
            (mixed, None, "does not belong"),
        ]
        for path, password, expected in cases:
            with self.assertRaises(CredentialError) as caught:
                load_certificate(path, password)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("wrong-pass", str(caught.exception))


class ManagedIdentityTests(SynchronousTestCase):
    def test_requests(self) -> None:
        """IMDS: GET with Metadata: true, api-version 2018-02-01, Graph as resource, the
        client id when user-assigned; App Service: its own URL, header and version."""
        imds = ManagedIdentity("https://graph.microsoft.com", "http://169.254.169.254/t", "c-9")
        request = imds.token_request(0.0)
        self.assertEqual((request.method, request.headers), ("GET", {"Metadata": "true"}))
        self.assertEqual(
            parse_qs(request.url.split("?", 1)[1]),
            {
                "resource": ["https://graph.microsoft.com"],
                "client_id": ["c-9"],
                "api-version": ["2018-02-01"],
            },
        )
        app = ManagedIdentity(
            "https://graph.microsoft.com", "http://x/t", "", "http://127.0.0.1:41/msi", "h"
        )
        request = app.token_request(0.0)
        self.assertTrue(request.url.startswith("http://127.0.0.1:41/msi?"))
        self.assertIn("api-version=2019-08-01", request.url)
        self.assertEqual(request.headers, {"X-IDENTITY-HEADER": "h"})


class ProxySettingsTests(SynchronousTestCase):
    def test_proxy_url(self) -> None:
        """user:password (percent-decoded) becomes Basic credentials; a scheme-less value is
        http; https:// and socks proxies are refused without echoing the value."""
        proxy = parse_proxy("http://us%40er:p%3Ass@proxy.corp:3128")
        self.assertEqual((proxy.host, proxy.port), ("proxy.corp", 3128))
        self.assertEqual(proxy.authorization, b"Basic dXNAZXI6cDpzcw==")
        self.assertEqual(parse_proxy("proxy.corp").port, 80)
        for bad in (
            "socks5://u:secret@h:1",
            "https://u:secret@h:1",
            "http://u:secret@h:x",
            "http://h/path",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_proxy(bad)
            self.assertNotIn("secret", str(caught.exception))

    def test_no_proxy(self) -> None:
        """Domains cover their subdomains with or without a dot; addresses and CIDR blocks
        match addresses only; ports restrict; loopback is not special; * is everything."""
        rules = parse_no_proxy(".corp.example, graph.microsoft.us:443, 10.0.0.0/8, ::1")
        self.assertTrue(rules.bypasses("corp.example", 443))
        self.assertTrue(rules.bypasses("a.b.corp.example", 443))
        self.assertFalse(rules.bypasses("xcorp.example", 443))
        self.assertTrue(rules.bypasses("GRAPH.microsoft.us", 443))
        self.assertFalse(rules.bypasses("graph.microsoft.us", 8443))
        self.assertTrue(rules.bypasses("10.2.3.4", 443))
        self.assertTrue(rules.bypasses("[::1]", 443))
        self.assertFalse(rules.bypasses("127.0.0.1", 443))
        self.assertFalse(rules.bypasses("localhost", 443))
        self.assertFalse(parse_no_proxy("").bypasses("graph.microsoft.com", 443))
        self.assertTrue(parse_no_proxy("x, *").bypasses("graph.microsoft.com", 443))
        with self.assertRaises(ValueError):
            parse_no_proxy("bad/host name!")

    def test_no_proxy_brackets(self) -> None:
        """A bracketed IPv6 entry is an address, a block when a prefix length follows (with
        or without a port); an unclosed bracket, junk after it, a name or IPv4 inside it,
        or an empty port stop start-up with a message naming the setting and the entry."""
        rules = parse_no_proxy("[fd00::]/8, [2001:db8::1], [2001:db8::2]:8443, [fe80::]/10:443")
        self.assertTrue(rules.bypasses("fd12::1", 443))
        self.assertTrue(rules.bypasses("[fdff:ffff::1]", 80))
        self.assertFalse(rules.bypasses("fe00::1", 443))
        self.assertTrue(rules.bypasses("2001:db8::1", 1))
        self.assertTrue(rules.bypasses("2001:db8::2", 8443))
        self.assertFalse(rules.bypasses("2001:db8::2", 443))
        self.assertTrue(rules.bypasses("fe80::1", 443))
        self.assertFalse(rules.bypasses("fe80::1", 80))
        for bad in (
            "[fd00::]junk",
            "[fd00::",
            "[fd00::]/8x",
            "[fd00::]/",
            "[fd00::]/200",
            "[fd00::]:",
            "[example.com]",
            "[10.0.0.1]",
            "[fd00::]]",
            "[fd00::]/\u0668",
            "[fd00::]:\u0664\u0664\u0663",
        ):
            with self.assertRaises(ValueError) as caught:
                parse_no_proxy(f"corp.example, {bad}")
            self.assertIn(repr(bad), str(caught.exception))
        with self.assertRaises(ConfigError) as start:
            load({**BASE, "GRAPH_CLIENT_SECRET": "s", "NO_PROXY": "[fd00::]junk"})
        self.assertIn("NO_PROXY", str(start.exception))
        self.assertIn("only ':port' or '/prefix-length' may follow", str(start.exception))

    def test_lower_case_forms(self) -> None:
        """https_proxy and no_proxy are read too; both forms set differently is refused."""
        settings = _load(
            {**BASE, "GRAPH_CLIENT_SECRET": "s", "https_proxy": "http://p:1", "no_proxy": "x"}
        )
        self.assertEqual((settings.https_proxy, settings.no_proxy), ("http://p:1", "x"))
        with self.assertRaises(ConfigError) as caught:
            load({"HTTPS_PROXY": "http://u:pw1@p:1", "https_proxy": "http://u:pw2@p:1"})
        self.assertNotIn("pw", str(caught.exception))


class OneCredentialTests(SynchronousTestCase):
    def test_exactly_one(self) -> None:
        """None or several credentials stop start-up with one line naming them."""

        def error(env: dict[str, str]) -> str:
            with self.assertRaises(ConfigError) as caught:
                load(env, fqdn=lambda: "relay.test")
            return str(caught.exception)

        self.assertIn("has no credential", error(BASE))
        several = error({**BASE, "GRAPH_CLIENT_SECRET": "s", "GRAPH_MANAGED_IDENTITY": "true"})
        self.assertIn("several Graph credentials", several)
        self.assertNotIn("\n", several)
        self.assertIn(
            "GRAPH_CLIENT_ID",
            error(
                {
                    "GRAPH_SENDER": "r@c.example",
                    "GRAPH_MANAGED_IDENTITY": "1",
                    "GRAPH_CLIENT_ID": "c",
                }
            ),
        )
        self.assertIn(
            "GRAPH_CLIENT_CERTIFICATE_FILE",
            error({**BASE, "GRAPH_CLIENT_CERTIFICATE_FILE": "/nonexistent.pem"}),
        )
        self.assertIn(
            "GRAPH_TENANT_ID",
            error(
                {
                    "GRAPH_SENDER": "r@c.example",
                    "AZURE_FEDERATED_TOKEN_FILE": "/t",
                    "GRAPH_CLIENT_ID": "c",
                }
            ),
        )

    def test_azure_variables(self) -> None:
        """With the federated token, AZURE_CLIENT_ID/TENANT_ID/AUTHORITY_HOST stand in for
        unset GRAPH_* ones; the AZURE_* variables alone do not select Graph."""
        env = {
            "GRAPH_SENDER": "r@contoso.example",
            "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
            "AZURE_CLIENT_ID": "c-az",
            "AZURE_TENANT_ID": "t-az",
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.us/",
        }
        settings = _load(env)
        self.assertEqual(settings.credential, "AZURE_FEDERATED_TOKEN_FILE")
        self.assertEqual(
            (settings.tenant_id, settings.client_id, settings.authority_host),
            ("t-az", "c-az", "https://login.microsoftonline.us"),
        )
        alone = {k: v for k, v in env.items() if k != "GRAPH_SENDER"}
        self.assertEqual(load(alone, fqdn=lambda: "relay.test").provider, "stdout")
