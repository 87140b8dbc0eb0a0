"""Each identity backend against a real server started by the test.

userpass runs bcrypt in the reactor's thread pool; http_basic and
http_header ask a twisted.web endpoint over verified TLS; jwt fetches a
JWKS from one; ldap talks to Debian's slapd (StartTLS and LDAPS).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpproxy.identities.build import backend_for
from smtpproxy.identities.errors import BackendUnavailable, IdentityConfigError, NoSuchUser
from smtpproxy.identities.fileformat import ProviderEntry, parse
from smtpproxy.identities.jwtauth import JWTBackend
from smtpproxy.identities.userpass import hash_password
from tests.identities import servers
from tests.support import async_test

HASH = hash_password("right-pw", rounds=4)


def entry(kind: str, params: dict[str, Any], name: str = "p", **written: Any) -> ProviderEntry:
    return ProviderEntry(name=name, type=kind, params=params, written=written or params)


def make(case: TestCase, provider: ProviderEntry) -> Any:
    """The backend for C{provider}; its kept-alive connections closed when the test ends."""
    backend = backend_for(provider, reactor)
    close = getattr(backend, "close", None)
    if close is not None:
        case.addCleanup(close)
    return backend


async def refused(case: TestCase, backend: Any, user: str, secret: str) -> UnauthorizedLogin:
    try:
        await backend.check(user, secret)
    except UnauthorizedLogin as e:
        return e
    case.fail(f"{user!r} was not refused")


async def unavailable(case: TestCase, backend: Any, user: str, secret: str) -> BackendUnavailable:
    try:
        await backend.check(user, secret)
    except BackendUnavailable as e:
        return e
    case.fail("no BackendUnavailable")


class UserpassTests(TestCase):
    @async_test
    async def test_hashes_and_single_pair(self) -> None:
        """Listed bcrypt users log in, wrong or unknown ones do not; the single pair must come
        from the environment."""
        backend = backend_for(
            entry("userpass", {"users": [{"username": "app", "password_hash": HASH}]}), reactor
        )
        self.assertEqual((await backend.check("app", "right-pw")).user, "app")
        # A wrong password tested a secret; an unknown name did not (NoSuchUser).
        self.assertNotIsInstance(await refused(self, backend, "app", "wrong"), NoSuchUser)
        self.assertIsInstance(await refused(self, backend, "nobody", "right-pw"), NoSuchUser)
        await refused(self, backend, "app", "")
        single = parse(
            "- meta: {name: u, type: userpass}\n  params: {username: app, password: '${PW}'}",
            {"PW": "env-pw"},
        ).providers[0]
        backend = backend_for(single, reactor)
        self.assertEqual((await backend.check("app", "env-pw")).user, "app")
        await refused(self, backend, "app", "env-pw2")

    def test_plaintext_refused(self) -> None:
        """A password written into the file, or a users entry without a bcrypt hash, stops
        start-up."""
        literal = parse(
            "- meta: {name: u, type: userpass}\n  params: {username: a, password: pw}", {}
        )
        self.assertRaises(IdentityConfigError, backend_for, literal.providers[0], reactor)
        plain = entry("userpass", {"users": [{"username": "a", "password": "pw"}]})
        with self.assertRaises(IdentityConfigError) as caught:
            backend_for(plain, reactor)
        self.assertIn("smtpproxy passwd", str(caught.exception))
        bad = entry("userpass", {"users": [{"username": "a", "password_hash": "md5:abc"}]})
        self.assertRaises(IdentityConfigError, backend_for, bad, reactor)

    @async_test
    async def test_bcrypt_does_not_block_the_reactor(self) -> None:
        """While a cost-12 bcrypt check runs, the reactor keeps turning (it runs in a thread)."""
        costly = hash_password("pw", rounds=12)
        backend = backend_for(
            entry("userpass", {"users": [{"username": "a", "password_hash": costly}]}), reactor
        )
        ticks: list[float] = []
        done: list[bool] = []

        def tick() -> None:
            ticks.append(time.monotonic())
            if not done:
                reactor.callLater(0.01, tick)

        started = time.monotonic()
        reactor.callLater(0, tick)
        await backend.check("a", "pw")
        done.append(True)
        await servers.wait(0.02)
        took = time.monotonic() - started
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        self.assertGreater(took, 0.05)
        self.assertGreater(len(ticks), 3)
        self.assertLess(max(gaps), took * 0.75)


class HTTPTests(TestCase):
    @async_test
    async def test_basic_and_header(self) -> None:
        """200 is a yes, 401 a no, 503 or a hang is 'unavailable', all over verified TLS."""
        endpoint = servers.AuthEndpoint(users={"alice": "pw"}, tokens={"tok-1"}, header="X-Api-Key")
        site = servers.serve_https(self, endpoint)
        basic = make(
            self,
            entry("http_basic", {"url": site.url("/check"), "tls_ca": site.ca_file, "timeout": 1}),
        )
        self.assertEqual((await basic.check("alice", "pw")).user, "alice")
        await refused(self, basic, "alice", "nope")
        header = make(
            self,
            entry(
                "http_header",
                {
                    "url": site.url(),
                    "tls_ca": site.ca_file,
                    "header": "X-Api-Key",
                    "method": "POST",
                },
            ),
        )
        # Named after the token (a keyed hash), never after the user name sent with it.
        named = (await header.check("", "tok-1")).user
        self.assertRegex(named, "^token-[0-9a-f]{16}$")
        self.assertEqual((await header.check("someone", "tok-1")).user, named)
        await refused(self, header, "", "tok-2")
        self.assertEqual(endpoint.requests[-1], "POST")
        endpoint.status = 503
        error = await unavailable(self, basic, "alice", "pw")
        self.assertIn("503", error.reason)
        endpoint.status, endpoint.hold = None, True
        error = await unavailable(self, basic, "alice", "pw")
        self.assertIn("no answer", error.reason)

    @async_test
    async def test_unverified_certificate_is_unavailable(self) -> None:
        """A server whose certificate our CA did not sign is never asked: unavailable, not a yes."""
        site = servers.serve_https(self, servers.AuthEndpoint(users={"a": "b"}))
        other = servers.serve_https(self, servers.AuthEndpoint())
        basic = make(self, entry("http_basic", {"url": site.url(), "tls_ca": other.ca_file}))
        error = await unavailable(self, basic, "a", "b")
        self.assertIn("request failed", error.reason)

    def test_plain_http_only_to_localhost(self) -> None:
        """http:// is refused for remote hosts (credentials would travel in clear)."""
        self.assertRaises(
            IdentityConfigError,
            backend_for,
            entry("http_basic", {"url": "http://auth.test/"}),
            reactor,
        )
        make(self, entry("http_basic", {"url": "http://127.0.0.1:9/"}))


