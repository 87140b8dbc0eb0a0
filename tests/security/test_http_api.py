"""Security regression suite: the HTTP submission API (SEC-096 to SEC-115).

Every test talks real HTTP (treq) to the API mounted on a real loopback
site, or starts the real twistd; the recording provider stands where the
backend would be and proves that a refused request delivered nothing.
docs/security.md maps each control to its test.
"""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.policy.rules import parse_address_patterns, parse_networks
from smtpproxy.web.api.keys import KeyRing
from tests.support import async_test, in_thread
from tests.test_twistd import run_twistd
from tests.web.api.harness import (
    DISABLED_SECRET,
    OTHER_SECRET,
    SECRET,
    ApiServer,
    LogCapture,
    key,
    message,
)

RAW = b"From: app@example.com\r\nSubject: raw\r\n\r\nraw body\r\n"
RAW_QUERY = "?from=app@example.com&to=rcpt@example.org"


class KeyTests(TestCase):
    def keyed(self) -> ApiServer:
        return ApiServer(
            self,
            keys=(key(), key("other", OTHER_SECRET), key("old", DISABLED_SECRET, enabled=False)),
        )

    @async_test
    async def test_SEC_096_missing_key_is_401(self) -> None:
        """No Authorization header, another scheme, or an empty bearer: 401 with
        WWW-Authenticate: Bearer, and nothing delivered (JSON and raw)."""
        server = self.keyed()
        for headers in ({}, {"authorization": f"Basic {SECRET}"}, {"authorization": "Bearer "}):
            answer = await server.send(message(), secret=None, headers=headers)
            self.assertEqual(answer.status, 401, headers)
            self.assertEqual(answer.header("www-authenticate"), "Bearer")
            raw = await server.raw(RAW_QUERY, RAW, secret=None, headers=headers)
            self.assertEqual(raw.status, 401)
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_097_wrong_key_is_401(self) -> None:
        """A wrong secret, a prefix of the right one, the right one with a byte more, or a
        key's id: 401, nothing delivered; the right one is then accepted."""
        server = self.keyed()
        for wrong in ("nope", SECRET[:-1], SECRET + "x", "app", SECRET.upper()):
            answer = await server.send(message(), secret=wrong)
            self.assertEqual((answer.status, answer.json["error"]["code"]), (401, "unauthorized"))
        self.assertEqual(server.provider.emails, [])
        self.assertEqual((await server.send(message())).status, 200)

    @async_test
    async def test_SEC_098_disabled_key_is_401_like_a_wrong_one(self) -> None:
        """A disabled key's secret gets the very answer a wrong secret gets (nothing tells
        a holder that the key exists), and delivers nothing."""
        server = self.keyed()
        disabled = await server.send(message(), secret=DISABLED_SECRET)
        wrong = await server.send(message(), secret="wrong-" + DISABLED_SECRET)
        self.assertEqual(disabled.status, 401)
        self.assertEqual(disabled.json["error"], wrong.json["error"])
        self.assertEqual(server.provider.emails, [])


class ConstantTimeTests(SynchronousTestCase):
    def test_SEC_099_every_key_compared_as_a_digest_without_early_exit(self) -> None:
        """A lookup calls hmac.compare_digest once per key, on two 32-byte SHA-256 digests,
        whether the secret is the first key's, the last key's, a wrong one or one of
        another length: no early exit, and no comparison of secrets themselves."""
        calls: list[tuple[int, int]] = []
        real = hmac.compare_digest

        def counting(a: Any, b: Any) -> bool:
            calls.append((len(a), len(b)))
            return real(a, b)

        self.patch(hmac, "compare_digest", counting)  # the module keys.py calls it through
        secrets = [f"{n:02d}" + "k" * 40 for n in range(5)]
        ring = KeyRing(key(f"k{n}", secret) for n, secret in enumerate(secrets))
        for presented in (secrets[0], secrets[-1], "wrong", "x" * 500):
            calls.clear()
            ring.lookup(presented.encode())
            self.assertEqual(calls, [(32, 32)] * 5, presented[:10])


