"""The access token: request form, response parsing, error classification and the cache."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.providers.graph.credentials import ClientSecret, scope_for
from smtpproxy.providers.graph.tokens import (
    RENEWAL_RETRY_MAX,
    Token,
    TokenCache,
    parse_token,
    renewal_retry_delay,
    token_problem,
    token_url,
)
from tests.providers.graph.test_drafts import _events


def _token_body(value: str = "tok", lifetime: object = 3599) -> bytes:
    return json.dumps(
        {"token_type": "Bearer", "expires_in": lifetime, "access_token": value}
    ).encode()


US = "https://graph.microsoft.us/"


class RequestTests(SynchronousTestCase):
    def test_url(self) -> None:
        """The v2.0 endpoint of the tenant, under the configured authority (sovereign clouds)."""
        self.assertEqual(
            token_url("https://login.microsoftonline.us/", "contoso.onmicrosoft.com"),
            "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token",
        )

    def test_form(self) -> None:
        """A form-encoded client-credentials grant whose scope is the endpoint's .default."""
        secret = ClientSecret("id", "s&cr=t", "https://login.test/t/token", scope_for(US))
        request = secret.token_request(0.0)
        self.assertEqual(
            (request.method, request.url, request.content_type),
            ("POST", "https://login.test/t/token", "application/x-www-form-urlencoded"),
        )
        assert request.body is not None
        form = parse_qs(request.body.decode())
        self.assertEqual(
            form,
            {
                "client_id": ["id"],
                "client_secret": ["s&cr=t"],
                "scope": ["https://graph.microsoft.us/.default"],
                "grant_type": ["client_credentials"],
            },
        )


class ParseTests(SynchronousTestCase):
    def test_lifetime(self) -> None:
        """Renewal is due five minutes before expiry, or at 90% of a short lifetime."""
        token = parse_token(_token_body(lifetime=3599), 1000.0)
        self.assertEqual((token.expires_at, token.refresh_at), (4599.0, 4299.0))
        short = parse_token(_token_body(lifetime="60"), 0.0)
        self.assertEqual((short.expires_at, short.refresh_at), (60.0, 54.0))

    def test_token_never_in_repr(self) -> None:
        """A token's repr leaves the secret value out, so it cannot reach a log line."""
        self.assertNotIn("s3cr3t", repr(parse_token(_token_body("s3cr3t"), 0.0)))

    def test_malformed(self) -> None:
        """Answers without a bearer token or a lifetime are refused."""
        for body in (
            b"{}",
            b"[]",
            json.dumps({"access_token": "t", "expires_in": 0}).encode(),
            json.dumps({"access_token": "t", "expires_in": 60, "token_type": "pop"}).encode(),
        ):
            self.assertRaises(ValueError, parse_token, body, 0.0)


def _oauth_error(error: str, aadsts: int) -> bytes:
    return json.dumps(
        {
            "error": error,
            "error_description": f"AADSTS{aadsts}: Something. Trace ID: t Correlation ID: c",
            "error_codes": [aadsts],
            "trace_id": "trace-1",
            "correlation_id": "corr-1",
        }
    ).encode()


