"""Review 8 fixes: the parts the reviewer's tests do not reach, without sockets."""

from __future__ import annotations

import hashlib

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.identities import jose
from smtpproxy.identities.cache import SuccessCache
from smtpproxy.identities.errors import BackendUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.httpauth import HTTPBackend
from smtpproxy.identities.ldapauth import canonical_name, user_attribute
from smtpproxy.identities.ldapfilter import MAX_USER_CHARS
from smtpproxy.identities.model import Identity, Verified
from tests.identities import servers
from tests.identities.test_outcomes import Scripted, checker, login


class Broken:
    """A backend with a bug: C{check} raises before any Deferred exists."""

    name = "broken"

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        raise KeyError("a bug, with the secret " + secret)


class RouterSafetyNetTests(SynchronousTestCase):
    def test_unexpected_backend_exception_is_unavailable_and_fallbacks_are_asked(self) -> None:
        """A backend raising an unexpected exception does not end the login with that
        exception (a 454 with a traceback in the session): the router asks the next
        fallback, and if none says yes the outcome is BackendUnavailable naming only the
        exception's class, never its text (which may hold the secret)."""
        good = Scripted("apps", Verified("app"))
        outcome = login(self, checker(Broken(), good))
        self.assertIsInstance(outcome, Identity)
        self.assertEqual(good.asked, ["app"])
        alone = login(self, checker(Broken()))
        self.assertIs(type(alone), BackendUnavailable)
        assert isinstance(alone, BackendUnavailable)
        self.assertEqual(alone.reason, "unexpected error: KeyError")
        self.assertNotIn("guess", alone.reason)


class JWKUseTests(SynchronousTestCase):
    def test_key_ops_without_verify_and_foreign_alg_are_not_loaded(self) -> None:
        """A JWK whose key_ops lacks "verify" (or is not a list), or whose alg is one we
        never accept, is no verification key; one with key_ops ["verify"] keeps its alg."""
        jwk = servers.jwk("r1", servers.rsa_key())
        self.assertIsNone(jose.load_jwk({**jwk, "key_ops": ["encrypt"]}))
        self.assertIsNone(jose.load_jwk({**jwk, "key_ops": "verify"}))
        self.assertIsNone(jose.load_jwk({**jwk, "alg": "HS256"}))
        loaded = jose.load_jwk({**jwk, "key_ops": ["verify"], "alg": "RS384"})
        assert loaded is not None
        self.assertEqual(loaded.alg, "RS384")


class SuccessCacheUntilTests(SynchronousTestCase):
    def test_entry_lasts_until_the_earlier_of_seconds_and_until(self) -> None:
        """A yes with an end of its own (a token's exp + leeway) is kept only until that
        end when it comes before the cache's seconds; one already past is not kept; one
        without an end keeps the full time."""
        clock = Clock()
        cache: SuccessCache[str] = SuccessCache(3600, 10, clock)
        cache.put("p", "u", "short", "a", until=60)
        cache.put("p", "u", "past", "b", until=0)
        cache.put("p", "u", "plain", "c")
        self.assertEqual(len(cache), 2)
        clock.advance(59)
        self.assertEqual(cache.get("p", "u", "short"), "a")
        clock.advance(1)
        self.assertIsNone(cache.get("p", "u", "short"))
        self.assertIsNone(cache.get("p", "u", "past"))
        clock.advance(3000)
        self.assertEqual(cache.get("p", "u", "plain"), "c")


class LDAPNameTests(SynchronousTestCase):
    def test_user_attribute_is_the_one_the_filter_compares(self) -> None:
        """The attribute compared with the user name for equality is the one asked for;
        none when two different attributes are compared or only under "!"."""
        self.assertEqual(user_attribute("(&(objectClass=person)(uid=%s))"), "uid")
        self.assertEqual(user_attribute("(sAMAccountName=%s)"), "sAMAccountName")
        self.assertEqual((user_attribute("(|(uid=%s)(UID=%s))") or "").lower(), "uid")
        self.assertIsNone(user_attribute("(|(uid=%s)(mail=%s))"))
        self.assertIsNone(user_attribute("(&(objectClass=person)(!(uid=%s))(cn=x))"))

    def test_canonical_name_is_the_stored_value_bounded(self) -> None:
        """A single stored value names the user whatever the spelling typed; of several,
        the one the typed name matches ignoring case and extra spaces; a value too long or
        not printable is never a name (None: the caller falls back to the DN)."""
        self.assertEqual(canonical_name(["alice"], "ALICE"), "alice")
        self.assertEqual(canonical_name(["Alice Smith", "as"], "alice  smith "), "Alice Smith")
        self.assertIsNone(canonical_name(["a", "b"], "c"))
        self.assertIsNone(canonical_name(["x" * (MAX_USER_CHARS + 1)], "x"))
        self.assertIsNone(canonical_name(["ali\nce"], "alice"))
        self.assertIsNone(canonical_name([], "alice"))


class TokenNameTests(SynchronousTestCase):
    def test_each_token_is_its_own_identity_and_the_name_hides_it(self) -> None:
        """An http_header identity is named after a keyed hash of the token: the same
        token gives the same name, two tokens two names (two rate budgets), and the name
        holds neither the token nor an unkeyed hash of it."""
        entry = ProviderEntry(
            name="keys",
            type="http_header",
            params={"url": "https://auth.test/check", "header": "X-Api-Key"},
        )
        backend = HTTPBackend(entry, Clock())
        first = backend.token_name("tok-1")
        self.assertEqual(backend.token_name("tok-1"), first)
        self.assertNotEqual(backend.token_name("tok-2"), first)
        self.assertNotIn("tok-1", first)
        plain = hashlib.sha256(b"tok-1").hexdigest()[:16]
        self.assertNotEqual(first, "token-" + plain)
