"""End to end: `twistd smtpproxy` with AUTH_CONFIG, every backend type, smtplib AUTH.

The relay runs as an operator runs it; the identity servers (an HTTPS
auth endpoint, a JWKS, slapd) are real and started by the test; the
client is smtplib with STARTTLS and AUTH PLAIN or LOGIN.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import time
from typing import Any

from twisted.trial.unittest import TestCase

from smtpproxy.identities.userpass import hash_password
from tests.identities import servers
from tests.support import TIMEOUT, async_test, client_tls, in_thread, message
from tests.test_twistd import Relay, json_lines

LATENCIES: dict[str, list[float]] = {}


def login(
    port: int,
    user: str,
    secret: str,
    *,
    host: str = "127.0.0.1",
    mechanism: str = "PLAIN",
    sender: str = "a@apps.test",
) -> tuple[int, str]:
    """STARTTLS, AUTH, one message; the AUTH reply code (or the refusal's), and what happened."""
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.starttls(context=client_tls())
        client.ehlo("client.test")
        started = time.perf_counter()
        try:
            if mechanism == "LOGIN":
                client.user, client.password = user, secret
                code, _ = client.auth("LOGIN", client.auth_login)
            else:
                code, _ = client.login(user, secret)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, "auth refused"
        LATENCIES.setdefault(user, []).append(time.perf_counter() - started)
        try:
            client.sendmail(sender, ["b@example.org"], message(f"via {user}"))
        except smtplib.SMTPRecipientsRefused:
            return code, "recipient refused"
        except smtplib.SMTPSenderRefused as e:
            return code, f"sender refused {e.smtp_code}"
        return code, "sent"


class TwistdIdentitiesTests(TestCase):
    @async_test
    async def test_every_backend_through_twistd(self) -> None:
        """Each backend type logs in through the real relay (PLAIN and LOGIN), the SNI name selects
        a unique-domain provider, policy refuses a sender, a down backend answers 454."""
        endpoint = servers.AuthEndpoint(users={"alice": "pw"}, tokens={"tok-1"}, header="X-Api-Key")
        site = servers.serve_https(self, endpoint)
        key = servers.rsa_key()
        jwks = servers.serve_https(self, servers.Jwks({"k1": key}))
        slapd = servers.start_slapd(self)
        token = servers.sign(servers.claims(), key, "k1")
        providers = [
            {
                "meta": {"name": "apps", "type": "userpass", "fallback": True},
                "params": {
                    "users": [{"username": "app", "password_hash": hash_password("app-pw", 4)}]
                },
                "policy": {"allowed_senders": ["@apps.test"]},
            },
            {
                "meta": {"name": "partners", "type": "http_basic"},
                "params": {"url": site.url("/check"), "tls_ca": site.ca_file},
            },
            {
                "meta": {"name": "apikeys", "type": "http_header"},
                "params": {
                    "url": site.url("/check"),
                    "tls_ca": site.ca_file,
                    "header": "X-Api-Key",
                },
            },
            {
                "meta": {"name": "tokens", "type": "jwt"},
                "params": {
                    "jwks_url": jwks.url("/keys"),
                    "tls_ca": jwks.ca_file,
                    "iss": "https://idp.test",
                    "aud": "smtp-relay",
                },
            },
            {
                "meta": {"name": "corp", "type": "ldap"},
                "params": {**servers.ldap_params(slapd), "bind_pass": "${LDAP_SERVICE_PW}"},
            },
            {
                "meta": {
                    "name": "corp-sni",
                    "type": "ldap",
                    "domain": "localhost",
                    "unique_domain_auth": True,
                },
                "params": servers.ldap_params(slapd, "ldaps"),
            },
            {
                "meta": {"name": "down", "type": "http_basic"},
                "params": {"url": f"https://localhost:{servers.free_port()}/", "timeout": 2},
            },
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers, "cache": {"seconds": 30}}, f)
        relay = Relay(
            self,
            AUTH_CONFIG=path,
            LDAP_SERVICE_PW=servers.ADMIN_PASSWORD,
            SMTP_USERNAME="legacy",
            SMTP_PASSWORD="legacy-pw",
        )

        def scenario() -> tuple[dict[str, Any], bytes, bytes]:
            relay.wait_listening()
            port = relay.smtp_port
            results: dict[str, Any] = {
                "userpass by name": login(port, "apps", "app:app-pw"),
                "userpass plain LOGIN": login(port, "app", "app-pw", mechanism="LOGIN"),
                "userpass wrong": login(port, "app", "nope"),
                "http_basic": login(port, "partners", "alice:pw", mechanism="LOGIN"),
                "http_header": login(port, "apikeys", "tok-1"),
                "jwt": login(port, "tokens", token),
                "ldap": login(port, "corp", "bob:bob-pw"),
                "ldap sni": login(port, "alice", "alice-pw", host="localhost"),
                "ldap without sni": login(port, "alice", "alice-pw"),
                "policy": login(port, "app", "app-pw", sender="x@elsewhere.test"),
                "down": login(port, "down", "a:b"),
                "legacy": login(port, "legacy", "legacy-pw", sender="z@other.test"),
            }
            # Cached: the second login of the same credentials skips the backend.
            before = len(endpoint.requests)
            results["http_basic again"] = login(port, "partners", "alice:pw")
            results["cache hits"] = len(endpoint.requests) - before
            out, err = relay.stop()
            return results, out, err

        results, out, err = await in_thread(scenario)
        expected = {
            "userpass by name": (235, "sent"),
            "userpass plain LOGIN": (235, "sent"),
            "userpass wrong": (535, "auth refused"),
            "http_basic": (235, "sent"),
            "http_header": (235, "sent"),
            "jwt": (235, "sent"),
            "ldap": (235, "sent"),
            "ldap sni": (235, "sent"),
            "ldap without sni": (535, "auth refused"),
            "policy": (235, "sender refused 550"),
            "down": (454, "auth refused"),
            "legacy": (235, "sent"),
            "http_basic again": (235, "sent"),
            "cache hits": 0,
        }
        self.assertEqual(results, expected, err.decode()[-3000:])
        events = json_lines(err)
        users = {e.get("username") for e in events if e.get("msg") == "authenticated"}
        self.assertLessEqual(
            {
                "apps/app",
                "partners/alice",
                "tokens/scanner-01",
                "corp/bob",
                "corp-sni/alice",
                "legacy",
            },
            users,
        )
        down = [e for e in events if e.get("msg") == "identity backend unavailable"]
        # smtplib tries PLAIN, then LOGIN: one line per attempt, each naming the provider.
        self.assertEqual({e["provider"] for e in down}, {"down"}, down)
        for secret in (
            b"app-pw",
            b"alice-pw",
            b"tok-1",
            token.encode(),
            servers.ADMIN_PASSWORD.encode(),
        ):
            self.assertNotIn(secret, err)
        self.assertIn(b"via tokens", out)
        for user, times in sorted(LATENCIES.items()):
            print(f"AUTH latency {user}: {min(times) * 1000:.1f} ms")


