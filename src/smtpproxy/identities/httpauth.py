"""The C{http_basic} and C{http_header} backends: an HTTP endpoint decides.

C{http_basic} sends the user name and password as HTTP Basic
credentials; C{http_header} sends the client's token in the configured
header.  A status in C{success_codes} (default 200) is a yes; 401 and 403
(and any other 4xx except 408 and 429) a no; anything else (5xx, 408,
429, a timeout, a refused connection, a certificate that does not
verify) means the endpoint could not answer: L{BackendUnavailable}.
HTTPS is verified (certificate and host name); plain HTTP only to
localhost.

An C{http_header} endpoint vouches for the token only, so the identity
is never named after the user name the client sent with it (one token
holder could appear as anyone, with a fresh rate budget per name, and a
secret typed into that field would be logged).  It is named after the
token instead: C{token-} and a keyed hash of it (HMAC-SHA256 under a key
made when the backend starts and never stored, 16 hex digits), so each
token is one identity with its own budget and the log shows no token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from treq.client import HTTPClient
from twisted.cred import error
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from smtpproxy.identities.errors import BackendUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.model import Verified
from smtpproxy.identities.params import Params
from smtpproxy.identities.tlsclient import http_policy

_METHODS = ("GET", "POST", "HEAD")
_TEMPORARY = frozenset({408, 429})
MAX_TOKEN_CHARS = 16_384


def make_client(reactor: object, ca_file: str, where: str) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client with verified TLS and a small persistent pool (closed by C{close})."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(reactor, contextFactory=http_policy(ca_file, where), pool=pool)
    return HTTPClient(agent), pool


class HTTPBackend:
    """One HTTP endpoint; C{kind} is C{"http_basic"} or C{"http_header"}."""

    def __init__(self, entry: ProviderEntry, reactor: IReactorTime) -> None:
        known = ["url", "method", "success_codes", "timeout", "tls_ca"]
        if entry.type == "http_header":
            known.append("header")
        p = Params(entry.name, entry.params, known)
        self.name = entry.name
        self.kind = entry.type
        self.url = p.url("url")
        self.method = p.text("method", "GET").upper()
        if self.method not in _METHODS:
            raise p.error("method", f"one of {', '.join(_METHODS)}")
        self.success = p.codes("success_codes")
        self.timeout = p.number("timeout", 10.0, 0.1, 120.0)
        self.header = p.text("header") if entry.type == "http_header" else ""
        if self.header and not all(c.isalnum() or c == "-" for c in self.header):
            raise p.error("header", f"{self.header!r} is not an HTTP header name")
        self._reactor = reactor
        self._name_key = os.urandom(32)
        self._client, self._pool = make_client(reactor, p.file("tls_ca"), p.where + ".tls_ca")

    def close(self) -> defer.Deferred[None]:
        """Close the kept-alive connections (at shutdown)."""
        closing: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closing

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        if self.kind == "http_basic":
            if not user or ":" in user or not secret:
                return defer.fail(error.UnauthorizedLogin("no user name or password"))
            pair = f"{user}:{secret}".encode()
            headers: dict[str | bytes, str | bytes] = {
                "Authorization": "Basic " + base64.b64encode(pair).decode("ascii")
            }
        else:
            token = secret
            # A header value cannot hold line breaks; such a token is no token.
            if not token or len(token) > MAX_TOKEN_CHARS or any(c in token for c in "\r\n\x00"):
                return defer.fail(error.UnauthorizedLogin("no usable token"))
            headers = {self.header: token}
            user = self.token_name(token)
        asking = defer.Deferred.fromCoroutine(self._ask(headers, user))
        return asking.addTimeout(self.timeout, self._reactor, self._timed_out)

    def token_name(self, token: str) -> str:
        """The identity's user for C{token}: stable for this process, reveals nothing of it."""
        digest = hmac.new(self._name_key, token.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return "token-" + digest.hexdigest()[:16]

    def _timed_out(self, result: Verified | Failure, timeout: float) -> Verified | Failure:
        raise BackendUnavailable(self.name, f"no answer within {timeout:g} s")

    async def _ask(self, headers: dict[str | bytes, str | bytes], user: str) -> Verified:
        try:
            response = await self._client.request(
                self.method, self.url, headers=headers, allow_redirects=False
            )
            # Read (and drop) the body so the connection can be reused.
            await response.collect(lambda chunk: None)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise BackendUnavailable(self.name, f"request failed: {_describe(e)}") from None
        code = response.code
        if code in self.success:
            return Verified(user)
        if 400 <= code < 500 and code not in _TEMPORARY:
            raise error.UnauthorizedLogin(f"endpoint answered {code}")
        raise BackendUnavailable(self.name, f"endpoint answered {code}")


def _describe(e: Exception) -> str:
    """A short reason for the log: the exception's class and first reason."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        first = reasons[0]
        inner = getattr(first, "value", first)
        return f"{type(e).__name__}: {type(inner).__name__}: {str(inner)[:200]}"
    return f"{type(e).__name__}: {str(e)[:200]}"
