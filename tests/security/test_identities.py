"""Security regressions of the identity backends (SEC-074 .. SEC-085)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import smtplib
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpproxy.identities import jose
from smtpproxy.identities.build import backend_for
from smtpproxy.identities.cache import SuccessCache
from smtpproxy.identities.errors import BackendUnavailable, IdentityConfigError
from smtpproxy.identities.fileformat import ProviderEntry, parse
from smtpproxy.identities.router import IdentityChecker
from smtpproxy.identities.userpass import hash_password
from tests.identities import servers
from tests.support import TIMEOUT, async_test, client_tls, in_thread, start_relay


def b64(data: bytes) -> str:
    return servers.b64url(data)


def unsigned(claims: dict[str, object], alg: str = "none") -> str:
    header = b64(json.dumps({"alg": alg, "kid": "r1"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


class JWTAttackTests(TestCase):
    def setUp(self) -> None:
        self.key = servers.rsa_key()
        self.jwks = servers.Jwks({"r1": self.key})
        site = servers.serve_https(self, self.jwks)
        backend: Any = backend_for(
            ProviderEntry(
                "t",
                "jwt",
                {
                    "jwks_url": site.url(),
                    "tls_ca": site.ca_file,
                    "iss": "https://idp.test",
                    "aud": "smtp-relay",
                },
            ),
            reactor,
        )
        self.addCleanup(backend.close)
        self.backend = backend

    async def assert_refused(self, token: str) -> None:
        try:
            await self.backend.check("", token)
        except UnauthorizedLogin:
            return
        self.fail("token accepted")

    @async_test
    async def test_SEC_074_alg_none_refused(self) -> None:
        """An unsigned token (alg none, any capitalisation, with or without a signature part)
        is refused."""
        await self.backend.check("", servers.sign(servers.claims(), self.key, "r1"))  # keys loaded
        for alg in ("none", "None", "NONE", ""):
            await self.assert_refused(unsigned(servers.claims(), alg))
        self.assertRaises(jose.TokenError, jose.parse, unsigned(servers.claims()))

    @async_test
    async def test_SEC_075_hmac_with_the_public_key_refused(self) -> None:
        """Algorithm confusion: an HS256 token whose HMAC secret is the RSA public key (PEM,
        DER or the JWK) fails."""
        public = self.key.public_key()
        for secret in (
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            json.dumps(servers.jwk("r1", self.key)).encode(),
        ):
            for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
                head = b64(json.dumps({"alg": alg, "kid": "r1"}).encode())
                signed = f"{head}.{b64(json.dumps(servers.claims()).encode())}"
                mac = hmac.new(secret, signed.encode(), digest).digest()
                await self.assert_refused(f"{signed}.{b64(mac)}")

    def test_SEC_076_key_type_must_match_the_algorithm(self) -> None:
        """An ES256 header against an RSA key, or RS256 against an EC key, never verifies; keys
        shorter than 2048 bits and symmetric JWKS entries are not used."""
        ec_key = servers.ec_key()
        token = jose.parse(servers.sign(servers.claims(), ec_key, "e1"))
        with self.assertRaises(jose.TokenError):
            jose.verify_signature(token, self.key.public_key())
        token = jose.parse(servers.sign(servers.claims(), self.key, "r1"))
        with self.assertRaises(jose.TokenError):
            jose.verify_signature(token, ec_key.public_key())
        self.assertIsNone(jose.load_jwk({"kty": "oct", "k": "c2VjcmV0"}))

    def test_SEC_082_custom_claims_match_exactly_with_types(self) -> None:
        """A configured claim matches only the same JSON value: true is not 1, "1" is not 1,
        a list containing the value is not the value."""
        expected = jose.Expected("i", "a", claims={"admin": True, "level": 1, "groups": ["mail"]})
        good = {"exp": 2e9, "iss": "i", "aud": "a", "admin": True, "level": 1, "groups": ["mail"]}
        self.assertEqual(jose.check_claims(good, expected, 1e9), "token")
        for change in (
            {"admin": 1},
            {"level": "1"},
            {"level": True},
            {"groups": ["mail", "x"]},
            {"groups": "mail"},
        ):
            with self.assertRaises(jose.TokenError):
                jose.check_claims({**good, **change}, expected, 1e9)


class LDAPAttackTests(TestCase):
    @async_test
    async def test_SEC_077_filter_injection(self) -> None:
        """User names with filter syntax (*, *)(uid=*, a backslash) find no entry: escaped per
        RFC 4515."""
        slapd = servers.start_slapd(self)
        backend = backend_for(ProviderEntry("l", "ldap", servers.ldap_params(slapd)), reactor)
        self.assertEqual((await backend.check("alice", "alice-pw")).user, "alice")
        for user in (
            "*",
            "a*",
            "*)(uid=*",
            "alice)(|(uid=*",
            "*)(objectClass=*))(&(uid=x",
            "al\\69ce",
        ):
            with self.assertRaises(UnauthorizedLogin, msg=user):
                await backend.check(user, "alice-pw")

    @async_test
    async def test_SEC_078_empty_password_is_not_an_anonymous_bind(self) -> None:
        """An empty password is refused before LDAP sees it (a DN with no password binds
        anonymously)."""
        slapd = servers.start_slapd(self)
        backend = backend_for(ProviderEntry("l", "ldap", servers.ldap_params(slapd)), reactor)
        with self.assertRaises(UnauthorizedLogin):
            await backend.check("alice", "")


class BackendDownTests(TestCase):
    @async_test
    async def test_SEC_079_backend_down_is_454_and_not_counted(self) -> None:
        """An identity backend that cannot be reached answers 454 4.7.0, never 535, and the guard
        counts no failure (an outage must not get clients banned)."""
        provider = ProviderEntry(
            "down",
            "http_basic",
            {"url": f"https://localhost:{servers.free_port()}/", "timeout": 2},
            fallback=True,
        )
        checker = IdentityChecker([provider], {"down": backend_for(provider, reactor)}, reactor)
        # Its log summary's timer runs on the real reactor.
        self.addCleanup(checker.log_summary.stop)
        relay = start_relay(self, auth=True)
        relay.factory.portal.registerChecker(checker)

        def attempt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client:
                client.starttls(context=client_tls())
                client.ehlo()
                return client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0user\0pw").decode())

        code, text = await in_thread(attempt)
        self.assertEqual((code, text[:5]), (454, b"4.7.0"))
        self.assertEqual(len(relay.factory.guard.auth_failures), 0)


def plain_auth(port: int, user: str, secret: str) -> tuple[int, bytes]:
    """One session: STARTTLS, AUTH PLAIN; the reply to AUTH."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.starttls(context=client_tls())
        client.ehlo()
        return client.docmd("AUTH", "PLAIN " + b64plain(user, secret))


