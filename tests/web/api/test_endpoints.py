"""The API over a loopback socket: every answer the OpenAPI document lists, reached.

Each test sends real HTTP (treq) to a site built by C{make_site} with the
API mounted; the recording provider or a queue in memory stands where
the backend would be.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from collections.abc import Awaitable, Callable
from typing import Any

from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.mime.message import parse_message
from smtpproxy.policy.rules import parse_address_patterns
from smtpproxy.queue.front import mailbox_from_meta
from smtpproxy.web.api.openapi import document
from smtpproxy.web.api.resource import Api, V1Resource
from tests.queue.memory import MemoryStore
from tests.support import async_test
from tests.web.api.harness import (
    OTHER_SECRET,
    SECRET,
    Answer,
    ApiServer,
    LogCapture,
    key,
    message,
)

Scenario = Callable[[TestCase], Awaitable[Answer]]

RAW = b"From: app@example.com\r\nTo: rcpt@example.org\r\nSubject: raw\r\n\r\nraw body\r\n"
RAW_QUERY = "?from=app@example.com&to=rcpt@example.org"


def _submission_scenarios(path: str) -> dict[int, Scenario]:
    """How to make POST C{path} answer each status."""

    async def post(server: ApiServer, **kw: Any) -> Answer:
        if path.endswith("/raw"):
            return await server.raw(RAW_QUERY, RAW, **kw)
        return await server.send(message(), **kw)

    async def delivered(case: TestCase) -> Answer:
        return await post(ApiServer(case))

    async def queued(case: TestCase) -> Answer:
        return await post(ApiServer(case, store=MemoryStore()))

    async def bad(case: TestCase) -> Answer:
        server = ApiServer(case)
        if path.endswith("/raw"):
            return await server.raw("?from=not-an-address&to=rcpt@example.org", RAW)
        return await server.send(message(subject="a\r\nBcc: x@evil.example"))

    async def unauthorized(case: TestCase) -> Answer:
        return await post(ApiServer(case), secret=None)

    async def forbidden(case: TestCase) -> Answer:
        server = ApiServer(
            case, keys=(key(allowed_recipients=parse_address_patterns("@example.net")),)
        )
        return await post(server)

    async def wrong_method(case: TestCase) -> Answer:
        return await ApiServer(case).request("GET", path)

    async def too_large(case: TestCase) -> Answer:
        server = ApiServer(case, smtp_max_message_size=1000)
        if path.endswith("/raw"):
            return await server.raw(RAW_QUERY, RAW + b"x" * 2000)
        return await server.send(message(text="x" * 2000))

    async def unsupported(case: TestCase) -> Answer:
        return await post(ApiServer(case), content_type="text/plain")

    async def limited(case: TestCase) -> Answer:
        server = ApiServer(case, rates=(0, 0, 1))
        await post(server)
        return await post(server)

    async def rejected(case: TestCase) -> Answer:
        server = ApiServer(case)
        server.provider.outcomes.append(PermanentDeliveryError("mailbox unknown", "5.1.1", 550))
        return await post(server)

    async def unavailable(case: TestCase) -> Answer:
        server = ApiServer(case)
        server.provider.outcomes.append(TransientDeliveryError("throttled", "4.4.1"))
        return await post(server)

    return {
        200: delivered,
        202: queued,
        400: bad,
        401: unauthorized,
        403: forbidden,
        405: wrong_method,
        413: too_large,
        415: unsupported,
        429: limited,
        502: rejected,
        503: unavailable,
    }


async def _openapi_ok(case: TestCase) -> Answer:
    return await ApiServer(case).request("GET", "/v1/openapi.json", secret=None)


async def _openapi_wrong_method(case: TestCase) -> Answer:
    return await ApiServer(case).request("POST", "/v1/openapi.json", b"{}")


SCENARIOS: dict[tuple[str, str, int], Scenario] = {
    **{("/v1/messages", "post", s): f for s, f in _submission_scenarios("/v1/messages").items()},
    **{
        ("/v1/messages/raw", "post", s): f
        for s, f in _submission_scenarios("/v1/messages/raw").items()
    },
    ("/v1/openapi.json", "get", 200): _openapi_ok,
    ("/v1/openapi.json", "get", 405): _openapi_wrong_method,
}


class DocumentTests(SynchronousTestCase):
    """The OpenAPI document itself, and its agreement with the resource tree."""

    def test_valid_openapi_31(self) -> None:
        """openapi-spec-validator accepts the document as OpenAPI 3.1 (it raises otherwise)."""
        spec = document()
        self.assertEqual(spec["openapi"], "3.1.0")
        validate(spec)

    def test_every_served_path_is_documented(self) -> None:
        """Walking the /v1 resource tree finds exactly the documented paths: a handler
        added without documentation (or documentation without a handler) fails."""

        def walk(resource: Any, prefix: str) -> set[str]:
            found = set()
            for name, child in resource.children.items():
                path = f"{prefix}/{name.decode()}"
                found.add(path)
                found |= walk(child, path)
            return found

        api: Any = object.__new__(Api)
        tree = V1Resource(api)
        self.assertEqual(walk(tree, "/v1"), set(document()["paths"]))

    def test_scenarios_cover_exactly_the_documented_statuses(self) -> None:
        """Each (path, method, status) the document lists has a scenario below, and no
        scenario reaches an undocumented one."""
        documented = {
            (path, method, int(status))
            for path, operations in document()["paths"].items()
            for method, operation in operations.items()
            for status in operation["responses"]
        }
        self.assertEqual(documented, set(SCENARIOS))


class StatusTests(TestCase):
    """Every documented status, reached over the wire, with the documented body shape."""

    @async_test
    async def test_every_documented_status_is_reached(self) -> None:
        """Run each scenario; its answer has the status it stands for, an X-Request-Id,
        and (for errors) the error shape whose request_id equals the header."""
        for (path, method, status), scenario in sorted(SCENARIOS.items()):
            answer = await scenario(self)
            where = f"{method.upper()} {path} -> {status}: {answer.body[:300]!r}"
            self.assertEqual(answer.status, status, where)
            request_id = answer.header("x-request-id")
            self.assertIsNotNone(request_id, where)
            body = answer.json
            if status >= 400:
                self.assertEqual(set(body), {"error", "request_id"}, where)
                self.assertEqual(set(body["error"]), {"code", "message", "field"}, where)
                self.assertEqual(body["request_id"], request_id, where)
            if status in (429, 503):
                self.assertGreaterEqual(int(answer.header("retry-after") or "0"), 1, where)


class SubmissionTests(TestCase):
    """What reaches the provider or the queue."""

    @async_test
    async def test_json_message_reaches_the_provider_as_built(self) -> None:
        """A JSON message arrives parsed by the shared parser: envelope from + to + cc + bcc,
        headers as sent, Bcc in the envelope only, and 200 "delivered" with its id."""
        server = ApiServer(self)
        answer = await server.send(
            message(
                cc=[{"address": "cc@example.org", "name": "Carbon Copy"}],
                bcc=["hidden@example.org"],
                reply_to="replies@example.com",
                html="<p>Body</p>",
                headers={"X-Campaign": "spring"},
                attachments=[
                    {
                        "filename": "report.csv",
                        "content_type": "text/csv",
                        "content": base64.b64encode(b"a,b\r\n1,2\r\n").decode(),
                    }
                ],
            )
        )
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(answer.json["status"], "delivered")
        [sent] = server.provider.emails
        self.assertEqual(sent.envelope_from, "app@example.com")
        self.assertEqual(
            list(sent.envelope_to), ["rcpt@example.org", "cc@example.org", "hidden@example.org"]
        )
        parsed = email.message_from_bytes(sent.raw, policy=email.policy.default)
        self.assertEqual(parsed["Subject"], "Hello")
        self.assertEqual(parsed["Cc"], "Carbon Copy <cc@example.org>")
        self.assertEqual(parsed["Reply-To"], "replies@example.com")
        self.assertEqual(parsed["X-Campaign"], "spring")
        self.assertIsNone(parsed["Bcc"])
        self.assertNotIn(b"hidden@example.org", sent.raw)
        [attachment] = list(parsed.iter_attachments())
        self.assertEqual(attachment.get_filename(), "report.csv")
        self.assertEqual(attachment.get_content(), "a,b\r\n1,2\r\n")
        self.assertEqual(parsed["Message-ID"], f"<{answer.json['request_id']}@relay.test>")
        # The view the provider got was written down from the request, not parsed:
        # it is the one the shared parser makes of the same bytes.
        self.assertEqual(sent, parse_message(sent.envelope_from, sent.envelope_to, sent.raw))

    @async_test
    async def test_raw_message_reaches_the_provider_unchanged(self) -> None:
        """Both raw forms hand the provider exactly the bytes sent, bare LFs and all."""
        data = b"Subject: odd\nX-Odd: bare LF\r\n\r\nline\nend \r\n"
        server = ApiServer(self)
        first = await server.raw("?from=a@example.com&to=b@example.org&to=c@example.org", data)
        second = await server.request(
            "POST",
            "/v1/messages/raw",
            json.dumps(
                {
                    "from": "a@example.com",
                    "to": ["b@example.org"],
                    "data": base64.b64encode(data).decode(),
                }
            ).encode(),
        )
        self.assertEqual((first.status, second.status), (200, 200), (first.body, second.body))
        self.assertEqual([e.raw for e in server.provider.emails], [data, data])
        self.assertEqual(
            list(server.provider.emails[0].envelope_to), ["b@example.org", "c@example.org"]
        )

    @async_test
    async def test_raw_query_plus_must_be_percent_encoded(self) -> None:
        """to=a%2Bb@... reaches a+b@...; an unencoded to=a+b@... decodes to a space and is
        400 invalid_address saying to write %2B, never delivered to another address; a
        UTF-8 local part (percent-encoded) is taken as SMTP takes it with SMTPUTF8."""
        server = ApiServer(self)
        good = await server.raw("?from=app@example.com&to=a%2Bb@example.org", RAW)
        self.assertEqual(good.status, 200, good.body)
        self.assertEqual(list(server.provider.emails[0].envelope_to), ["a+b@example.org"])
        bad = await server.raw("?from=app@example.com&to=a+b@example.org", RAW)
        error = bad.json["error"]
        self.assertEqual(
            (bad.status, error["code"], error["field"]), (400, "invalid_address", "to[0]")
        )
        self.assertIn("%2B", error["message"])
        utf8 = await server.raw("?from=app@example.com&to=jos%C3%A9@example.org", RAW)
        self.assertEqual(utf8.status, 200, utf8.body)
        self.assertEqual(list(server.provider.emails[1].envelope_to), ["jos\u00e9@example.org"])
        self.assertEqual(len(server.provider.emails), 2)

    @async_test
    async def test_empty_raw_message_is_refused_in_both_forms(self) -> None:
        """An empty message/rfc822 body and JSON "data": "" are both 400 invalid_field
        (field body / data); nothing reaches the provider."""
        server = ApiServer(self)
        by_query = await server.raw(RAW_QUERY, b"")
        by_json = await server.request(
            "POST",
            "/v1/messages/raw",
            json.dumps({"from": "a@example.com", "to": ["b@example.org"], "data": ""}).encode(),
        )
        self.assertEqual(
            [
                (a.status, a.json["error"]["code"], a.json["error"]["field"])
                for a in (by_query, by_json)
            ],
            [(400, "invalid_field", "body"), (400, "invalid_field", "data")],
        )
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_queue_mode_stores_the_message_and_answers_202(self) -> None:
        """With a queue the body is stored as built, the envelope names the key as its
        user, the provider is not called, and the answer is 202 with the queue's id."""
        store = MemoryStore()
        server = ApiServer(self, store=store)
        answer = await server.raw(RAW_QUERY, RAW)
        self.assertEqual(answer.status, 202, answer.body)
        self.assertEqual(answer.json["status"], "queued")
        [entry] = store.entries.values()
        self.assertEqual(entry.id, answer.json["id"])
        self.assertEqual(store.bodies[entry.id], RAW)
        self.assertEqual(entry.envelope.user, "app")
        self.assertEqual(entry.envelope.recipients, ("rcpt@example.org",))
        self.assertEqual(server.provider.emails, [])

    @async_test
    async def test_key_mailbox_travels_direct_and_queued(self) -> None:
        """A key with a mailbox: its message reaches the provider bound to that mailbox;
        queued, the stored meta names it and the route is its lane; a key without one
        leaves the provider's choice (empty mailbox)."""
        bound = key(mailbox="Billing@Contoso.example")
        server = ApiServer(self, keys=(bound, key("other", OTHER_SECRET)))
        self.assertEqual((await server.raw(RAW_QUERY, RAW)).status, 200)
        self.assertEqual((await server.raw(RAW_QUERY, RAW, secret=OTHER_SECRET)).status, 200)
        self.assertEqual(
            [e.mailbox for e in server.provider.emails], ["Billing@Contoso.example", ""]
        )
        store = MemoryStore()
        queued = ApiServer(self, keys=(bound,), store=store)
        self.assertEqual((await queued.raw(RAW_QUERY, RAW)).status, 202)
        [entry] = store.entries.values()
        self.assertEqual(mailbox_from_meta(entry.envelope.meta), "Billing@Contoso.example")
        self.assertEqual(entry.envelope.route, "billing@contoso.example")

    @async_test
    async def test_full_queue_is_503_with_retry_after(self) -> None:
        """A queue over its size answers 503 queue_full with Retry-After (not 507: clients
        should retry it like an outage)."""
        store = MemoryStore(max_bytes=10)
        server = ApiServer(self, store=store)
        answer = await server.raw(RAW_QUERY, RAW)
        self.assertEqual(answer.status, 503, answer.body)
        self.assertEqual(answer.json["error"]["code"], "queue_full")
        self.assertIsNotNone(answer.header("retry-after"))

    @async_test
    async def test_provider_retry_after_is_passed_on(self) -> None:
        """A temporary failure carrying the backend's Retry-After gives the client that wait."""
        server = ApiServer(self)
        failure = TransientDeliveryError("throttled", "4.4.1")
        failure.retry_after = 17.2
        server.provider.outcomes.append(failure)
        answer = await server.send(message())
        self.assertEqual((answer.status, answer.header("retry-after")), (503, "17"))

    @async_test
    async def test_api_off_without_keys(self) -> None:
        """With no key configured every /v1 path is answered exactly as a path that does not
        exist (with a body: the site's 413 for a path that takes none, before any 404): no
        request id, no hint that an API is there."""
        server = ApiServer(self, keys=())
        for method, path in (("POST", "/v1/messages"), ("GET", "/v1/openapi.json")):
            answer = await server.request(method, path, b"{}")
            missing = await server.request(method, "/nothing-here", b"{}")
            self.assertEqual((answer.status, answer.body), (missing.status, missing.body))
            self.assertIn(answer.status, (404, 413))
            self.assertIsNone(answer.header("x-request-id"))

    @async_test
    async def test_unknown_paths_under_v1_are_json_404(self) -> None:
        """Paths under /v1 that are not endpoints answer a JSON 404 with a request id."""
        server = ApiServer(self)
        for path in ("/v1", "/v1/", "/v1/messages/", "/v1/messages/raw/x", "/v1/nope"):
            answer = await server.request("POST", path, b"{}")
            self.assertEqual(answer.status, 404, path)
            self.assertEqual(answer.json["error"]["code"], "not_found", path)
            self.assertIsNotNone(answer.header("x-request-id"))

    @async_test
    async def test_health_still_served(self) -> None:
        """Mounting the API leaves /healthz as it was."""
        server = ApiServer(self)
        answer = await server.request("GET", "/healthz", secret=None, content_type=None)
        self.assertEqual((answer.status, answer.json), (200, {"status": "ok"}))


