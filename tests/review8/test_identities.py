"""Review 8: defects in the identity backends (issue 15), each proved against a real server.

Every test here fails on the code as reviewed and states what correct
behaviour is.  The servers (slapd, the HTTPS auth endpoint, the JWKS) are
the shared fixtures of L{tests.identities.servers}; the code under test is
the real backend and the real router (L{IdentityChecker}) that the relay's
portal uses, and the real per-identity rate counter (L{IdentityRates})
that L{smtpproxy.identities.realm.PolicedDelivery} asks on every C{MAIL}.
"""

from __future__ import annotations

import json
import time
from typing import Any

import bcrypt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.cred import credentials, error
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from smtpproxy.identities.build import backend_for
from smtpproxy.identities.errors import BackendUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.jwtauth import JWTBackend
from smtpproxy.identities.model import Backend, Identity
from smtpproxy.identities.router import IdentityChecker
from smtpproxy.identities.userpass import UserpassBackend
from smtpproxy.policy.identity import IdentityPolicy, IdentityRates
from tests.identities import servers
from tests.support import async_test

ONE_A_MINUTE = IdentityPolicy(rate_limit_per_min=1)


def provider(kind: str, params: dict[str, Any], policy: IdentityPolicy) -> ProviderEntry:
    """A fallback provider named C{p} with C{policy}, as the identity file would give it."""
    return ProviderEntry(
        name="p", type=kind, params=params, fallback=True, policy=policy, written=params
    )


def jwt_params(site: servers.HTTPS, **changes: Any) -> dict[str, Any]:
    """A C{jwt} provider's params: the key set at C{site}, the claims L{servers.claims} makes."""
    return {
        "jwks_url": site.url("/keys"),
        "tls_ca": site.ca_file,
        "iss": "https://idp.test",
        "aud": "smtp-relay",
        **changes,
    }


def router(case: TestCase, entry: ProviderEntry, clock: Any = None, cache: float = 0.0) -> Any:
    """The portal's checker over the real backend of C{entry}; closed when the test ends."""
    backend: Backend = backend_for(entry, reactor)
    checker = IdentityChecker([entry], {entry.name: backend}, clock or Clock(), cache)
    case.addCleanup(checker.close)
    return checker


async def log_in(checker: IdentityChecker, user: str, password: str) -> Identity:
    identity = await checker.requestAvatarId(
        credentials.UsernamePassword(user.encode(), password.encode())
    )
    assert isinstance(identity, Identity)
    return identity