def b64plain(user: str, secret: str) -> str:
    return base64.b64encode(f"\0{user}\0{secret}".encode()).decode("ascii")


class OneBackendDownTests(TestCase):
    @async_test
    async def test_SEC_121_wrong_password_counts_while_another_backend_is_down(self) -> None:
        """Two fallback providers, the second down.  A wrong password for a user the first one
        holds was really tested: 454 (the down one might have said yes) and counted by the
        guard.  A name the first one does not hold tested nothing (it may be the down
        backend's user): 454 and not counted, so that backend's users are not banned."""
        apps = ProviderEntry(
            "apps",
            "userpass",
            {"users": [{"username": "app", "password_hash": hash_password("app-pw", 4)}]},
            fallback=True,
        )
        down = ProviderEntry(
            "down",
            "http_basic",
            {"url": f"https://localhost:{servers.free_port()}/", "timeout": 2},
            fallback=True,
        )
        backends = {e.name: backend_for(e, reactor) for e in (apps, down)}
        checker = IdentityChecker([apps, down], backends, reactor)
        self.addCleanup(checker.close)
        relay = start_relay(self, auth=True)
        relay.factory.portal.registerChecker(checker)
        failures = relay.factory.guard.auth_failures

        code, text = await in_thread(plain_auth, relay.port, "carol", "carol-pw")
        self.assertEqual((code, text[:5], len(failures)), (454, b"4.7.0", 0))
        code, text = await in_thread(plain_auth, relay.port, "app", "guess")
        self.assertEqual((code, text[:5], len(failures)), (454, b"4.7.0", 1))
        code, _ = await in_thread(plain_auth, relay.port, "app", "app-pw")
        self.assertEqual(code, 235)