class NetworkTests(TestCase):
    @async_test
    async def test_SEC_100_key_networks(self) -> None:
        """A key limited to networks is refused (403 forbidden_network) from elsewhere and
        delivers nothing; from a listed network it works."""
        outside = ApiServer(self, keys=(key(allowed_networks=parse_networks("10.0.0.0/8")),))
        answer = await outside.send(message())
        self.assertEqual((answer.status, answer.json["error"]["code"]), (403, "forbidden_network"))
        self.assertEqual(outside.provider.emails, [])
        inside = ApiServer(self, keys=(key(allowed_networks=parse_networks("127.0.0.0/8")),))
        self.assertEqual((await inside.send(message())).status, 200)

    @async_test
    async def test_SEC_101_forwarded_for_from_an_untrusted_peer_is_ignored(self) -> None:
        """X-Forwarded-For (and Forwarded, X-Real-IP) from a peer that is no trusted proxy
        changes nothing: a key limited to 10.0.0.0/8 stays refused when the header claims
        10.1.2.3, and rotating the claimed address does not escape the per-address limit."""
        spoof = {
            "x-forwarded-for": "10.1.2.3",
            "forwarded": "for=10.1.2.3",
            "x-real-ip": "10.1.2.3",
        }
        server = ApiServer(self, keys=(key(allowed_networks=parse_networks("10.0.0.0/8")),))
        answer = await server.send(message(), headers=spoof)
        self.assertEqual(answer.status, 403)
        limited = ApiServer(self, rates=(0, 1, 0))
        first = await limited.send(message(), headers={"x-forwarded-for": "10.0.0.1"})
        second = await limited.send(message(), headers={"x-forwarded-for": "10.0.0.2"})
        self.assertEqual((first.status, second.status), (200, 429))