class PerIdentityRateLimitTests(TestCase):
    """C{rate_limit_per_min} is "its own messages a minute" (docs/identities.md); the limit
    is counted under L{Identity.name}, so that name must not depend on how the client
    chose to spell its login."""

    @async_test
    async def test_ldap_user_name_case_variants_escape_the_rate_limit(self) -> None:
        """An LDAP user gets a fresh rate budget per spelling of its user name.

        The directory compares C{uid} case-insensitively and ignoring insignificant
        spaces (caseIgnoreMatch, RFC 4517 4.2.11), so C{alice}, C{ALICE} and C{Alice }
        all find and bind as the same entry C{uid=alice,...}.  LDAPBackend returns
        C{Verified(user)} with the client's spelling (ldapauth.py, end of C{_ask}), so
        the identity is C{p/alice}, C{p/ALICE}, C{p/Alice }: three rate buckets for one
        person, and C{SMTP_RATE_LIMIT_PER_USER} (keyed the same way) is bypassed too, as
        is every log line meant to attribute mail to a user.  Correct: one entry is one
        identity, named canonically (the entry's DN, or its C{uid} value as stored), so
        the second message within the minute is refused whatever the spelling.
        """
        slapd = servers.start_slapd(self)
        checker = router(self, provider("ldap", servers.ldap_params(slapd), ONE_A_MINUTE))
        rates = IdentityRates(Clock())
        allowed = []
        for spelling in ("alice", "ALICE", "Alice "):
            identity = await log_in(checker, spelling, "alice-pw")
            allowed.append(rates.allow(identity.name, identity.policy))
        self.assertEqual(
            allowed,
            [True, False, False],
            "one LDAP entry must be one identity with one rate budget, whatever the spelling",
        )

    @async_test
    async def test_http_header_fallback_takes_the_identity_name_from_the_client(self) -> None:
        """With C{http_header} as a fallback, the client's SMTP user name becomes the identity.

        The endpoint checks only the token; HTTPBackend.check keeps C{user = user or
        "token"} (httpauth.py) and returns C{Verified(user)}, so whatever user name the
        client typed next to a valid token becomes C{p/<that name>}.  One token holder
        therefore gets a fresh C{rate_limit_per_min} budget per invented user name, and
        can appear in the logs and on queued messages as any user it likes (C{p/scanner}).
        Correct: the identity of a token login does not come from an unchecked field, so
        two logins with the same token are the same identity and share one budget (or a
        user name the endpoint never saw is refused).
        """
        endpoint = servers.AuthEndpoint(tokens={"tok-1"}, header="X-Api-Key")
        site = servers.serve_https(self, endpoint)
        params = {"url": site.url("/check"), "tls_ca": site.ca_file, "header": "X-Api-Key"}
        checker = router(self, provider("http_header", params, ONE_A_MINUTE))
        rates = IdentityRates(Clock())
        allowed = []
        for invented in ("first", "second", "scanner"):
            try:
                identity = await log_in(checker, invented, "tok-1")
            except error.UnauthorizedLogin:
                continue  # refusing a user name the endpoint cannot vouch for is a fix too
            allowed.append(rates.allow(identity.name, identity.policy))
        self.assertLessEqual(
            allowed.count(True),
            1,
            "the same token must be the same identity, whatever user name came with it",
        )


class JWTTests(TestCase):
    def setUp(self) -> None:
        self.key = servers.rsa_key()
        self.jwks = servers.Jwks({"r1": self.key})
        self.site = servers.serve_https(self, self.jwks)
        self.params = jwt_params(self.site)

    @async_test
    async def test_cached_success_outlives_the_tokens_expiry(self) -> None:
        """A JWT keeps working after its C{exp} for as long as the success cache keeps it.

        RFC 7519 4.1.4: a token MUST NOT be accepted on or after its expiration time
        (allowing a small leeway).  The router caches a yes for C{cache.seconds} (up to
        3600) keyed on (provider, user, token) and answers from the cache before the
        backend is asked (router.py C{_try}: C{self.cache.get(...)} then C{return
        cached}); nothing bounds the entry's life by the token's C{exp}.  So a token
        that expired 5 minutes ago (leeway 30 s) is still accepted.  The docs only
        concede that a *revoked* credential lives on in the cache; an expired token is
        not revoked, it is invalid by its own content.  Correct: a cached yes for a
        token lasts no longer than its C{exp} plus leeway (or tokens are re-checked).
        """
        clock = Clock()
        clock.advance(time.time())
        entry = provider("jwt", self.params, ONE_A_MINUTE)
        backend = JWTBackend(entry, reactor, clock)
        checker = IdentityChecker([entry], {"p": backend}, clock, cache_seconds=3600)
        self.addCleanup(checker.close)
        token = servers.sign(
            servers.claims(exp=int(clock.seconds()) + 10, iat=int(clock.seconds())),
            self.key,
            "r1",
        )
        self.assertEqual((await log_in(checker, "p", token)).user, "scanner-01")
        clock.advance(10 + 300)
        # Without the cache the backend itself refuses it: the token is expired.
        with self.assertRaises(error.UnauthorizedLogin):
            await backend.check("", token)
        outcome: object
        try:
            outcome = await log_in(checker, "p", token)
        except error.UnauthorizedLogin as e:
            outcome = e
        self.assertIsInstance(
            outcome, error.UnauthorizedLogin, "a token 5 minutes past its exp was accepted"
        )

    @async_test
    async def test_deeply_nested_token_json_is_an_error_not_a_refusal(self) -> None:
        """A token whose header is deeply nested JSON escapes as RecursionError, not a refusal.

        C{jose.parse} catches only C{ValueError} from C{json.loads} (jose.py
        C{_json_object}); CPython's decoder raises C{RecursionError} past ~1000 levels,
        well within C{MAX_TOKEN_CHARS} (16,384).  C{JWTBackend.check} calls C{parse}
        outside any Deferred and catches only C{TokenError}, so the router's login fails
        with RecursionError: the session (logins.py C{failed}) logs a traceback
        ("authentication error") and answers C{454} -- not counted by the brute-force
        limits, so a client can repeat it without end, each time a traceback in the log,
        and the later fallback providers are never asked.  Correct: malformed input is a
        plain refusal (C{UnauthorizedLogin} -> C{535 5.7.8}, counted), as for any other
        token that does not parse.
        """
        checker = router(self, provider("jwt", self.params, ONE_A_MINUTE))
        nested = '{"alg": "RS256", "x": ' + "[" * 3000 + "]" * 3000 + "}"
        header = servers.b64url(nested.encode())
        token = f"{header}.{servers.b64url(b'{}')}.{servers.b64url(b'sig')}"
        self.assertLess(len(token), 16_384)
        outcome: object
        try:
            outcome = await log_in(checker, "p", token)
        except Exception as e:
            outcome = e
        self.assertIsInstance(outcome, error.UnauthorizedLogin)
        self.assertEqual(self.jwks.fetches, 0)