class RequestLogTests(TestCase):
    """The two per-request debug lines: emitted at debug level, not even built above it."""

    @async_test
    async def test_debug_level_logs_each_request(self) -> None:
        """At LOG_LEVEL=debug a submission logs C{http request} (the listener's line) and
        C{http api request} (the API's), with the same fields as before the level was passed
        in; no key and no body in either."""
        server = ApiServer(self, log_level="debug")
        captured = LogCapture(self)
        answer = await server.send(message())
        self.assertEqual(answer.status, 200, answer.body)
        request_id = answer.json["request_id"]
        [listener] = captured.named("http request")
        self.assertEqual(listener["log_level"].name, "debug")
        self.assertEqual(
            {k: listener[k] for k in ("method", "path", "status", "client")},
            {"method": "POST", "path": "/v1/messages", "status": 200, "client": "127.0.0.1"},
        )
        [api] = captured.named("http api request")
        self.assertEqual(api["log_level"].name, "debug")
        self.assertEqual(
            {k: api[k] for k in ("status", "request_id", "client", "key_id")},
            {"status": 200, "request_id": request_id, "client": "127.0.0.1", "key_id": "app"},
        )
        self.assertIsInstance(api["duration_ms"], float)
        self.assertNotIn("Body text.", captured.text())
        self.assertNotIn(SECRET, captured.text())

    @async_test
    async def test_info_level_builds_neither(self) -> None:
        """Above debug neither event is even built (no observer sees it), while the
        submission itself is answered as usual."""
        server = ApiServer(self, log_level="info")
        captured = LogCapture(self)
        answer = await server.send(message())
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(captured.named("http request"), [])
        self.assertEqual(captured.named("http api request"), [])
