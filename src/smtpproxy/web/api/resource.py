"""The C{/v1} resource tree: the submission endpoints and the OpenAPI document.

C{twisted.web} glue around the pure parts: each request gets an id (the
C{X-Request-Id} of every answer, and a field of every log line about it),
then passes the checks in a fixed order, each of which can end it with a
JSON error (L{smtpproxy.web.api.problems}):

 1. the per-address rate limit (429), before anything else, so that
    guessing keys is throttled like any request;
 2. the key (C{Authorization: Bearer}; 401), looked up in constant time;
 3. the key's networks (403) and the per-key and global rate limits (429);
 4. the content type (415) and the body size (413);
 5. the request itself (400) and the sender and recipient policy (403);
 6. the message built and its encoded size (413);
 7. the queue or the provider (200, 202, 502, 503).

No answer and no log line carries the key, the body or any header value
a client chose; refusals a client can repeat at will are logged through a
L{LogSummary}, once per client and interval.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from smtpproxy.logsummary import LogSummary
from smtpproxy.mime.message import Email
from smtpproxy.policy import rules
from smtpproxy.web.api import compose
from smtpproxy.web.api.direct import direct_email
from smtpproxy.web.api.keys import ApiKey, KeyRing
from smtpproxy.web.api.limits import Limits
from smtpproxy.web.api.openapi import document as openapi_document
from smtpproxy.web.api.problems import ApiError, error_body, json_bytes
from smtpproxy.web.api.submit import Accepted, Submitter

__all__ = ["Api", "ApiSettings", "V1Resource", "client_address", "new_request_id"]

log = Logger(namespace="smtpproxy.http.api")

#: What a submission endpoint reads: sender, recipients, the message bytes and,
#: when it built them itself, their parsed view.
Read = tuple[str, list[str], bytes, Email | None]

JSON = "application/json"
RFC822 = "message/rfc822"
#: Room for JSON syntax and field names beyond the base64 of a largest message.
JSON_OVERHEAD = 64 * 1024


def client_address(request: Request) -> str:
    """The client address every API policy, limit and log line uses.

    The listener's request (L{smtpproxy.web.channel.BoundedRequest})
    answers C{getClientAddress} with the socket peer, or with the client an
    C{X-Forwarded-For} header names when the peer is one of
    C{HTTP_TRUSTED_PROXIES}; from anyone else the header is never believed.
    """
    return rules.client_name(request.getClientAddress())  # type: ignore[no-untyped-call]


def new_request_id() -> str:
    """A request id: 128 random bits, hex; ours alone (a client's is never echoed)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """What the endpoints need from the relay's settings (L{smtpproxy.web.api.settings_from})."""

    max_message_size: int
    max_recipients: int
    hostname: str
    allowed_senders: rules.AddressPatterns
    allowed_recipients: rules.AddressPatterns
    # The per-request debug line is only built when the level asks for it.
    log_requests: bool = True

    @property
    def json_body_limit(self) -> int:
        """Bytes of a JSON request: the message's size limit in base64, plus room for JSON."""
        return self.max_message_size * 4 // 3 + JSON_OVERHEAD


class Api:
    """The API's state: settings, keys, limits and where messages go.

    @param reload: reads the keys again (environment and file); called on
        SIGHUP through L{reload_keys}.
    """

    def __init__(
        self,
        settings: ApiSettings,
        keys: KeyRing,
        limits: Limits,
        submitter: Submitter,
        clock: IReactorTime,
        reload: Callable[[], KeyRing] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.limits = limits
        self.submitter = submitter
        self.clock = clock
        self._reload = reload
        self.refusal_log = LogSummary(log, clock)
        self.v1 = V1Resource(self)

    @property
    def enabled(self) -> bool:
        """Off (every path a plain 404, as if absent) until at least one key exists."""
        return len(self.keys) > 0

    def resource(self) -> Resource | None:
        """What the site mounts at C{/v1}: the tree while enabled, else None."""
        return self.v1 if self.enabled else None

    def reload_keys(self) -> None:
        """Read the keys again; on any error keep the ones in force and say why."""
        if self._reload is None:
            return
        try:
            ring = self._reload()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warn("api keys not reloaded, the previous ones stay in force", error=str(e))
            return
        self.keys = ring
        log.info("api keys reloaded", keys=len(ring))

    def stop(self) -> None:
        self.refusal_log.stop()


class _Endpoint(Resource):
    """One path: its methods, the request id, JSON errors, and nothing below it."""

    methods: tuple[bytes, ...] = (b"POST",)

    def __init__(self, api: Api) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self.api = api

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound(self.api)

    def render(self, request: Request) -> bytes | int:
        request_id = new_request_id()
        request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        if request.method not in self.methods:
            allowed = b", ".join(self.methods)
            request.responseHeaders.setRawHeaders(b"allow", [allowed])
            return _error(
                request, request_id, ApiError(405, "method_not_allowed", "use " + allowed.decode())
            )
        try:
            return self.handle(request, request_id)
        except ApiError as e:
            return _error(request, request_id, e)

    def handle(self, request: Request, request_id: str) -> bytes | int:
        raise ApiError(404, "not_found", "no such endpoint")


class _NotFound(_Endpoint):
    methods = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")


class V1Resource(_NotFound):
    """C{/v1}: its children are the endpoints; itself it is not one."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        messages = MessagesResource(api)
        self.putChild(b"messages", messages)
        self.putChild(b"openapi.json", OpenApiResource(api))


class OpenApiResource(_Endpoint):
    """C{GET /v1/openapi.json}: the OpenAPI 3.1 document (no key needed: it holds no secret)."""

    methods = (b"GET", b"HEAD")

    def handle(self, request: Request, request_id: str) -> bytes:
        body = json_bytes(openapi_document())
        return _respond(request, 200, body)


class _Submission(_Endpoint):
    """The shared path of both submission endpoints; L{read} differs."""

    def handle(self, request: Request, request_id: str) -> int:
        started = self.api.clock.seconds()
        context: dict[str, Any] = {"request_id": request_id, "client": client_address(request)}
        finished: list[bool] = []
        ended: defer.Deferred[None] | None = None
        if not self.api.submitter.queued:
            # Direct mode: a client that disconnects before its answer will
            # send again, so a send not yet handed over is cancelled
            # (Submitter._client_left).  Marked gone first, so that the
            # cancelled send's outcome is not written to a closed request.
            ended = request.notifyFinish()
            ended.addErrback(_mark_finished, finished)
        try:
            work = self._submit(request, context, ended)
        except Exception:
            # A refusal (ApiError) or our own bug: answered like a failed delivery.
            work = defer.fail()
        if ended is not None:
            ended.addErrback(lambda _: None)  # a refusal never reached the submitter
        # A plain function, not a coroutine: in direct mode the provider has
        # usually taken the message (or refused it) by now, and then the
        # answer is written at once, with no Deferred of the request's own.
        outcome: list[Accepted | Failure] = []
        waiting = work.addBoth(outcome.append)
        if outcome:
            self._answer(request, context, started, outcome[0])
            return NOT_DONE_YET
        if ended is None:
            request.notifyFinish().addBoth(lambda _: finished.append(True))

        def landed(_: None) -> None:
            if not finished:  # else the client went away; the outcome is in the log
                self._answer(request, context, started, outcome[0])

        waiting.addCallback(landed)
        return NOT_DONE_YET

    def _answer(
        self,
        request: Request,
        context: dict[str, Any],
        started: float,
        result: Accepted | Failure,
    ) -> None:
        """Write the answer for the submission's C{result} and finish the request."""
        request_id = context["request_id"]
        if isinstance(result, Accepted):
            code = 202 if result.status == "queued" else 200
            answer: dict[str, object] = {
                "id": result.id,
                "request_id": request_id,
                "status": result.status,
            }
            if result.not_delivered:
                # Delivered to the others: the client must not send it again,
                # but it should know who did not get it (as SMTP's 250 says).
                answer["not_delivered"] = [
                    {"recipient": r.address, "reply": r.reply} for r in result.not_delivered
                ]
            body = json_bytes(answer)
            request.write(_respond(request, code, body))  # type: ignore[no-untyped-call]
        else:
            error = result.value
            if not isinstance(error, ApiError):
                log.failure("http api request failed", result, **context)
                error = ApiError(500, "internal_error", "internal error")
            else:
                self._refused(error, context)
            request.write(_error(request, request_id, error))  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]
        if not self.api.settings.log_requests:
            return
        log.debug(
            "http api request",
            status=request.code,
            duration_ms=round((self.api.clock.seconds() - started) * 1000, 1),
            **context,
        )

    def _refused(self, error: ApiError, context: dict[str, Any]) -> None:
        fields = {k: v for k, v in context.items() if k != "client"}
        self.api.refusal_log.emit(
            LogLevel.info,
            "http api request refused",
            context["client"],
            status=error.status,
            code=error.code,
            field=error.field,
            **fields,
        )

    def _submit(
        self, request: Request, context: dict[str, Any], ended: defer.Deferred[None] | None
    ) -> defer.Deferred[Accepted]:
        """The checks in order, then the submission; raises the first refusal.

        @param ended: direct mode, the request's C{notifyFinish()}, for the submitter.
        """
        api = self.api
        refusal = api.limits.address(context["client"])
        if refusal is not None:
            raise _rate_limited(refusal.retry_after)
        key = _authenticate(request, api.keys)
        context["key_id"] = key.id
        if key.allowed_networks and not rules.address_in(context["client"], key.allowed_networks):
            raise ApiError(403, "forbidden_network", "this key may not be used from this address")
        refusal = api.limits.key(key.id, key.rate_limit_per_min)
        if refusal is not None:
            raise _rate_limited(refusal.retry_after)
        sender, recipients, data, built = self.read(request, context)
        _check_policy(key, api.settings, sender, recipients)
        return api.submitter.submit(
            sender, recipients, data, context, mailbox=key.mailbox, parsed=built, ended=ended
        )

    def read(self, request: Request, context: dict[str, Any]) -> Read:
        """The envelope, the message bytes and their parsed view if known, or an L{ApiError}."""
        raise NotImplementedError


class MessagesResource(_Submission):
    """C{POST /v1/messages}: a message described in JSON, built here."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.putChild(b"raw", RawResource(api))

    def read(self, request: Request, context: dict[str, Any]) -> Read:
        settings = self.api.settings
        _content_type(request, (JSON,))
        document = compose.parse_json(_body(request, settings.json_body_limit))
        message = compose.read_json_message(
            document,
            max_recipients=settings.max_recipients,
            max_size=settings.max_message_size,
        )
        built = compose.build_message(
            message,
            message_id=f"<{context['request_id']}@{settings.hostname}>",
            now=datetime.fromtimestamp(self.api.clock.seconds(), UTC),
        )
        data = compose.encode_message(built, settings.max_message_size)
        recipients = message.envelope_recipients
        # What parsing these bytes would give, written down from the request
        # (smtpproxy.web.api.direct; None: the shared parser reads them).
        parsed = direct_email(message, recipients, data)
        return message.sender.address, recipients, data, parsed


class RawResource(_Submission):
    """C{POST /v1/messages/raw}: a whole message, passed on byte for byte."""

    def read(self, request: Request, context: dict[str, Any]) -> Read:
        settings = self.api.settings
        kind = _content_type(request, (RFC822, JSON))
        if kind == RFC822:
            data = _body(request, settings.max_message_size)
            raw = compose.read_raw_query(
                request.args or {}, data, max_recipients=settings.max_recipients
            )
        else:
            if request.args:
                raise ApiError(400, "unknown_field", "the envelope goes in the JSON body", "query")
            document = compose.parse_json(_body(request, settings.json_body_limit))
            raw = compose.read_raw_json(
                document,
                max_recipients=settings.max_recipients,
                max_size=settings.max_message_size,
            )
            if len(raw.data) > settings.max_message_size:
                raise ApiError(413, "too_large", "larger than the message size limit", "data")
        # The client's bytes: only the shared parser may say what they hold.
        return raw.sender.address, raw.envelope_recipients, raw.data, None


# -- the steps ------------------------------------------------------------------


def _mark_finished(reason: Failure, finished: list[bool]) -> Failure:
    """The connection was lost before the answer: note it, and pass the loss on."""
    finished.append(True)
    return reason


def _rate_limited(seconds: int) -> ApiError:
    return ApiError(429, "rate_limited", "too many requests, try again later", None, seconds)


def _authenticate(request: Request, keys: KeyRing) -> ApiKey:
    header = request.getHeader(b"authorization") or b""
    scheme, _, presented = header.partition(b" ")
    presented = presented.strip()
    if scheme.lower() != b"bearer" or not presented:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer)")
    key = keys.lookup(presented)
    if key is None:
        # Wrong, unknown and disabled keys get the same answer.
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return key


def _content_type(request: Request, accepted: tuple[str, ...]) -> str:
    header = request.getHeader(b"content-type") or b""
    kind_bytes, _, parameters = header.partition(b";")
    kind = kind_bytes.strip().lower().decode("ascii", "replace")
    charset = b""
    for parameter in parameters.split(b";"):
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"charset":
            charset = value.strip().strip(b'"').lower()
    if kind not in accepted or charset not in (b"", b"utf-8"):
        raise ApiError(415, "unsupported_media_type", "send " + " or ".join(accepted))
    return kind


def _body(request: Request, limit: int) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"the request body is larger than {limit} bytes")
    return data


def _check_policy(key: ApiKey, settings: ApiSettings, sender: str, recipients: list[str]) -> None:
    """The key's sender and recipient lists, then the relay's own (as SMTP applies them)."""
    for patterns in (key.allowed_senders, settings.allowed_senders):
        if not patterns.allows(sender):
            raise ApiError(403, "sender_not_allowed", "this sender is not allowed", "from")
    for index, recipient in enumerate(recipients):
        for patterns in (key.allowed_recipients, settings.allowed_recipients):
            if not patterns.allows(recipient):
                raise ApiError(
                    403,
                    "recipient_not_allowed",
                    "this recipient is not allowed",
                    f"recipients[{index}]",
                )


def _respond(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [JSON.encode("ascii")])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return b"" if request.method == b"HEAD" else body


def _error(request: Request, request_id: str, error: ApiError) -> bytes:
    if error.retry_after is not None:
        request.responseHeaders.setRawHeaders(b"retry-after", [b"%d" % error.retry_after])
    if error.status == 401:
        request.responseHeaders.setRawHeaders(b"www-authenticate", [b"Bearer"])
    return _respond(request, error.status, error_body(error, request_id))