class EndlessKeySet(Resource):
    """A key-set URL whose answer never ends: 64 KiB of JSON whitespace every 10 ms.

    C{written} counts the bytes handed to the connection; C{closed} is set when the
    client goes away.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closed = False
        self.requests: list[Request] = []

    def stop(self) -> None:
        """End every answer still streaming (test clean-up)."""
        self.closed = True
        for request in self.requests:
            transport: Any = request.transport
            if transport is not None:
                transport.abortConnection()

    def render_GET(self, request: Request) -> object:
        request.setHeader("content-type", "application/json")
        request.write(b'{"keys": [')
        chunk = b" " * 65536

        def more() -> None:
            if not self.closed:
                request.write(chunk)
                self.written += len(chunk)
                reactor.callLater(0.01, more)

        def gone(_: object) -> None:
            self.closed = True

        request.notifyFinish().addBoth(gone)
        self.requests.append(request)
        more()
        return NOT_DONE_YET


class KeySetSizeTests(TestCase):
    @async_test
    async def test_key_set_body_is_read_without_bound(self) -> None:
        """The JWKS answer is buffered whole before its 1 MB limit is looked at.

        jwtauth.py C{_fetch}: C{body = await response.content()} collects the entire body
        in memory, and only then compares C{len(body)} with C{MAX_JWKS_BYTES}.  An answer
        that keeps coming (a misbehaving or compromised identity provider, a proxy in
        front of it serving something else) is held in memory until the fetch's
        C{timeout} (up to 120 s), so the bound the module and docs state ("key set
        larger than 1 MB" is refused) is no bound on memory (common rules: every buffer
        bounded).  Correct: stop reading and drop the connection once more than
        C{MAX_JWKS_BYTES} have arrived, answering "key set larger than 1 MB" at once;
        here the endpoint has sent about 11 MB when the 2 s timeout fires instead, and the
        answer is a timeout.
        """
        endless = EndlessKeySet()
        site = servers.serve_https(self, endless)
        self.addCleanup(servers.wait, 0.05)
        self.addCleanup(endless.stop)
        params = jwt_params(site, timeout=2)
        backend = JWTBackend(provider("jwt", params, ONE_A_MINUTE), reactor)
        self.addCleanup(backend.close)
        token = servers.sign(servers.claims(), servers.rsa_key(), "r1")
        outcome: object
        try:
            outcome = await backend.check("", token)
        except BackendUnavailable as e:
            outcome = e
        self.assertIsInstance(outcome, BackendUnavailable)
        assert isinstance(outcome, BackendUnavailable)
        self.assertIn("larger than 1 MB", outcome.reason)
        self.assertLess(endless.written, 4 * 1024 * 1024, "read far past the 1 MB bound")


class JWKAlgorithmTests(TestCase):
    @async_test
    async def test_a_keys_declared_alg_is_not_enforced(self) -> None:
        """A token may use any algorithm with a key the JWKS pins to one algorithm.

        RFC 8725 3.1: "each key MUST be used with exactly one algorithm, and this MUST be
        checked when the cryptographic operation occurs"; RFC 7517 4.4: C{alg} in a JWK
        names the algorithm intended for use with the key.  jose.py C{load_jwk} drops the
        JWK's C{alg} (and C{key_ops}), and C{verify_signature} only checks the key *type*,
        so with a key published as C{"alg": "RS256"} a PS256 token made with the same
        key is accepted -- the cross-algorithm use that RFC 8725 3.1 exists to rule out.
        Correct: when a JWK names C{alg}, a token whose header names another algorithm is
        refused (C{UnauthorizedLogin}).
        """
        key = servers.rsa_key()
        pinned = {**servers.jwk("r1", key), "alg": "RS256", "use": "sig"}

        class PinnedKeySet(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                request.setHeader("content-type", "application/json")
                return json.dumps({"keys": [pinned]}).encode()

        site = servers.serve_https(self, PinnedKeySet())
        params = jwt_params(site)
        backend = JWTBackend(provider("jwt", params, ONE_A_MINUTE), reactor)
        self.addCleanup(backend.close)
        # The declared algorithm works: the key set and the claims are right.
        rs256 = servers.sign(servers.claims(), key, "r1")
        self.assertEqual((await backend.check("", rs256)).user, "scanner-01")
        header = servers.b64url(json.dumps({"alg": "PS256", "kid": "r1"}).encode())
        payload = servers.b64url(json.dumps(servers.claims()).encode())
        signed = f"{header}.{payload}".encode()
        signature = key.sign(
            signed,
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        )
        ps256 = f"{signed.decode()}.{servers.b64url(signature)}"
        outcome: object
        try:
            outcome = await backend.check("", ps256)
        except error.UnauthorizedLogin as e:
            outcome = e
        self.assertIsInstance(
            outcome, error.UnauthorizedLogin, "a PS256 token passed with a key pinned to RS256"
        )


class UserpassLongPasswordTests(TestCase):
    @async_test
    async def test_password_over_72_bytes_matches_an_empty_password_hash(self) -> None:
        """Any password longer than 72 bytes logs in to an account whose hash is of "".

        docs/identities.md: "Passwords longer than 72 bytes (bcrypt's limit) are refused,
        not truncated."  userpass.py C{check} does not refuse them: it replaces the
        password with C{b""} and still asks bcrypt (to keep the timing), then accepts
        when bcrypt says yes and the *original* secret is non-empty.  For a user whose
        C{password_hash} is a bcrypt hash of the empty password (a hash made by another
        tool, htpasswd -B or an esmtpfa migration; C{smtpproxy passwd} refuses to make
        one, but the file accepts any C{$2b$} hash), the empty password itself is refused
        while C{"x" * 100} is accepted.  Correct: a password over 72 bytes is refused
        whatever the stored hash (hash it against the dummy hash for the timing, and
        answer no).
        """
        empty = bcrypt.hashpw(b"", bcrypt.gensalt(4)).decode("ascii")
        entry = provider(
            "userpass", {"users": [{"username": "kiosk", "password_hash": empty}]}, ONE_A_MINUTE
        )
        backend = UserpassBackend(entry, reactor)
        self.addCleanup(backend.close)
        with self.assertRaises(error.UnauthorizedLogin):
            await backend.check("kiosk", "")
        outcome: object
        try:
            outcome = await backend.check("kiosk", "x" * 100)
        except error.UnauthorizedLogin as e:
            outcome = e
        self.assertIsInstance(outcome, error.UnauthorizedLogin, "a 100-byte password was accepted")