class ProblemTests(SynchronousTestCase):
    def test_misconfiguration_is_451(self) -> None:
        """A wrong secret is the operator's to fix: no retry, a 451, AADSTS details logged."""
        problem = token_problem(401, _oauth_error("invalid_client", 7000215), None)
        self.assertFalse(problem.retryable)
        reply = reply_for_failure(problem.error)
        self.assertEqual((reply.code, reply.status), (451, "4.3.5"))
        self.assertIn("AADSTS7000215", reply.text)
        self.assertEqual(problem.fields["trace_id"], "trace-1")
        self.assertEqual(problem.fields["correlation_id"], "corr-1")
        self.assertIn("GRAPH_CLIENT_SECRET", problem.fields["hint"])

    def test_unknown_tenant(self) -> None:
        """An unknown tenant is configuration too, with a hint naming GRAPH_TENANT_ID."""
        problem = token_problem(400, _oauth_error("invalid_request", 90002), None)
        self.assertFalse(problem.retryable)
        self.assertIn("GRAPH_TENANT_ID", problem.fields["hint"])

    def test_outages_are_retried(self) -> None:
        """Entra's 5xx and 429 are retried, honouring Retry-After; HTML bodies are tolerated."""
        problem = token_problem(503, b"<html>down</html>", 2.0)
        self.assertTrue(problem.retryable)
        self.assertEqual(problem.retry_after, 2.0)
        self.assertEqual(problem.code, "HTTP503")
        self.assertTrue(token_problem(429, b"", None).retryable)


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: list[Deferred[Token]] = []
        self.cache = TokenCache(self.clock, self._fetch)

    def _fetch(self) -> Deferred[Token]:
        d: Deferred[Token] = Deferred()
        self.pending.append(d)
        return d

    def _issue(self, value: str, lifetime: float = 3600.0) -> None:
        now = self.clock.seconds()
        self.pending.pop(0).callback(Token(value, now + lifetime, now + lifetime - 300))

    def test_one_fetch_for_many_waiters(self) -> None:
        """However many callers wait, one request is in flight and all get its token."""
        waiters = [self.cache.get() for _ in range(10)]
        self.assertEqual(len(self.pending), 1)
        self._issue("t1")
        self.assertEqual([self.successResultOf(w) for w in waiters], ["t1"] * 10)
        self.assertEqual(self.cache.fetches, 1)

    def test_cached_until_refresh_time(self) -> None:
        """The token is reused until five minutes before expiry, then renewed in the
        background: callers keep getting the current token at once meanwhile, one renewal
        is in flight however many ask, and its token is used once it arrives."""
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3299)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.assertEqual(self.pending, [])
        self.clock.advance(1)
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.assertEqual((len(self.pending), self.cache.fetches), (1, 2))
        self._issue("t2")
        self.assertEqual(self.successResultOf(self.cache.get()), "t2")
        self.assertEqual(self.cache.fetches, 2)

    def test_waits_only_without_a_valid_token(self) -> None:
        """Once the token has expired (its renewal still under way), callers wait for the
        renewal rather than get a dead token."""
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3400)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.clock.advance(200)
        waiting = self.cache.get()
        self.assertNoResult(waiting)
        self.assertEqual(len(self.pending), 1)
        self._issue("t2")
        self.assertEqual(self.successResultOf(waiting), "t2")

    def test_invalidate_matching_token_only(self) -> None:
        """Refusing an old token does not throw away a newer one."""
        self.cache.get()
        self._issue("t1")
        self.cache.invalidate("t0")
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.cache.invalidate("t1")
        self.cache.invalidate("t1")
        d = self.cache.get()
        self.assertEqual(len(self.pending), 1)
        self._issue("t2")
        self.assertEqual(self.successResultOf(d), "t2")

    def test_failure_reaches_every_waiter(self) -> None:
        """A failed fetch fails everyone waiting; the next caller starts a new fetch."""
        waiters = [self.cache.get() for _ in range(3)]
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        for waiter in waiters:
            self.failureResultOf(waiter, TransientDeliveryError)
        self.cache.get()
        self.assertEqual(len(self.pending), 1)

    def test_failed_renewal_keeps_valid_token(self) -> None:
        """If renewal fails while the old token is still valid, the old token is used,
        and the next background renewal waits out a back-off (5 s, then 10 s) instead
        of starting with the very next caller; once the token has expired, a caller
        fetches at once whatever the back-off, and a failure reaches it.  (Before
        review 6 the next get() started a new renewal at once: one token request per
        message while Entra ID failed.)"""
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3400)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.assertEqual(self.pending, [])
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.clock.advance(9.9)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.assertEqual(self.pending, [])
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(self.cache.get()), "t1")
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.assertEqual(self.cache.fetches, 4)
        self.clock.advance(200)
        expired = self.cache.get()
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.failureResultOf(expired, TransientDeliveryError)

    def test_renewal_back_off_ends_with_a_success(self) -> None:
        """A renewal that succeeds after failures clears the back-off: the next token's
        renewal starts on time, and its first failure waits 5 s again, not the 20 s
        the earlier failures had reached."""
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3300)
        for wait in (5.0, 10.0):
            self.cache.get()
            self.pending.pop(0).errback(TransientDeliveryError("down"))
            self.clock.advance(wait)
        self.cache.get()
        self._issue("t2")
        self.clock.advance(3300)
        self.assertEqual(self.successResultOf(self.cache.get()), "t2")
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.clock.advance(5)
        self.cache.get()
        self.assertEqual(len(self.pending), 1)

    def test_refused_token_is_fetched_despite_the_back_off(self) -> None:
        """A token Graph refused (invalidate) leaves no valid token: the next caller
        waits for a fetch started at once, however recently a renewal failed."""
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3300)
        self.cache.get()
        self.pending.pop(0).errback(TransientDeliveryError("down"))
        self.cache.invalidate("t1")
        waiting = self.cache.get()
        self.assertEqual(len(self.pending), 1)
        self._issue("t2")
        self.assertEqual(self.successResultOf(waiting), "t2")

    def test_one_warning_per_failed_renewal(self) -> None:
        """While renewals fail, the warning is logged once per failed token request,
        not once per caller: 50 callers within the back-off see one warning."""
        events = _events(self)
        self.cache.get()
        self._issue("t1")
        self.clock.advance(3300)
        for _ in range(50):
            self.assertEqual(self.successResultOf(self.cache.get()), "t1")
            if self.pending:
                self.pending.pop(0).errback(TransientDeliveryError("down"))
            self.clock.advance(0.05)
        warnings = [e for e in events if "token renewal failed" in e.get("log_format", "")]
        self.assertEqual((len(warnings), self.cache.fetches), (1, 2))
        self.assertEqual(warnings[0]["retry_in"], 5)

    def test_cancelled_waiter(self) -> None:
        """A caller that stops waiting does not cancel the fetch for the others."""
        first, second = self.cache.get(), self.cache.get()
        first.cancel()
        self.failureResultOf(first)
        self._issue("t1")
        self.assertEqual(self.successResultOf(second), "t1")


class RenewalBackoffTests(SynchronousTestCase):
    def test_schedule(self) -> None:
        """5 s after the first failed renewal, doubling per failure, never above 60 s."""
        delays = [renewal_retry_delay(n) for n in range(1, 8)]
        self.assertEqual(delays, [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0])
        self.assertEqual(renewal_retry_delay(10_000), RENEWAL_RETRY_MAX)