class InputTests(TestCase):
    @async_test
    async def test_SEC_102_oversize_body_is_413(self) -> None:
        """Past SMTP_MAX_MESSAGE_SIZE: a raw body (413 before any parsing), a JSON body past
        its base64 allowance, and a message whose encoding grows past the limit; nothing
        delivered."""
        server = ApiServer(self, smtp_max_message_size=2000)
        raw = await server.raw(RAW_QUERY, RAW + b"x" * 2000)
        huge = await server.send(message(text="x" * 200_000))
        content = base64.b64encode(b"\xff" * 1400).decode()
        grown = await server.send(message(attachments=[{"filename": "a", "content": content}]))
        self.assertEqual([a.status for a in (raw, huge, grown)], [413, 413, 413])
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_103_wrong_content_type_is_415(self) -> None:
        """/v1/messages takes application/json only; /raw message/rfc822 or JSON; a form, text,
        no type or another charset is 415, nothing delivered."""
        server = ApiServer(self)
        body = json.dumps(message()).encode()
        for kind in (
            None,
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin-1",
            "message/rfc822",
        ):
            answer = await server.request("POST", "/v1/messages", body, content_type=kind)
            self.assertEqual(answer.status, 415, kind)
        # (A malformed multipart body never reaches the API: twisted.web parses form
        # bodies itself and answers 400; the listener is httpops' business.)
        for kind in (None, "text/plain", "application/x-www-form-urlencoded"):
            answer = await server.raw(RAW_QUERY, RAW, content_type=kind)
            self.assertEqual(answer.status, 415, kind)
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_104_unknown_json_fields_are_400(self) -> None:
        """A field the API does not know (top level, attachment, address, raw form) is 400
        unknown_field naming it, never ignored; nothing delivered."""
        server = ApiServer(self)
        cases = [
            (message(sender="x@example.com"), "sender"),
            (
                message(attachments=[{"filename": "a", "content": "", "path": "/etc/passwd"}]),
                "attachments[0].path",
            ),
            (message(to=[{"address": "b@example.org", "type": "bcc"}]), "to[0].type"),
        ]
        for document, field in cases:
            answer = await server.send(document)
            self.assertEqual((answer.status, answer.json["error"]["field"]), (400, field))
        raw = await server.request(
            "POST",
            "/v1/messages/raw",
            json.dumps(
                {
                    "from": "a@example.com",
                    "to": ["b@example.org"],
                    "data": "",
                    "bcc": ["c@example.org"],
                }
            ).encode(),
        )
        self.assertEqual((raw.status, raw.json["error"]["field"]), (400, "bcc"))
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_105_line_breaks_in_header_fields_are_400(self) -> None:
        """CR/LF (and other controls) in subject, from, to, reply_to, an attachment's file
        name, a custom header's value, and in the raw form's query envelope: 400
        header_injection naming the field; nothing delivered, no header smuggled."""
        server = ApiServer(self)
        inject = "\r\nBcc: victim@example.net"
        cases = [
            (message(subject="Hi" + inject), "subject"),
            (
                message(**{"from": {"address": "app@example.com", "name": "App" + inject}}),
                "from.name",
            ),
            (message(**{"from": "app@example.com" + inject}), "from"),
            (message(to=["rcpt@example.org" + inject]), "to[0]"),
            (message(cc=["rcpt@example.org\n"]), "cc[0]"),
            (message(reply_to="r@example.com" + inject), "reply_to"),
            (
                message(attachments=[{"filename": "a.txt" + inject, "content": ""}]),
                "attachments[0].filename",
            ),
            (message(headers={"X-Tag": "t" + inject}), "headers.X-Tag"),
            (message(headers={"X-Tag\r\nBcc": "t"}), "headers.X-Tag??Bcc"),
        ]
        for document, field in cases:
            answer = await server.send(document)
            self.assertEqual(answer.status, 400, field)
            self.assertEqual(answer.json["error"]["code"], "header_injection", field)
            self.assertEqual(answer.json["error"]["field"], field)
        raw = await server.raw(
            "?from=app@example.com%0d%0aBcc:x@example.net&to=rcpt@example.org", RAW
        )
        self.assertEqual((raw.status, raw.json["error"]["field"]), (400, "from"))
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_106_addresses_validated(self) -> None:
        """Addresses that are no deliverable mailbox (no @, two @, a quoted local part, a
        literal, a bare host, over-long) are 400 invalid_address in every address field and
        in the raw forms; nothing delivered."""
        server = ApiServer(self)
        for bad in (
            "nobody",
            "a@b@example.org",
            '"a b"@example.org',
            "a@[10.0.0.1]",
            "root@localhost",
            "a" * 70 + "@example.org",
        ):
            for document, field in (
                (message(**{"from": bad}), "from"),
                (message(to=[bad]), "to[0]"),
                (message(bcc=[bad]), "bcc[0]"),
                (message(reply_to=bad), "reply_to"),
            ):
                answer = await server.send(document)
                self.assertEqual(
                    (answer.status, answer.json["error"]["code"], answer.json["error"]["field"]),
                    (400, "invalid_address", field),
                    bad,
                )
            raw = await server.raw(f"?from=app@example.com&to={bad.replace('@', '%40')}", RAW)
            self.assertEqual(raw.status, 400, bad)
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_107_sender_and_recipient_policy(self) -> None:
        """A key's allowed_senders / allowed_recipients, and the relay's own
        SMTP_ALLOWED_SENDERS / SMTP_ALLOWED_RECIPIENTS, refuse with 403 naming the field
        (a Bcc recipient too); nothing delivered."""
        limited = key(
            allowed_senders=parse_address_patterns("app@example.com"),
            allowed_recipients=parse_address_patterns("@example.org"),
        )
        server = ApiServer(
            self, keys=(limited,), smtp_allowed_recipients=parse_address_patterns("@example.org")
        )
        sender = await server.send(message(**{"from": "ceo@example.com"}))
        hidden = await server.send(message(bcc=["leak@example.net"]))
        self.assertEqual((sender.status, sender.json["error"]["field"]), (403, "from"))
        self.assertEqual((hidden.status, hidden.json["error"]["field"]), (403, "recipients[1]"))
        relay_wide = ApiServer(self, smtp_allowed_senders=parse_address_patterns("@example.net"))
        self.assertEqual((await relay_wide.send(message())).status, 403)
        self.assertEqual(server.provider.emails + relay_wide.provider.emails, [])