class SecretHandlingTests(TestCase):
    @async_test
    async def test_SEC_080_unknown_user_costs_a_bcrypt_too(self) -> None:
        """An unknown user name costs what a wrong password costs: one bcrypt check against a
        hash of the same cost, so timing does not reveal which names exist.  Counted, not
        timed: each check is recorded with the cost of the hash it ran against (a relay that
        answered unknown names at once would record nothing for them)."""
        import bcrypt

        backend = backend_for(
            ProviderEntry(
                "u",
                "userpass",
                {"users": [{"username": "app", "password_hash": hash_password("pw", 8)}]},
            ),
            reactor,
        )
        real = bcrypt.checkpw
        costs: list[bytes] = []

        def recording(password: bytes, hashed: bytes) -> bool:
            costs.append(hashed[:7])
            return real(password, hashed)

        self.patch(bcrypt, "checkpw", recording)
        for user in ("app", "nobody"):
            with self.assertRaises(UnauthorizedLogin):
                await backend.check(user, "wrong")
        self.assertEqual(costs, [b"$2b$08$", b"$2b$08$"])

    def test_SEC_081_no_plaintext_password_in_the_file(self) -> None:
        """A userpass password written into the file is refused; only ${VAR} or a bcrypt hash."""
        entry = parse(
            "- meta: {name: u, type: userpass}\n  params: {username: a, password: hunter2}", {}
        ).providers[0]
        with self.assertRaises(IdentityConfigError) as caught:
            backend_for(entry, reactor)
        self.assertNotIn("hunter2", str(caught.exception))

    def test_SEC_083_cache_holds_no_secret_and_is_bounded(self) -> None:
        """The success cache keys on an HMAC under a per-process key (no password stored), expires,
        and keeps at most max_entries."""
        clock = Clock()
        cache: SuccessCache[str] = SuccessCache(30, 3, clock)
        cache.put("p", "u", "hunter2", "ok")
        self.assertEqual(cache.get("p", "u", "hunter2"), "ok")
        self.assertIsNone(cache.get("p", "u", "hunter3"))
        self.assertNotIn(b"hunter2", b"".join(cache._entries))
        clock.advance(31)
        self.assertIsNone(cache.get("p", "u", "hunter2"))
        for i in range(10):
            cache.put("p", str(i), "s", "ok")
        self.assertEqual(len(cache), 3)

    @async_test
    async def test_SEC_084_http_backend_verifies_tls(self) -> None:
        """An auth endpoint whose certificate is not from the configured CA is never trusted."""
        site = servers.serve_https(self, servers.AuthEndpoint(users={"a": "b"}))
        other = servers.serve_https(self, servers.AuthEndpoint())
        backend: Any = backend_for(
            ProviderEntry("h", "http_basic", {"url": site.url(), "tls_ca": other.ca_file}), reactor
        )
        self.addCleanup(backend.close)
        with self.assertRaises(BackendUnavailable):
            await backend.check("a", "b")
        self.assertEqual(backend.kind, "http_basic")

    def test_SEC_085_missing_variable_refuses_start_without_echoing_values(self) -> None:
        """An unset ${VAR} stops start-up naming the variable; the error never shows other
        values."""
        text = "- meta: {name: l, type: ldap}\n  params: {bind_pass: '${NOPE}', bind_user: 'cn=x'}"
        with self.assertRaises(IdentityConfigError) as caught:
            parse(text, {"OTHER": "s3cret"})
        self.assertIn("NOPE", str(caught.exception))
        self.assertNotIn("s3cret", str(caught.exception))