class JWTTests(TestCase):
    def setUp(self) -> None:
        self.rsa, self.ec = servers.rsa_key(), servers.ec_key()
        self.jwks = servers.Jwks({"r1": self.rsa, "e1": self.ec})
        self.site = servers.serve_https(self, self.jwks)
        self.params = {
            "jwks_url": self.site.url("/keys"),
            "tls_ca": self.site.ca_file,
            "iss": "https://idp.test",
            "aud": "smtp-relay",
            "claims": {"role": "mailer"},
        }

    @async_test
    async def test_valid_tokens_and_claims(self) -> None:
        """RS256 and ES256 tokens with the right claims pass (the user is sub); wrong claims,
        expiry or another key fail."""
        backend = make(self, entry("jwt", self.params))
        self.assertEqual(
            (await backend.check("", servers.sign(servers.claims(), self.rsa, "r1"))).user,
            "scanner-01",
        )
        self.assertEqual(
            (await backend.check("", servers.sign(servers.claims(), self.ec, "e1"))).user,
            "scanner-01",
        )
        now = int(time.time())
        for bad in (
            servers.claims(aud="other"),
            servers.claims(iss="https://evil.test"),
            servers.claims(role="admin"),
            servers.claims(role=["mailer"]),
            servers.claims(exp=now - 120),
            servers.claims(nbf=now + 120),
            servers.claims(exp=None),
        ):
            await refused(self, backend, "", servers.sign(bad, self.rsa, "r1"))
        await refused(self, backend, "", servers.sign(servers.claims(), servers.rsa_key(), "r1"))
        await refused(self, backend, "", "not.a.token")

    @async_test
    async def test_unknown_kid_refetches_at_most_once_a_minute(self) -> None:
        """A rotated key is found by a refetch; a flood of unknown key ids costs at most one
        fetch a minute.  Between fetches an unknown key id is 'cannot check now'
        (BackendUnavailable), not a refusal: it may be a key the provider just added."""
        clock = Clock()
        clock.advance(time.time())
        backend = JWTBackend(entry("jwt", self.params), reactor, clock)
        self.addCleanup(backend.close)
        await backend.check("", servers.sign(servers.claims(), self.rsa, "r1"))
        self.assertEqual(self.jwks.fetches, 1)
        for i in range(5):
            await unavailable(self, backend, "", servers.sign(servers.claims(), self.rsa, f"x{i}"))
        self.assertEqual(self.jwks.fetches, 1)
        clock.advance(61)
        # The first one fetches, finds no y0 in the fresh set: a refusal.
        await refused(self, backend, "", servers.sign(servers.claims(), self.rsa, "y0"))
        for i in range(1, 5):
            await unavailable(self, backend, "", servers.sign(servers.claims(), self.rsa, f"y{i}"))
        self.assertEqual(self.jwks.fetches, 2)
        rotated = servers.rsa_key()
        self.jwks.keys["r2"] = rotated
        token = servers.sign(servers.claims(), rotated, "r2")
        await unavailable(self, backend, "", token)
        self.assertEqual(self.jwks.fetches, 2)
        clock.advance(61)
        self.assertEqual((await backend.check("", token)).user, "scanner-01")
        self.assertEqual(self.jwks.fetches, 3)

    @async_test
    async def test_unknown_kid_after_a_failed_refetch_is_unavailable(self) -> None:
        """The refetch an unknown key id causes fails (the JWKS answers 500): the relay still
        holds its old set but cannot tell whether the new id is good, so 'try later'; a token
        of a key it holds still passes, and once the fetch works the new key does too."""
        clock = Clock()
        clock.advance(time.time())
        backend = JWTBackend(entry("jwt", self.params), reactor, clock)
        self.addCleanup(backend.close)
        await backend.check("", servers.sign(servers.claims(), self.rsa, "r1"))
        rotated = servers.rsa_key()
        self.jwks.keys["r2"] = rotated
        self.jwks.status = 500
        clock.advance(61)
        token = servers.sign(servers.claims(), rotated, "r2")
        await unavailable(self, backend, "", token)
        self.assertEqual(self.jwks.fetches, 2)
        old = servers.sign(servers.claims(), self.rsa, "r1")
        self.assertEqual((await backend.check("", old)).user, "scanner-01")
        self.jwks.status = 200
        clock.advance(61)
        self.assertEqual((await backend.check("", token)).user, "scanner-01")
        self.assertEqual(self.jwks.fetches, 3)

    @async_test
    async def test_jwks_down_is_unavailable(self) -> None:
        """No key set (the JWKS answers 500) is 'try later', not a refusal."""
        self.jwks.status = 500
        backend = make(self, entry("jwt", self.params))
        await unavailable(self, backend, "", servers.sign(servers.claims(), self.rsa, "r1"))