class RateLimitTests(TestCase):
    @async_test
    async def test_SEC_108_per_address_limit_counts_before_the_key(self) -> None:
        """HTTP_API_RATE_LIMIT_PER_IP: past it every request from the address is 429 with
        Retry-After, keyed or not, so guessing keys is throttled; time refills it."""
        clock = Clock()
        server = ApiServer(self, rates=(0, 3, 0), limit_clock=clock)
        answers = [await server.send(message(), secret="guess") for _ in range(3)]
        self.assertEqual([a.status for a in answers], [401] * 3)
        blocked = await server.send(message())
        self.assertEqual((blocked.status, blocked.header("retry-after")), (429, "20"))
        clock.advance(20)
        self.assertEqual((await server.send(message())).status, 200)

    @async_test
    async def test_SEC_109_per_key_limit(self) -> None:
        """HTTP_API_RATE_LIMIT_PER_KEY, or the key's own rate_limit_per_min: past it that key
        gets 429 while another key goes on."""
        server = ApiServer(
            self, keys=(key(rate_limit_per_min=2), key("other", OTHER_SECRET)), rates=(0, 0, 100)
        )
        statuses = [(await server.send(message())).status for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual((await server.send(message(), secret=OTHER_SECRET)).status, 200)

    @async_test
    async def test_SEC_110_global_limit(self) -> None:
        """HTTP_API_RATE_LIMIT_PER_MIN caps all keys together: 429 with Retry-After."""
        server = ApiServer(self, keys=(key(), key("other", OTHER_SECRET)), rates=(2, 0, 0))
        first = await server.send(message())
        second = await server.send(message(), secret=OTHER_SECRET)
        third = await server.send(message())
        self.assertEqual([first.status, second.status, third.status], [200, 200, 429])
        self.assertEqual(third.header("retry-after"), "30")
        self.assertEqual(third.json["error"]["code"], "rate_limited")


BODY_MARKER = "confidential-body-text-7f3a"
SUBJECT_MARKER = "quarterly-numbers-subject-9c1e"
INTERNAL_MARKER = "internal-detail-of-a-provider-bug"


class DisclosureTests(TestCase):
    async def exercise(self, server: ApiServer) -> list[bytes]:
        """Successful and refused requests that all carry the secret and the body markers."""
        document = message(subject=SUBJECT_MARKER, text=BODY_MARKER)
        answers = [
            await server.send(document),
            await server.send(document, secret=SECRET + "x"),
            await server.send({**document, "unknown": BODY_MARKER}),
            await server.send({**document, "subject": SUBJECT_MARKER + "\r\n"}),
            await server.raw(RAW_QUERY, BODY_MARKER.encode() + b"\r\n"),
            await server.raw("?from=" + BODY_MARKER + "&to=x@example.org", b"x"),
            await server.send(document, secret="Bearer " + SECRET),
        ]
        server.provider.outcomes.append(RuntimeError(INTERNAL_MARKER))
        answers.append(await server.send(document))
        self.assertEqual(answers[-1].status, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        return [a.body + repr(a.headers).encode() for a in answers]

    @async_test
    async def test_SEC_111_no_secret_or_body_in_logs(self) -> None:
        """Across accepted, refused and failed requests, no log event holds the API key,
        the message body or the subject, in any field."""
        logs = LogCapture(self)
        server = ApiServer(self)
        await self.exercise(server)
        server.api.refusal_log.flush()
        text = logs.text()
        self.assertIn("http api request refused", text)
        self.assertIn("message delivered", text)
        for secret in (SECRET, BODY_MARKER, SUBJECT_MARKER):
            self.assertNotIn(secret, text)

    @async_test
    async def test_SEC_112_no_secret_or_body_in_responses(self) -> None:
        """No answer (status line, headers or JSON) repeats the key, the body, the subject or
        a client-chosen field value; a provider's unexpected exception text is not shown."""
        server = ApiServer(self)
        shown = b"\n".join(await self.exercise(server))
        for secret in (SECRET, BODY_MARKER, SUBJECT_MARKER, INTERNAL_MARKER):
            self.assertNotIn(secret.encode(), shown)


class RequestIdTests(TestCase):
    @async_test
    async def test_SEC_113_request_id_on_every_answer(self) -> None:
        """Every /v1 answer (delivered, each refusal, 404 and 405 under /v1, the OpenAPI
        document) carries a fresh X-Request-Id; error bodies repeat it; the log line of a
        delivered or refused request carries it, with the key id and the client address;
        a client's own X-Request-Id is not echoed."""
        logs = LogCapture(self)
        server = ApiServer(self)
        sent = {"x-request-id": "client-chosen\r\nSet-Cookie: a=b"}
        answers = [
            await server.send(message(), headers=sent),
            await server.send(message(), secret=None),
            await server.send(message(to=["bad"])),
            await server.request("GET", "/v1/messages"),
            await server.request("POST", "/v1/nope", b"{}"),
            await server.request("GET", "/v1/openapi.json", secret=None),
        ]
        ids = [a.header("x-request-id") for a in answers]
        self.assertNotIn(None, ids)
        self.assertEqual(len(set(ids)), len(ids))
        self.assertNotIn("client-chosen", "".join(str(i) for i in ids))
        for answer in answers[1:5]:
            self.assertEqual(answer.json["request_id"], answer.header("x-request-id"))
        server.api.refusal_log.flush()
        [delivered] = logs.named("message delivered")
        self.assertEqual(
            (delivered["request_id"], delivered["key_id"], delivered["client"]),
            (ids[0], "app", "127.0.0.1"),
        )
        refused = logs.named("http api request refused")
        self.assertEqual(refused[0]["request_id"], ids[1])


class FailClosedTests(TestCase):
    @async_test
    async def test_SEC_114_api_off_until_a_key_exists(self) -> None:
        """No key configured: every /v1 path is answered as a path nobody mounted (a body:
        413 before it is read; none: 404), even with a bearer token, and nothing is
        delivered."""
        server = ApiServer(self, keys=())
        missing = await server.request("POST", "/nothing-here", b"{}")
        self.assertEqual(missing.status, 413)
        for path in ("/v1/messages", "/v1/messages/raw", "/v1/openapi.json"):
            answer = (
                await server.send(message())
                if path == "/v1/messages"
                else await server.request("POST", path, b"{}")
            )
            self.assertEqual((answer.status, answer.body), (missing.status, missing.body), path)
            self.assertIsNone(answer.header("x-request-id"), path)
        answer = await server.request("GET", "/v1/openapi.json", secret=None, content_type=None)
        self.assertEqual(answer.status, 404)
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_SEC_115_short_or_bad_keys_refuse_start_up(self) -> None:
        """The real twistd: a secret under 32 characters, or an unreadable keys file, stops
        the relay with exit status 1 and one line naming the setting, never the secret."""
        short = "short-secret-1234"
        bad = await in_thread(
            run_twistd, HTTP_API_KEYS=f"app:{short}", SMTP_LISTEN="127.0.0.1:0", HTTP_LISTEN=""
        )
        missing = await in_thread(
            run_twistd,
            HTTP_API_KEYS_FILE="/nonexistent/keys.yaml",
            SMTP_LISTEN="127.0.0.1:0",
            HTTP_LISTEN="",
        )
        for result, setting in ((bad, "HTTP_API_KEYS"), (missing, "keys.yaml")):
            err = result.stderr.decode()
            self.assertEqual(result.returncode, 1, err)
            self.assertIn(setting, err)
            self.assertNotIn(short, err + result.stdout.decode())
            self.assertNotIn("Traceback", err)
