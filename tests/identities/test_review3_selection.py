"""Review 3: identity selection on the wire, against the real twistd process.

Brute-force limits are only worth something if every wrong password
counts.  These tests use two C{fallback} providers, one of them down, and
smtplib with STARTTLS and AUTH PLAIN.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib

from twisted.trial.unittest import TestCase

from smtpproxy.identities.userpass import hash_password
from tests.identities import servers
from tests.support import TIMEOUT, async_test, client_tls, in_thread
from tests.test_twistd import Relay


def auth_code(port: int, user: str, secret: str) -> int:
    """One session: STARTTLS, AUTH PLAIN; the reply code to AUTH (or to the connection)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.ehlo("client.test")
            client.starttls(context=client_tls())
            client.ehlo("client.test")
            try:
                code, _ = client.docmd("AUTH", "PLAIN " + _plain(user, secret))
            except smtplib.SMTPServerDisconnected:
                return 0
            return code
    except smtplib.SMTPServerDisconnected:
        return 0
    except smtplib.SMTPConnectError as e:
        return e.smtp_code


def _plain(user: str, secret: str) -> str:
    return base64.b64encode(f"\0{user}\0{secret}".encode()).decode("ascii")


class BruteForceWithABackendDownTests(TestCase):
    @async_test
    async def test_wrong_passwords_count_while_another_fallback_is_down(self) -> None:
        """With a second fallback provider down, a wrong password for a user the
        first provider knows (and refuses) hears 454 and is never counted: an
        address can guess without limit, and the right guess still gets 235.
        Past SMTP_AUTH_BAN_FAILURES wrong passwords the address must be blocked."""
        providers = [
            {
                "meta": {"name": "apps", "type": "userpass", "fallback": True},
                "params": {
                    "users": [{"username": "app", "password_hash": hash_password("app-pw", 4)}]
                },
            },
            {
                "meta": {"name": "down", "type": "http_basic", "fallback": True},
                "params": {"url": f"https://localhost:{servers.free_port()}/", "timeout": 2},
            },
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(
            self,
            AUTH_CONFIG=path,
            SMTP_AUTH_MAX_FAILURES="3",
            SMTP_AUTH_BAN_FAILURES="5",
            SMTP_AUTH_BAN_TIME="600",
        )

        def scenario() -> tuple[list[int], int]:
            relay.wait_listening()
            port = relay.smtp_port
            guesses = [auth_code(port, "app", f"guess-{n}") for n in range(12)]
            right = auth_code(port, "app", "app-pw")
            relay.stop()
            return guesses, right

        guesses, right = await in_thread(scenario)
        # Some answer past the fifth wrong password must be a block (421, or the
        # connection refused/closed); and the right password must not get in then.
        self.assertTrue(
            any(code in (0, 421) for code in guesses[5:]) and right != 235,
            f"answers to 12 wrong passwords: {guesses}; then the right one: {right}",
        )


class KeyRotationTests(TestCase):
    @async_test
    async def test_a_token_of_a_new_key_is_not_a_wrong_password(self) -> None:
        """The identity provider rotates its keys: the JWKS now holds k1 and k2, and
        a client presents a valid token signed with k2, shortly after the relay last
        fetched the set (which held only k1).  The relay may not refetch yet (it waits
        60 s between fetches), so it cannot know whether the token is good: that is
        454 (try later), never 535, which the guard counts and which bans a client
        that did nothing wrong.  Today it is 535 until the next fetch is allowed."""
        key1, key2 = servers.rsa_key(), servers.rsa_key()
        jwks = servers.Jwks({"k1": key1})
        site = servers.serve_https(self, jwks)
        providers = [
            {
                "meta": {"name": "tokens", "type": "jwt"},
                "params": {
                    "jwks_url": site.url("/keys"),
                    "tls_ca": site.ca_file,
                    "iss": "https://idp.test",
                    "aud": "smtp-relay",
                },
            }
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(self, AUTH_CONFIG=path)
        old = servers.sign(servers.claims(), key1, "k1")
        new = servers.sign(servers.claims(), key2, "k2")

        def scenario() -> tuple[int, int, int]:
            relay.wait_listening()
            port = relay.smtp_port
            before = auth_code(port, "tokens", old)
            jwks.keys["k2"] = key2
            rotated = [auth_code(port, "tokens", new) for _ in range(2)]
            relay.stop()
            return before, rotated[0], rotated[1]

        before, first, second = await in_thread(scenario)
        self.assertEqual(before, 235)
        self.assertNotIn(
            535,
            (first, second),
            f"answers to a valid k2 token: {first}, {second}; JWKS fetches: {jwks.fetches}",
        )