class LDAPTests(TestCase):
    @async_test
    async def test_starttls_and_ldaps(self) -> None:
        """Users from the LDIF bind with their password over StartTLS and over LDAPS."""
        slapd = servers.start_slapd(self)
        for mode in ("starttls", "ldaps"):
            backend = make(self, entry("ldap", servers.ldap_params(slapd, mode)))
            self.assertEqual((await backend.check("alice", "alice-pw")).user, "alice")
            # Only the router tells these apart (see test_outcomes).
            self.assertNotIsInstance(await refused(self, backend, "alice", "bob-pw"), NoSuchUser)
            self.assertIsInstance(await refused(self, backend, "nobody", "x"), NoSuchUser)
            await refused(self, backend, "alice", "")

    @async_test
    async def test_service_bind_or_server_down_is_unavailable(self) -> None:
        """A wrong service password or a stopped server: unavailable, never a refusal."""
        slapd = servers.start_slapd(self)
        wrong = make(self, entry("ldap", servers.ldap_params(slapd, bind_pass="bad")))
        error = await unavailable(self, wrong, "alice", "alice-pw")
        self.assertIn("search failed", error.reason)
        slapd.process.terminate()
        slapd.process.wait(10)
        down = make(self, entry("ldap", servers.ldap_params(slapd)))
        error = await unavailable(self, down, "alice", "alice-pw")
        self.assertIn("cannot connect", error.reason)