class DeferredFloodTests(TestCase):
    @async_test
    async def test_SEC_124_jwks_down_auth_flood_log_bounded(self) -> None:
        """SEC-124 on the wire: 1,000 AUTH PLAIN attempts with invented-key tokens against
        a JWT identity whose JWKS endpoint is down all get 454 4.7.0, and twistd's log holds
        one "authentication deferred" and one "identity backend unavailable" line with the
        client, provider and reason, plus summary lines whose counts add up to 1,000 (written
        at the latest when twistd stops), never the token; before SEC-124 it held 2,000."""
        token = servers.sign(servers.claims(), servers.rsa_key(), "invented-kid")
        providers = [
            {
                "meta": {"name": "tokens", "type": "jwt", "fallback": True},
                "params": {
                    "jwks_url": f"http://127.0.0.1:{servers.free_port()}/keys",
                    "iss": "https://idp.test",
                    "aud": "smtp-relay",
                },
            }
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(self, AUTH_CONFIG=path)
        plain = base64.b64encode(f"\0scanner\0{token}".encode()).decode("ascii")
        sessions, per_session = 20, 50

        def scenario() -> tuple[list[int], bytes]:
            relay.wait_listening()
            codes = []
            for _ in range(sessions):
                with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                    client.ehlo("client.test")
                    client.starttls(context=client_tls())
                    client.ehlo("client.test")
                    for _ in range(per_session):
                        codes.append(client.docmd("AUTH", "PLAIN " + plain)[0])
            _, err = relay.stop()
            return codes, err

        codes, err = await in_thread(scenario)
        self.assertEqual(set(codes), {454}, err.decode()[-3000:])
        self.assertEqual(len(codes), sessions * per_session)
        self.assertNotIn(token.encode(), err)
        self.assertNotIn(token.split(".")[2].encode(), err)
        events = json_lines(err)
        for msg in ("authentication deferred", "identity backend unavailable"):
            (first,) = [e for e in events if e.get("msg") == msg]
            self.assertEqual((first["client"], first["provider"]), ("127.0.0.1", "tokens"))
            self.assertIn("key set", first["reason"])
            repeats = [e for e in events if e.get("msg") == f"{msg} (repeated)"]
            self.assertLessEqual(len(repeats), 3, repeats)
            self.assertEqual(1 + sum(e["count"] for e in repeats), sessions * per_session)
        warnings = [e for e in events if e.get("level") == "warn"]
        self.assertLess(len(warnings), 20, warnings)


class ShutdownTests(TestCase):
    @async_test
    async def test_sigterm_closes_auth_endpoint_connections(self) -> None:
        """SIGTERM closes an http_basic backend's kept-alive connection properly (TLS
        close_notify, so the endpoint sees a clean end) before twistd exits; without the
        close at stop the connection would only vanish with the process (an OpenSSL EOF)."""
        from twisted.internet.error import ConnectionDone

        endpoint = servers.AuthEndpoint(users={"alice": "pw"})
        site = servers.ClosingSite(endpoint)
        https = servers.serve_https(self, endpoint, site=site)
        providers = [
            {
                "meta": {"name": "partners", "type": "http_basic", "fallback": True},
                "params": {"url": https.url("/check"), "tls_ca": https.ca_file},
            }
        ]
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump({"providers": providers}, f)
        relay = Relay(self, AUTH_CONFIG=path)

        def scenario() -> tuple[tuple[int, str], int, int, bytes]:
            relay.wait_listening()
            result = login(relay.smtp_port, "alice", "pw")
            # The pool keeps the connection open after the check.
            kept, ended = site.opened, len(site.ends)
            _, err = relay.stop()
            return result, kept, ended, err

        result, kept, ended_before, err = await in_thread(scenario)
        self.assertEqual((result, kept, ended_before), ((235, "sent"), 1, 0), err.decode())
        deadline = time.monotonic() + TIMEOUT
        while not site.ends and time.monotonic() < deadline:
            await servers.wait(0.05)
        self.assertEqual(site.ends, [ConnectionDone], err.decode()[-2000:])
