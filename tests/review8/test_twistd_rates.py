"""Review 8, on the wire: identity defects seen through the real `twistd smtpproxy`.

The relay runs as an operator runs it, with an AUTH_CONFIG whose providers carry
C{policy: {rate_limit_per_min: 1}}; slapd and the HTTPS auth endpoint are the shared
fixtures of L{tests.identities.servers}; the client is smtplib (STARTTLS, AUTH PLAIN).
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
from typing import Any

from twisted.trial.unittest import TestCase

from tests.identities import servers
from tests.identities.test_twistd_identities import login
from tests.review8.test_identities import jwt_params
from tests.support import TIMEOUT, async_test, client_tls, in_thread
from tests.test_twistd import Relay


class IdentityRateOnTheWireTests(TestCase):
    timeout = 120

    @async_test
    async def test_respelling_the_login_resets_the_identitys_rate_limit(self) -> None:
        """One person, one token: the second message within the minute must get C{450 4.7.1}.

        docs/identities.md: C{rate_limit_per_min} is the identity's "own messages a
        minute; beyond: 450 4.7.1".  The identity (and so its rate bucket, and the key of
        C{SMTP_RATE_LIMIT_PER_USER}) is named C{provider/user} with C{user} as the client
        typed it:

          - LDAP compares C{uid} without case (caseIgnoreMatch), so C{ALICE} binds as
            C{uid=alice} but is the identity C{corp/ALICE} (ldapauth.py C{_ask} returns
            C{Verified(user)});
          - an C{http_header} fallback checks only the token and keeps the user name the
            client sent (httpauth.py C{check}: C{user = user or "token"}), so the same
            token as C{x} and as C{y} is C{keys/x} and C{keys/y}.

        Each respelling gets a fresh budget: the relay answers 250 where the policy says
        450.  Correct: the identity is what the backend vouched for (the LDAP entry, the
        token), so the second message of the minute is refused with 450 however the
        login was spelt.
        """
        endpoint = servers.AuthEndpoint(tokens={"tok-1"}, header="X-Api-Key")
        site = servers.serve_https(self, endpoint)
        slapd = servers.start_slapd(self)
        one_a_minute = {"rate_limit_per_min": 1}
        providers: list[dict[str, Any]] = [
            {
                "meta": {"name": "corp", "type": "ldap", "fallback": True},
                "params": servers.ldap_params(slapd),
                "policy": one_a_minute,
            },
            {
                "meta": {"name": "keys", "type": "http_header", "fallback": True},
                "params": {
                    "url": site.url("/check"),
                    "tls_ca": site.ca_file,
                    "header": "X-Api-Key",
                },
                "policy": one_a_minute,
            },
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(self, AUTH_CONFIG=path)

        def scenario() -> tuple[dict[str, tuple[int, str]], bytes]:
            relay.wait_listening()
            port = relay.smtp_port
            results = {
                "alice": login(port, "alice", "alice-pw"),
                "alice again": login(port, "alice", "alice-pw"),
                "ALICE": login(port, "ALICE", "alice-pw"),
                "token as x": login(port, "x", "tok-1"),
                "token as x again": login(port, "x", "tok-1"),
                "token as y": login(port, "y", "tok-1"),
            }
            _, err = relay.stop()
            return results, err

        results, err = await in_thread(scenario)
        self.assertEqual(
            results,
            {
                "alice": (235, "sent"),
                # The same spelling again: the limit works (this part passes today).
                "alice again": (235, "sender refused 450"),
                "ALICE": (235, "sender refused 450"),
                "token as x": (235, "sent"),
                "token as x again": (235, "sender refused 450"),
                "token as y": (235, "sender refused 450"),
            },
            err.decode()[-3000:],
        )


class NestedTokenOnTheWireTests(TestCase):
    timeout = 120

    @async_test
    async def test_nested_json_token_gets_454_and_a_traceback_not_535(self) -> None:
        """A crafted token is answered 454 with a traceback in the log, and never counted.

        The token's header is JSON nested 3,000 levels deep (8 KB, well inside the 16 KB a
        token may have and the 12,288-octet AUTH line).  C{jose.parse} lets CPython's
        C{RecursionError} escape (it catches C{ValueError} only), so the login fails with
        an unexpected exception: logins.py C{failed} logs "authentication error" with a
        traceback and answers C{454 4.7.0}, which the brute-force guard does not count.
        Five such attempts on one connection get five 454s and five tracebacks; a
        client can go on without end.  Common rules: bad input gets a clear SMTP reply,
        never a traceback.  Correct: a token that does not parse is a refusal,
        C{535 5.7.8}, counted like any wrong credential.
        """
        key = servers.rsa_key()
        jwks = servers.serve_https(self, servers.Jwks({"k1": key}))
        providers = [
            {
                "meta": {"name": "tokens", "type": "jwt"},
                "params": jwt_params(jwks),
            }
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(self, AUTH_CONFIG=path, SMTP_AUTH_MAX_FAILURES="10")
        nested = '{"alg": "RS256", "x": ' + "[" * 3000 + "]" * 3000 + "}"
        token = ".".join(
            (servers.b64url(nested.encode()), servers.b64url(b"{}"), servers.b64url(b"s"))
        )
        plain = base64.b64encode(b"\x00tokens\x00" + token.encode()).decode()

        def scenario() -> tuple[list[int], bytes]:
            relay.wait_listening()
            codes = []
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                client.ehlo("client.test")
                client.starttls(context=client_tls())
                client.ehlo("client.test")
                for _ in range(5):
                    code, _ = client.docmd("AUTH", f"PLAIN {plain}")
                    codes.append(code)
            _, err = relay.stop()
            return codes, err

        codes, err = await in_thread(scenario)
        self.assertNotIn(b"Traceback", err, "a crafted token put a traceback in the log")
        self.assertEqual(codes, [535] * 5, err.decode()[-3000:])
