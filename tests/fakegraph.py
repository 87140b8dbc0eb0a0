"""A fake Entra ID token endpoint and Microsoft Graph, as strict as the real ones.

It is what proves the Graph provider right, so it checks what Graph checks
(and a little more, where a client mistake would go unnoticed against the
real service until production):

  - token requests are form-encoded client-credentials grants for the right
    tenant, client, secret and scope; tokens expire;
  - every Graph request carries a live bearer token and a fresh
    C{client-request-id} GUID; bodies stay under 4 MB;
  - the sender is a known mailbox and From equals it (else 403
    ErrorSendAsDenied); at most 500 recipients; JSON messages follow the
    schema, with at most five C{x-} headers;
  - internationalised mail as docs/graph.md describes it: recipient
    domains as A-labels (an EAI local part in UTF-8 is fine in JSON), and
    a MIME message's header fields in ASCII (raw UTF-8 header bytes, RFC
    6532, are what Microsoft's readers take for ASCII: Graph accepts the
    message and the reader sees it garbled, so the fake accepts it too and
    records the violation);
  - upload sessions only for parts of 3 MB or more, ranges of at most 4 MB
    uploaded in order, and never with an Authorization header;
  - a draft is sent only when its uploads are complete; an upload URL
    answers GET with where the session stands (C{nextExpectedRanges});
  - drafts are listed only with the two filters the relay uses (by
    C{internetMessageId}, by a string extended property) and C{$select=id};
  - Sent Items holds a copy of every message sent from a draft (Graph's
    C{send} always saves one), of every MIME C{sendMail}, and of a JSON
    C{sendMail} unless C{saveToSentItems} is false; it is listed only by
    C{internetMessageId} with C{$select=id};
  - a deleted draft takes its upload sessions with it (their URLs answer 404);
  - a created message is answered with its C{id} and C{internetMessageId};
  - a draft may be created from MIME (C{text/plain}, base64, under 4 MB
    like any request, From equal to the mailbox); when it is sent, the
    attachments added to it become parts of the message, as Exchange
    writes them: the original parts and header fields stay as they were,
    and L{Delivery.mime} is the message the recipients get.

A request that breaks a rule gets the error Graph would give, and the rule
is also appended to L{FakeGraph.violations}, which tests expect to be empty.

Faults are scripted per route with L{FakeGraph.script}: error statuses with
Graph error codes and Retry-After, dropped connections, slow answers.

What was "delivered" is in L{FakeGraph.deliveries}: one entry per accepted
message, with the recipients Graph would deliver to.  Given Exchange
Online's sending limits (C{messages_per_minute}, C{recipients_per_day}),
the fake applies them as Exchange does: past either, a message is still
accepted (202) but lands in L{FakeGraph.bounced} instead.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import itertools
import json
import re
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qs, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from smtpproxy import tls
from smtpproxy.mime.message import Email, parse_message

MIB = 1024 * 1024
REQUEST_CAP = 4 * MIB
UPLOAD_MIN = 3_000_000
UPLOAD_MAX = 150 * MIB
RANGE_MAX = 4 * MIB
ATTACHMENT_POST_MAX = 3 * MIB
MAX_RECIPIENTS = 500
MAX_CUSTOM_HEADERS = 5
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Microsoft: keep an assertion's lifetime short, "5-10 minutes after nbf at
# most"; the fake refuses more than this (and records it).
ASSERTION_MAX_LIFETIME = 15 * 60
CLOCK_SKEW = 5 * 60

_SEND_AS_DENIED = (
    "The user account which was used to submit this request does not have the right"
    " to send mail on behalf of the specified sending account."
)
_ADDRESS = re.compile(r"^[^@\s<>\",]+@[^@\s<>\",]+\.[^@\s<>\",]+$")
_MESSAGE_KEYS = frozenset(
    {
        "subject",
        "body",
        "from",
        "toRecipients",
        "ccRecipients",
        "bccRecipients",
        "replyTo",
        "internetMessageHeaders",
        "importance",
        "attachments",
        "singleValueExtendedProperties",
    }
)
# How Graph names a string-valued named property: its type, a GUID, a name.
_PROPERTY_ID = re.compile(
    r"String \{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}"
    r" Name [A-Za-z0-9_.-]{1,64}"
)
# The two lookups of a draft the fake understands (OData string literals,
# a quote written twice); Graph takes many more filters, the relay uses these.
_LITERAL = r"'((?:[^']|'')*)'"
_FILTER_MESSAGE_ID = re.compile(r"internetMessageId eq " + _LITERAL)
_FILTER_PROPERTY = re.compile(
    r"singleValueExtendedProperties/Any\(ep: ep/id eq "
    + _LITERAL
    + r" and ep/value eq "
    + _LITERAL
    + r"\)"
)
_ATTACHMENT_KEYS = frozenset(
    {"@odata.type", "name", "contentType", "contentBytes", "isInline", "contentId"}
)
_ITEM_KEYS = frozenset({"attachmentType", "name", "size", "contentType", "isInline", "contentId"})


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or before) answering one request.

    @ivar status: answer with this error status (0: answer normally).
    @ivar code: the Graph error code (for the token route: the OAuth error).
    @ivar retry_after: a Retry-After header value to send.
    @ivar delay: answer only after this many seconds (on the fake's clock);
        a client that gives up first leaves the request unprocessed.
    @ivar drop: close the connection without answering.
    @ivar after_processing: with C{drop}, carry the request out first (the
        ambiguous case: it worked, but the client never hears so).
    """

    status: int = 0
    code: str = "ServiceUnavailable"
    message: str = "scripted failure"
    retry_after: str | None = None
    delay: float = 0.0
    drop: bool = False
    after_processing: bool = False


@dataclass
class Delivery:
    """One message Graph accepted for delivery."""

    mailbox: str
    method: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    mime: bytes | None = None
    message: dict[str, Any] | None = None
    attachments: list[tuple[str, bytes]] = field(default_factory=list)
    saved_to_sent_items: bool = True

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.to + self.cc + self.bcc

    def copy_for(self, address: str) -> bytes | None:
        """The MIME a recipient's copy would carry (Exchange strips Bcc)."""
        if self.mime is None:
            return None
        head, sep, body = self.mime.partition(b"\r\n\r\n")
        lines = re.split(rb"\r\n(?![ \t])", head)
        kept = [line for line in lines if not line.lower().startswith(b"bcc:")]
        return b"\r\n".join(kept) + sep + body


@dataclass(frozen=True)
class Bounce:
    """A message Graph accepted (202) that Exchange then bounced past a sending limit."""

    delivery: Delivery
    time: float
    status: str
    reason: str


@dataclass
class Seen:
    """One request as the fake received it."""

    route: str
    method: str
    path: str
    headers: dict[str, str]
    size: int
    time: float
    connection: int = 0
    """The serial number of the connection the request came on (1 for the first)."""


@dataclass
class _Session:
    mailbox: str
    draft_id: str
    name: str
    size: int
    token: str
    content_type: str
    received: bytearray = field(default_factory=bytearray)
    done: bool = False


@dataclass
class _Draft:
    """A draft: from JSON (C{message}) or from MIME (C{mime}); what was added to it."""

    mailbox: str
    message: dict[str, Any]
    attachments: list[tuple[str, bytes]] = field(default_factory=list)
    sessions: list[_Session] = field(default_factory=list)
    mime: bytes | None = None
    # (name, content type, data) of every attachment added after creation.
    added: list[tuple[str, str, bytes]] = field(default_factory=list)
    # What Graph reports as internetMessageId: a MIME draft's Message-ID,
    # else one Exchange makes up.
    internet_message_id: str = ""
    # singleValueExtendedProperties set at creation: id -> value.
    properties: dict[str, str] = field(default_factory=dict)


_Answer = tuple[int, dict[str, str], bytes]


class GraphError(Exception):
    """Answer the current request with a Graph error."""

    def __init__(self, status: int, code: str, message: str, violation: bool = False) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.violation = violation


class FakeGraph:
    """Entra ID's token endpoint and the Graph mail API in one resource.

    @param clock: the clock tokens expire and delays run on.
    @param endpoint: the Graph base URL the client is configured with
        (the token scope must be C{{endpoint}}/.default); loopback tests set
        it once they know their port.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        tenant: str = "contoso-tenant",
        client_id: str = "11111111-2222-3333-4444-555555555555",
        client_secret: str | None = "client-secret-value",  # noqa: S107 (a fixture)
        mailboxes: tuple[str, ...] = ("relay@contoso.example",),
        endpoint: str = "http://graph.test",
        token_lifetime: int = 3599,
        certificate: bytes | None = None,
        federated_token: str | None = None,
        managed_client_id: str | None = None,
        identity_header: str | None = None,
        messages_per_minute: int | None = None,
        recipients_per_day: int | None = None,
        minute: float = 60.0,
        day: float = 86_400.0,
    ) -> None:
        """
        @param client_secret: the app's secret, or None when it has none.
        @param certificate: the PEM certificate uploaded to the app: client
            assertions signed with its key are accepted.
        @param federated_token: the workload token a federated credential
            of the app trusts (a real one checks issuer, subject and
            audience; the fake compares the whole token).
        @param managed_client_id: the client id of the user-assigned managed
            identity on this "host" (requests naming another get 400).
        @param identity_header: App Service's secret header value.
        @param messages_per_minute: Exchange's message rate limit per mailbox
            (None: not enforced); C{minute} is its window in seconds.
        @param recipients_per_day: Exchange's recipient rate limit per
            mailbox (None: not enforced); C{day} is its window.
        """
        self.clock = clock
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.certificate = (
            x509.load_pem_x509_certificate(certificate) if certificate is not None else None
        )
        self.federated_token = federated_token
        self.managed_client_id = managed_client_id
        self.identity_header = identity_header
        self.assertions: list[dict[str, Any]] = []
        self.full_mailboxes: set[str] = set()
        self.mailboxes = {m.casefold(): m for m in mailboxes}
        self.endpoint = endpoint
        self.token_lifetime = token_lifetime
        self.requests: list[Seen] = []
        self.deliveries: list[Delivery] = []
        self.violations: list[str] = []
        self.deleted: list[str] = []
        self.faults: dict[str, list[Fault]] = {}
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.tokens: dict[str, float] = {}
        self.drafts: dict[str, _Draft] = {}
        self.sessions: dict[str, _Session] = {}
        # Per mailbox (case-folded): (item id, internetMessageId) of each copy in Sent Items.
        self.sent_items: dict[str, list[tuple[str, str]]] = {}
        self._request_ids: set[str] = set()
        # Serial numbers, not id(): a closed channel's id may be handed to the
        # next one, which would make two connections look like one.
        self._connections: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._serials = itertools.count(1)
        self.messages_per_minute = messages_per_minute
        self.recipients_per_day = recipients_per_day
        self.minute = minute
        self.day = day
        # Per mailbox: (time, recipients) of each message that counted, oldest first.
        self.sent: dict[str, list[tuple[float, int]]] = {}
        self.bounced: list[Bounce] = []
        self.resource = _FakeResource(self)

    # -- test controls ------------------------------------------------------

    def script(self, route: str, *faults: Fault) -> None:
        """Queue faults for the next requests on C{route} (one fault per request)."""
        self.faults.setdefault(route, []).extend(faults)

    def remove_draft(self, draft_id: str) -> None:
        """Delete a draft as anyone may (Outlook, another client): its upload sessions go too."""
        del self.drafts[draft_id]
        for session_id in [k for k, v in self.sessions.items() if v.draft_id == draft_id]:
            del self.sessions[session_id]

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (Graph will answer 401)."""
        for token in self.tokens:
            self.tokens[token] = float("-inf")

    def routes(self, route: str) -> list[Seen]:
        """The requests received on C{route}, in order."""
        return [seen for seen in self.requests if seen.route == route]

    def received_by(self, address: str) -> list[Delivery]:
        """The accepted messages that C{address} receives (once per listing)."""
        key = address.casefold()
        return [
            d for d in self.deliveries for recipient in d.recipients if recipient.casefold() == key
        ]

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        """Listen on 127.0.0.1, a free port; point C{endpoint} at it."""
        site: Any = Site(self.resource)
        port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{port.getHost().port}"
        listening: IListeningPort = port
        return listening

    def listen_tls(self, reactor: Any) -> IListeningPort:
        """Listen with TLS on 127.0.0.1 with L{server_certificate}; C{endpoint} is
        C{https://localhost:<port>} (the certificate's name)."""
        cert, key = server_certificate()
        site: Any = Site(self.resource)
        port: Any = reactor.listenSSL(0, site, tls.server_context(cert, key), interface="127.0.0.1")
        self.endpoint = f"https://localhost:{port.getHost().port}"
        listening: IListeningPort = port
        return listening

    # -- dispatch -----------------------------------------------------------

    def route_of(self, method: str, segments: list[str]) -> tuple[str, dict[str, str]]:
        if segments == ["metadata", "identity", "oauth2", "token"] and method == "GET":
            return "managedToken", {}
        if segments == ["msi", "token"] and method == "GET":
            return "appServiceToken", {}
        if len(segments) == 4 and segments[1:] == ["oauth2", "v2.0", "token"] and method == "POST":
            return "token", {"tenant": segments[0]}
        if segments[:1] == ["upload"] and len(segments) == 2 and method == "PUT":
            return "upload", {"session": segments[1]}
        if segments[:1] == ["upload"] and len(segments) == 2 and method == "GET":
            return "uploadStatus", {"session": segments[1]}
        if len(segments) < 4 or segments[:2] != ["v1.0", "users"]:
            return "unknown", {}
        found = {"mailbox": segments[2]}
        rest = segments[3:]
        if rest == ["mailFolders", "drafts", "messages"] and method == "GET":
            return "findDrafts", found
        # Well-known folder names are not case-sensitive.
        if (
            len(rest) == 3
            and [rest[0], rest[1].casefold(), rest[2]] == ["mailFolders", "sentitems", "messages"]
            and method == "GET"
        ):
            return "findSent", found
        if rest == ["sendMail"] and method == "POST":
            return "sendMail", found
        if rest == ["messages"] and method == "POST":
            return "createDraft", found
        if len(rest) >= 2 and rest[0] == "messages":
            found["id"] = rest[1]
            tail = rest[2:]
            if tail == [] and method == "DELETE":
                return "deleteDraft", found
            if tail == ["attachments"] and method == "POST":
                return "addAttachment", found
            if tail == ["attachments", "createUploadSession"] and method == "POST":
                return "createUploadSession", found
            if tail == ["send"] and method == "POST":
                return "sendDraft", found
        return "unknown", {}

    def answer(self, route: str, params: dict[str, str], request: Request, body: bytes) -> _Answer:
        """Validate and carry out one request; the answer to send."""
        try:
            if route == "token":
                return self._token(params["tenant"], request, body)
            if route in ("managedToken", "appServiceToken"):
                return self._managed_token(route, request)
            if route == "upload":
                return self._upload(params["session"], request, body)
            if route == "uploadStatus":
                return self._upload_status(params["session"], request, body)
            if route == "unknown":
                raise GraphError(400, "BadRequest", "Unsupported request", violation=True)
            mailbox = self._authorize(request, params["mailbox"], body)
            handler: Callable[..., _Answer] = getattr(self, "_" + route)
            return handler(mailbox, params, request, body)
        except GraphError as e:
            if e.violation:
                self.violations.append(f"{route}: {e.code}: {e.message}")
            return _error(e.status, e.code, e.message)

    # -- Entra ID -----------------------------------------------------------

    def _token(self, tenant: str, request: Request, body: bytes) -> _Answer:
        content_type = _header(request, "content-type") or ""
        if not content_type.startswith("application/x-www-form-urlencoded"):
            self.violations.append("token: not form-encoded")
            return _oauth_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            )
        if _header(request, "authorization") is not None:
            self.violations.append("token: Authorization header sent to the token endpoint")
        form = {k: v[-1] for k, v in parse_qs(body.decode("ascii", "replace")).items()}
        if tenant != self.tenant:
            return _oauth_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            self.violations.append("token: grant_type is not client_credentials")
            return _oauth_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        if form.get("client_id") != self.client_id:
            return _oauth_error(
                400, "unauthorized_client", 700016, "Application was not found in the directory."
            )
        if "client_assertion" in form:
            if "client_secret" in form:
                self.violations.append("token: both a secret and an assertion")
            refused = self._check_client_assertion(tenant, form)
            if refused is not None:
                return refused
        elif self.client_secret is None or form.get("client_secret") != self.client_secret:
            return _oauth_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        if form.get("scope") != f"{self.endpoint}/.default":
            self.violations.append(f"token: scope {form.get('scope')!r}")
            return _oauth_error(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid.",
            )
        token = self._issue()
        document = {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()

    def _issue(self) -> str:
        token = f"fake-token-{uuid.uuid4().hex}"
        self.tokens[token] = self.clock.seconds() + self.token_lifetime
        return token

    def _check_client_assertion(self, tenant: str, form: dict[str, str]) -> _Answer | None:
        """A federated token or a certificate-signed assertion: None when accepted."""
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            self.violations.append(
                f"token: client_assertion_type {form.get('client_assertion_type')!r}"
            )
            return _oauth_error(400, "invalid_request", 50027, "Invalid client_assertion_type.")
        assertion = form["client_assertion"]
        if self.federated_token is not None and assertion == self.federated_token:
            return None
        if self.certificate is None:
            return _oauth_error(
                401,
                "invalid_client",
                70021,
                "No matching federated identity record found for presented assertion.",
            )
        audience = f"{self.endpoint}/{tenant}/oauth2/v2.0/token"
        problem = check_assertion(
            assertion,
            self.certificate,
            self.client_id,
            audience,
            self.clock.seconds(),
            {str(a.get("jti")) for a in self.assertions},
        )
        if problem is not None:
            aadsts, text, violation = problem
            if violation:
                self.violations.append(f"token: client assertion: {text}")
            return _oauth_error(401, "invalid_client", aadsts, text)
        self.assertions.append(_jwt_part(assertion, 1))
        return None

    def _managed_token(self, route: str, request: Request) -> _Answer:
        """The instance metadata service's token endpoint (or App Service's)."""
        query = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        if route == "managedToken":
            if _header(request, "metadata") != "true":
                self.violations.append("managedToken: no Metadata: true header")
                return _managed_error(
                    400, "invalid_request", "Required metadata header not specified"
                )
            version = "2018-02-01"
        else:
            if (
                self.identity_header is None
                or _header(request, "x-identity-header") != self.identity_header
            ):
                self.violations.append("appServiceToken: wrong or missing X-IDENTITY-HEADER")
                return _managed_error(401, "invalid_request", "Unauthorized")
            version = "2019-08-01"
        if query.get("api-version") != version:
            self.violations.append(f"{route}: api-version {query.get('api-version')!r}")
            return _managed_error(400, "invalid_request", "Invalid api-version")
        if _header(request, "authorization") is not None:
            self.violations.append(f"{route}: Authorization header sent")
        if query.get("resource") != self.endpoint:
            self.violations.append(f"{route}: resource {query.get('resource')!r}")
            return _managed_error(400, "invalid_resource", "Invalid resource")
        wanted = query.get("client_id")
        if wanted is not None and wanted != self.managed_client_id:
            return _managed_error(400, "invalid_request", "Identity not found")
        token = self._issue()
        expires_on = str(int(self.clock.seconds()) + self.token_lifetime)
        document: dict[str, str] = {
            "access_token": token,
            "expires_on": expires_on,
            "resource": self.endpoint,
            "token_type": "Bearer",
        }
        if route == "managedToken":
            # IMDS sends these as strings; App Service sends only expires_on.
            document.update(
                expires_in=str(self.token_lifetime), not_before=str(int(self.clock.seconds()))
            )
        else:
            document["client_id"] = wanted or "system-assigned"
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()

    # -- Graph --------------------------------------------------------------

    def _authorize(self, request: Request, mailbox: str, body: bytes) -> str:
        authorization = _header(request, "authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.", True)
        expiry = self.tokens.get(token)
        if expiry is None:
            raise GraphError(
                401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.", True
            )
        if self.clock.seconds() >= expiry:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        if len(body) > REQUEST_CAP:
            raise GraphError(413, "RequestEntityTooLarge", "The request body exceeds 4 MB.", True)
        known = self.mailboxes.get(mailbox.casefold())
        if known is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is invalid.")
        return known

    def _sendMail(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        if mailbox.casefold() in self.full_mailboxes:
            raise GraphError(
                413, "ErrorQuotaExceeded", "Mailbox has exceeded maximum mailbox size."
            )
        content_type = _header(request, "content-type") or ""
        if content_type.startswith("text/plain"):
            return self._send_mime(mailbox, body)
        if not content_type.startswith("application/json"):
            raise GraphError(415, "UnsupportedMediaType", content_type, True)
        document = _json(body)
        if not isinstance(document, dict) or set(document) - {"message", "saveToSentItems"}:
            raise GraphError(400, "RequestBodyRead", "Unexpected top-level property.", True)
        message = document.get("message")
        if not isinstance(message, dict):
            raise GraphError(400, "ErrorInvalidParameter", "message is required", True)
        save = document.get("saveToSentItems", True)
        if not isinstance(save, bool):
            raise GraphError(400, "RequestBodyRead", "saveToSentItems must be a Boolean.", True)
        self._check_message(mailbox, message)
        self._check_recipients(message)
        attachments = [self._file_attachment(a) for a in message.get("attachments", [])]
        delivery = self._delivery(mailbox, "json", message, attachments)
        delivery.saved_to_sent_items = save
        if save:
            self._save_sent(mailbox, _made_message_id(""))
        self._accept(delivery)
        return 202, {}, b""

    def _send_mime(self, mailbox: str, body: bytes) -> _Answer:
        mime, parsed, attachments = self._read_mime(mailbox, body, "sendMail")
        to, cc, bcc = (mime_addresses(parsed, name) for name in ("to", "cc", "bcc"))
        self._check_addresses(to + cc + bcc)
        self._save_sent(mailbox, _made_message_id(str(parsed.get("message-id", "")).strip()))
        self._accept(Delivery(mailbox, "mime", to, cc, bcc, mime, None, attachments))
        return 202, {}, b""

    def _save_sent(self, mailbox: str, internet_message_id: str) -> None:
        """Keep the copy Exchange files in the mailbox's Sent Items."""
        item_id = "AAMk" + base64.b64encode(uuid.uuid4().bytes).decode("ascii")
        self.sent_items.setdefault(mailbox.casefold(), []).append((item_id, internet_message_id))

    def _read_mime(
        self, mailbox: str, body: bytes, route: str
    ) -> tuple[bytes, EmailMessage, list[tuple[str, bytes]]]:
        """Decode and check a base64 MIME body as Graph does (sendMail and MIME drafts)."""
        try:
            mime = base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
                True,
            ) from None
        try:
            parsed = parse_mime(mime)
            attachments = mime_attachments(parsed)
        except Exception:
            raise GraphError(
                400, "ErrorMimeContentInvalid", "The MIME content is invalid."
            ) from None
        eight_bit = sorted({k for k, v in parsed.raw_items() if not v.isascii()})
        if eight_bit:
            # Graph takes the message and shows these fields garbled: no
            # error to answer with, but the relay broke the rule.
            self.violations.append(
                f"{route}: 8-bit bytes in MIME header fields {', '.join(eight_bit)}"
            )
        senders = mime_addresses(parsed, "from")
        if [s.casefold() for s in senders] not in ([], [mailbox.casefold()]):
            raise GraphError(
                403,
                "ErrorSendAsDenied",
                _SEND_AS_DENIED,
                True,
            )
        self._check_addresses(mime_addresses(parsed, "reply-to"), allow_none=True)
        return mime, parsed, attachments

    def _createDraft(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        draft_id = "AAMk" + base64.b64encode(uuid.uuid4().bytes).decode("ascii")
        if (_header(request, "content-type") or "").startswith("text/plain"):
            mime, parsed, attachments = self._read_mime(mailbox, body, "createDraft")
            message = {"subject": str(parsed.get("subject", ""))}
            draft = self.drafts[draft_id] = _Draft(
                mailbox,
                message,
                attachments,
                mime=mime,
                internet_message_id=_made_message_id(str(parsed.get("message-id", "")).strip()),
            )
            return _created(draft_id, draft)
        _require_json(request)
        message = _json(body)
        if not isinstance(message, dict):
            raise GraphError(400, "RequestBodyRead", "Expected a message object.", True)
        self._check_message(mailbox, message)
        attachments = [self._file_attachment(a) for a in message.get("attachments", [])]
        # _check_message has checked the shape: a list of {"id": str, "value": str}.
        given: Any = message.pop("singleValueExtendedProperties", [])
        properties: dict[str, str] = {p["id"]: p["value"] for p in given}
        draft = self.drafts[draft_id] = _Draft(
            mailbox,
            message,
            attachments,
            internet_message_id=_made_message_id(""),
            properties=properties,
        )
        return _created(draft_id, draft)

    def _draft(self, mailbox: str, params: dict[str, str]) -> _Draft:
        draft = self.drafts.get(params["id"])
        if draft is None or draft.mailbox != mailbox:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return draft

    def _addAttachment(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        _require_json(request)
        draft = self._draft(mailbox, params)
        document = _json(body)
        name, data = self._file_attachment(document)
        if len(data) > ATTACHMENT_POST_MAX:
            raise GraphError(
                413,
                "ErrorAttachmentSizeLimitExceeded",
                "Use an upload session for attachments of 3 MB or more.",
                True,
            )
        draft.attachments.append((name, data))
        draft.added.append((name, str(document.get("contentType", "")), data))
        return (
            201,
            {"Content-Type": "application/json"},
            json.dumps({"id": uuid.uuid4().hex}).encode(),
        )

    def _createUploadSession(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        _require_json(request)
        draft = self._draft(mailbox, params)
        document = _json(body)
        item = document.get("AttachmentItem") if isinstance(document, dict) else None
        if (
            not isinstance(item, dict)
            or set(document) != {"AttachmentItem"}
            or set(item) - _ITEM_KEYS
        ):
            raise GraphError(400, "RequestBodyRead", "Expected an AttachmentItem.", True)
        size = item.get("size")
        if (
            item.get("attachmentType") != "file"
            or not isinstance(item.get("name"), str)
            or not isinstance(size, int)
        ):
            raise GraphError(
                400, "ErrorInvalidParameter", "attachmentType, name and size are required.", True
            )
        if size < UPLOAD_MIN:
            raise GraphError(
                400,
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                "Attachment size should not be less than 3 MB.",
                True,
            )
        if size > UPLOAD_MAX:
            raise GraphError(
                400, "ErrorAttachmentSizeLimitExceeded", "Attachments are limited to 150 MB.", True
            )
        session_id = uuid.uuid4().hex
        session = _Session(
            mailbox,
            params["id"],
            item["name"],
            size,
            uuid.uuid4().hex,
            str(item.get("contentType", "")),
        )
        self.sessions[session_id] = session
        draft.sessions.append(session)
        document = {
            "@odata.context": f"{self.endpoint}/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": f"{self.endpoint}/upload/{session_id}?authtoken={session.token}",
            "expirationDateTime": "2030-01-01T00:00:00Z",
            "nextExpectedRanges": ["0-"],
        }
        return 201, {"Content-Type": "application/json"}, json.dumps(document).encode()

    def _session(self, session_id: str, request: Request) -> _Session:
        """The upload session a request on its URL names, checked as Graph checks it:
        the URL's own credential, never a bearer token."""
        session = self.sessions.get(session_id)
        if session is None:
            raise GraphError(404, "ErrorItemNotFound", "Upload session not found.")
        if _header(request, "authorization") is not None:
            raise GraphError(
                400,
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated; do not send an Authorization header.",
                True,
            )
        if request.args.get(b"authtoken", []) != [session.token.encode()]:
            raise GraphError(401, "InvalidAuthenticationToken", "Bad upload token.", True)
        return session

    def _upload(self, session_id: str, request: Request, body: bytes) -> _Answer:
        session = self._session(session_id, request)
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", _header(request, "content-range") or "")
        if match is None:
            raise GraphError(400, "InvalidRange", "Content-Range is required.", True)
        first, last, total = (int(g) for g in match.groups())
        if session.done or total != session.size or first != len(session.received):
            # Sending again, byte for byte, a range Graph already has is what a
            # client does after a lost answer: refused all the same, but no
            # mistake; anything else out of order is.
            repeat = (
                total == session.size
                and last < len(session.received)
                and session.received[first : last + 1] == body
            )
            raise GraphError(
                416,
                "InvalidRange",
                f"Expected bytes from {len(session.received)} of {session.size}.",
                not repeat,
            )
        if last - first + 1 != len(body) or len(body) > RANGE_MAX or last >= total:
            raise GraphError(
                400, "InvalidRange", "Range and body do not agree, or range over 4 MB.", True
            )
        session.received += body
        if len(session.received) < session.size:
            document = {
                "expirationDateTime": "2030-01-01T00:00:00Z",
                "nextExpectedRanges": [str(len(session.received))],
            }
            return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()
        session.done = True
        draft = self.drafts[session.draft_id]
        draft.attachments.append((session.name, bytes(session.received)))
        draft.added.append((session.name, session.content_type, bytes(session.received)))
        return 201, {"Location": f"{self.endpoint}/attachments/{uuid.uuid4().hex}"}, b""

    def _upload_status(self, session_id: str, request: Request, body: bytes) -> _Answer:
        """A GET of an upload URL: where the session stands (C{nextExpectedRanges}).

        Checked as strictly as a range: the URL's own credential, no bearer
        token, no body.  Once the last range is in, the session has become
        the attachment and is gone (404): the fake does not guess at more.
        """
        session = self._session(session_id, request)
        if body:
            raise GraphError(400, "RequestBodyRead", "GET takes no body.", True)
        if session.done:
            raise GraphError(404, "ErrorItemNotFound", "Upload session not found.")
        document = {
            "expirationDateTime": "2030-01-01T00:00:00Z",
            "nextExpectedRanges": [str(len(session.received))],
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()

    def _findDrafts(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        """List the mailbox's drafts matching one of the filters the relay uses (ids only)."""
        condition, top = _list_query(request, body)
        by_id = _FILTER_MESSAGE_ID.fullmatch(condition)
        by_property = _FILTER_PROPERTY.fullmatch(condition)
        if by_id is not None:
            wanted = by_id.group(1).replace("''", "'")

            def matches(draft: _Draft) -> bool:
                return draft.internet_message_id == wanted

        elif by_property is not None and _PROPERTY_ID.fullmatch(by_property.group(1)):
            name, value = (by_property.group(i).replace("''", "'") for i in (1, 2))

            def matches(draft: _Draft) -> bool:
                # Graph compares a string property's value without regard to case.
                return draft.properties.get(name, "").casefold() == value.casefold()

        else:
            raise GraphError(
                400,
                "ErrorInvalidUrlQueryFilter",
                "The query filter contains one or more invalid nodes.",
                True,
            )
        found = [
            i for i, draft in self.drafts.items() if draft.mailbox == mailbox and matches(draft)
        ]
        return self._listed(mailbox, "drafts", found[:top])

    def _findSent(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        """List the copies in the mailbox's Sent Items with one internetMessageId (ids only)."""
        condition, top = _list_query(request, body)
        by_id = _FILTER_MESSAGE_ID.fullmatch(condition)
        if by_id is None:
            raise GraphError(
                400,
                "ErrorInvalidUrlQueryFilter",
                "The query filter contains one or more invalid nodes.",
                True,
            )
        wanted = by_id.group(1).replace("''", "'")
        found = [i for i, m in self.sent_items.get(mailbox.casefold(), []) if m == wanted]
        return self._listed(mailbox, "sentitems", found[:top])

    def _listed(self, mailbox: str, folder: str, ids: list[str]) -> _Answer:
        """A folder listing's answer with C{$select=id}, as Graph writes it."""
        document = {
            "@odata.context": f"{self.endpoint}/v1.0/$metadata#users('{mailbox}')/mailFolders"
            f"('{folder}')/messages(id)",
            "value": [{"@odata.etag": 'W/"fake"', "id": i} for i in ids],
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()

    def _sendDraft(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        draft = self._draft(mailbox, params)
        if body:
            raise GraphError(400, "RequestBodyRead", "send takes no body.", True)
        if not all(s.done for s in draft.sessions):
            raise GraphError(
                400, "ErrorInvalidOperation", "An attachment upload is incomplete.", True
            )
        if draft.mime is not None:
            mime = with_attachments(draft.mime, draft.added)
            parsed = parse_mime(mime)
            to, cc, bcc = (mime_addresses(parsed, name) for name in ("to", "cc", "bcc"))
            self._check_addresses(to + cc + bcc)
            self.remove_draft(params["id"])
            # Sending a draft always files it in Sent Items (no saveToSentItems here).
            self._save_sent(mailbox, draft.internet_message_id)
            delivery = Delivery(
                mailbox, "mime-draft", to, cc, bcc, mime, None, mime_attachments(parsed)
            )
            self._accept(delivery)
            return 202, {}, b""
        self._check_recipients(draft.message)
        self.remove_draft(params["id"])
        self._save_sent(mailbox, draft.internet_message_id)
        self._accept(self._delivery(mailbox, "draft", draft.message, draft.attachments))
        return 202, {}, b""

    def _deleteDraft(
        self, mailbox: str, params: dict[str, str], request: Request, body: bytes
    ) -> _Answer:
        self._draft(mailbox, params)
        self.remove_draft(params["id"])
        self.deleted.append(params["id"])
        return 204, {}, b""

    # -- checks -------------------------------------------------------------

    def _check_message(self, mailbox: str, message: dict[str, Any]) -> None:
        extra = set(message) - _MESSAGE_KEYS
        if extra:
            raise GraphError(
                400,
                "RequestBodyRead",
                f"The property '{sorted(extra)[0]}' does not exist on type message.",
                True,
            )
        if not isinstance(message.get("subject", ""), str):
            raise GraphError(400, "RequestBodyRead", "subject must be a string.", True)
        body = message.get("body", {"contentType": "Text", "content": ""})
        if (
            not isinstance(body, dict)
            or set(body) != {"contentType", "content"}
            or body["contentType"] not in ("Text", "HTML")
            or not isinstance(body["content"], str)
        ):
            raise GraphError(400, "RequestBodyRead", "Invalid body.", True)
        for key in ("toRecipients", "ccRecipients", "bccRecipients", "replyTo"):
            value = message.get(key, [])
            if not isinstance(value, list):
                raise GraphError(400, "RequestBodyRead", f"{key} must be a list.", True)
            self._check_addresses(tuple(_recipient(r) for r in value), allow_none=True)
        if "from" in message and _recipient(message["from"]).casefold() != mailbox.casefold():
            raise GraphError(
                403,
                "ErrorSendAsDenied",
                _SEND_AS_DENIED,
                True,
            )
        headers = message.get("internetMessageHeaders", [])
        if not isinstance(headers, list) or len(headers) > MAX_CUSTOM_HEADERS:
            raise GraphError(
                400,
                "InvalidInternetMessageHeaderCollection",
                "Maximum number of headers in one message should be less than or equal to 5.",
                True,
            )
        for header in headers:
            if (
                not isinstance(header, dict)
                or set(header) != {"name", "value"}
                or not all(isinstance(v, str) for v in header.values())
            ):
                raise GraphError(400, "RequestBodyRead", "Invalid internet message header.", True)
            if not header["name"].lower().startswith("x-"):
                raise GraphError(
                    400,
                    "InvalidInternetMessageHeader",
                    f"The header name '{header['name']}' should start with 'x-' or 'X-'.",
                    True,
                )
        if message.get("importance", "normal") not in ("low", "normal", "high"):
            raise GraphError(400, "RequestBodyRead", "Invalid importance.", True)
        if not isinstance(message.get("attachments", []), list):
            raise GraphError(400, "RequestBodyRead", "attachments must be a list.", True)
        properties = message.get("singleValueExtendedProperties", [])
        if not isinstance(properties, list) or not all(
            isinstance(p, dict)
            and set(p) == {"id", "value"}
            and isinstance(p["id"], str)
            and _PROPERTY_ID.fullmatch(p["id"])
            and isinstance(p["value"], str)
            for p in properties
        ):
            raise GraphError(400, "RequestBodyRead", "Invalid singleValueExtendedProperties.", True)

    def _check_recipients(self, message: dict[str, Any]) -> None:
        everyone = tuple(
            _recipient(r)
            for key in ("toRecipients", "ccRecipients", "bccRecipients")
            for r in message.get(key, [])
        )
        self._check_addresses(everyone)

    def _check_addresses(self, addresses: tuple[str, ...], allow_none: bool = False) -> None:
        if not addresses and not allow_none:
            raise GraphError(
                400,
                "ErrorInvalidRecipients",
                "A message can't be sent because it contains no recipients.",
            )
        if len(addresses) > MAX_RECIPIENTS:
            raise GraphError(
                400,
                "ErrorTooManyRecipients",
                "A message can't have more than 500 recipients.",
                True,
            )
        for address in addresses:
            if not graph_accepts(address):
                raise GraphError(
                    400,
                    "ErrorInvalidRecipients",
                    f"At least one recipient isn't valid: {address!r}.",
                    # A Unicode domain is the relay's mistake (it must send
                    # A-labels), not the client's.
                    violation=not address.rpartition("@")[2].isascii(),
                )

    def _file_attachment(self, document: Any) -> tuple[str, bytes]:
        if not isinstance(document, dict) or set(document) - _ATTACHMENT_KEYS:
            raise GraphError(400, "RequestBodyRead", "Invalid attachment.", True)
        if document.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise GraphError(
                400, "ErrorInvalidParameter", "Only file attachments are expected.", True
            )
        name = document.get("name")
        if not isinstance(name, str) or not name:
            raise GraphError(400, "ErrorInvalidParameter", "An attachment needs a name.", True)
        try:
            data = base64.b64decode(document.get("contentBytes", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise GraphError(
                400, "ErrorInvalidParameter", "contentBytes is not base64.", True
            ) from None
        return name, data

    def _delivery(
        self,
        mailbox: str,
        method: str,
        message: dict[str, Any],
        attachments: list[tuple[str, bytes]],
    ) -> Delivery:
        to, cc, bcc = (
            tuple(_recipient(r) for r in message.get(key, []))
            for key in ("toRecipients", "ccRecipients", "bccRecipients")
        )
        return Delivery(
            mailbox, method, to, cc, bcc, message=message, attachments=list(attachments)
        )

    def _accept(self, delivery: Delivery) -> None:
        """Graph has answered 202: Exchange delivers it, or bounces it past a sending limit.

        Exchange Online counts each mailbox's messages in the last minute and
        recipients in the last 24 hours; a message over either is accepted
        and then bounced (an NDR into the sending mailbox, status 5.2.0),
        which the client never hears of: here it lands in L{bounced}.
        """
        now = self.clock.seconds()
        sent = self.sent.setdefault(delivery.mailbox.casefold(), [])
        horizon = max(self.minute, self.day)
        sent[:] = [(at, n) for at, n in sent if now - at < horizon]
        last_minute = sum(1 for at, _ in sent if now - at < self.minute)
        last_day = sum(n for at, n in sent if now - at < self.day)
        count = len(delivery.recipients)
        if self.messages_per_minute is not None and last_minute + 1 > self.messages_per_minute:
            self.bounced.append(Bounce(delivery, now, "5.2.0", "message rate limit"))
        elif self.recipients_per_day is not None and last_day + count > self.recipients_per_day:
            self.bounced.append(Bounce(delivery, now, "5.2.0", "recipient rate limit"))
        else:
            sent.append((now, count))
            self.deliveries.append(delivery)

    # -- bookkeeping --------------------------------------------------------

    def _connection_number(self, channel: object) -> int:
        number = self._connections.get(channel)
        if number is None:
            number = self._connections[channel] = next(self._serials)
        return number

    def begin(self, route: str, request: Request, body: bytes) -> str | None:
        """Record a request; return the mailbox it counts against, if any."""
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append(
            Seen(
                route,
                request.method.decode(),
                request.path.decode(),
                headers,
                len(body),
                self.clock.seconds(),
                self._connection_number(request.channel),
            )
        )
        crid = headers.get("client-request-id")
        try:
            uuid.UUID(crid or "")
        except ValueError:
            self.violations.append(f"{route}: client-request-id missing or not a GUID")
        else:
            if crid in self._request_ids:
                self.violations.append(f"{route}: client-request-id {crid} reused")
            self._request_ids.add(crid or "")
        if request.method in (b"POST", b"PUT") and request.getHeader(b"content-length") is None:
            self.violations.append(f"{route}: no Content-Length")
        mailbox: str | None = None
        segments = [unquote(s) for s in request.path.decode().split("/")[1:]]
        if segments[:2] == ["v1.0", "users"] and len(segments) > 2:
            mailbox = segments[2].casefold()
        elif (
            route in ("upload", "uploadStatus")
            and len(segments) == 2
            and segments[1] in self.sessions
        ):
            mailbox = self.sessions[segments[1]].mailbox.casefold()
        if mailbox is not None:
            self.in_flight[mailbox] += 1
            self.max_in_flight[mailbox] = max(self.max_in_flight[mailbox], self.in_flight[mailbox])
        return mailbox

    def end(self, mailbox: str | None) -> None:
        if mailbox is not None:
            self.in_flight[mailbox] -= 1


class _FakeResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeGraph) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes | int:
        fake = self.fake
        content: Any = request.content
        content.seek(0)
        body: bytes = content.read()
        method = request.method.decode()
        segments = [unquote(s) for s in request.path.decode().split("/")[1:]]
        route, params = fake.route_of(method, segments)
        mailbox = fake.begin(route, request, body)
        queue = fake.faults.get(route) or []
        fault = queue.pop(0) if queue else Fault()
        state = {"open": True, "ended": False}

        def finish() -> None:
            if not state["ended"]:
                state["ended"] = True
                fake.end(mailbox)

        def lost(_: Failure) -> None:
            state["open"] = False
            finish()

        request.notifyFinish().addErrback(lost)

        def respond() -> None:
            if not state["open"]:
                finish()
                return
            if fault.drop:
                if fault.after_processing:
                    fake.answer(route, params, request, body)
                finish()
                transport: Any = request.channel.transport
                transport.abortConnection()
                return
            if fault.status:
                answer = _fault_answer(route, fault)
            else:
                answer = fake.answer(route, params, request, body)
            status, headers, payload = answer
            request.setResponseCode(status)
            crid = _header(request, "client-request-id")
            request.setHeader(b"request-id", str(uuid.uuid4()).encode())
            if crid is not None:
                request.setHeader(b"client-request-id", crid.encode())
            for name, value in headers.items():
                request.setHeader(name.encode(), value.encode())
            request.setHeader(b"content-length", str(len(payload)).encode())
            finish()
            if payload:
                request.write(payload)
            request.finish()

        if fault.delay > 0:
            call: IDelayedCall = fake.clock.callLater(fault.delay, respond)

            def cancel(_: Failure) -> None:
                if call.active():
                    call.cancel()

            request.notifyFinish().addErrback(cancel)
        else:
            respond()
        return NOT_DONE_YET


def _created(draft_id: str, draft: _Draft) -> _Answer:
    """A created message's answer: Graph returns the message, id and internetMessageId among it."""
    document = {
        "id": draft_id,
        "isDraft": True,
        "subject": draft.message.get("subject", ""),
        "internetMessageId": draft.internet_message_id,
    }
    return 201, {"Content-Type": "application/json"}, json.dumps(document).encode()


def _list_query(request: Request, body: bytes) -> tuple[str, int]:
    """The C{$filter} and C{$top} of a message listing; only what the relay needs is taken
    (C{$filter}, C{$select=id}, C{$top}), anything else is a mistake."""
    if body:
        raise GraphError(400, "RequestBodyRead", "GET takes no body.", True)
    query = {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()}
    unknown = set(query) - {"$filter", "$select", "$top"}
    if unknown or any(len(v) != 1 for v in query.values()):
        raise GraphError(400, "BadRequest", f"Unexpected query options {sorted(unknown)}.", True)
    top = query.get("$top", ["10"])[0]
    if not top.isdigit() or not 1 <= int(top) <= 1000:
        raise GraphError(400, "BadRequest", "Invalid $top.", True)
    if query.get("$select", ["id"]) != ["id"]:
        raise GraphError(400, "BadRequest", "The relay needs only $select=id.", True)
    return query.get("$filter", [""])[0], int(top)


def _made_message_id(given: str) -> str:
    """The internetMessageId of a new draft: its own Message-ID, else one Exchange makes."""
    return given or f"<{uuid.uuid4().hex}@fake.outlook.example>"


def _fault_answer(route: str, fault: Fault) -> _Answer:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    if route == "token":
        status, error, payload = _oauth_error(fault.status, fault.code, 50001, fault.message)
        return status, {**error, **headers}, payload
    status, error, payload = _error(fault.status, fault.code, fault.message)
    return status, {**error, **headers}, payload


def _error(status: int, code: str, message: str) -> _Answer:
    document = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": "2030-01-01T00:00:00",
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4()),
            },
        }
    }
    return status, {"Content-Type": "application/json"}, json.dumps(document).encode()


def _oauth_error(status: int, error: str, aadsts: int, text: str) -> _Answer:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    description = f"AADSTS{aadsts}: {text} Trace ID: {trace} Correlation ID: {correlation}"
    document = {
        "error": error,
        "error_description": description,
        "error_codes": [aadsts],
        "timestamp": "2030-01-01 00:00:00Z",
        "trace_id": trace,
        "correlation_id": correlation,
    }
    return status, {"Content-Type": "application/json"}, json.dumps(document).encode()


def _header(request: Request, name: str) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _require_json(request: Request) -> None:
    if not (_header(request, "content-type") or "").startswith("application/json"):
        raise GraphError(415, "UnsupportedMediaType", "Expected application/json.", True)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise GraphError(400, "RequestBodyRead", "Body is not JSON.", True) from None


def _recipient(value: Any) -> str:
    if not isinstance(value, dict) or set(value) != {"emailAddress"}:
        raise GraphError(400, "RequestBodyRead", "Invalid recipient.", True)
    address = value["emailAddress"]
    if (
        not isinstance(address, dict)
        or set(address) - {"address", "name"}
        or not isinstance(address.get("address"), str)
    ):
        raise GraphError(400, "RequestBodyRead", "Invalid emailAddress.", True)
    if not isinstance(address.get("name", ""), str):
        raise GraphError(400, "RequestBodyRead", "Invalid name.", True)
    result: str = address["address"]
    return result


def graph_accepts(address: str) -> bool:
    """Whether Graph takes C{address} as a recipient or Reply-To (else ErrorInvalidRecipients).

    A UTF-8 local part is accepted (Exchange Online sends to EAI addresses);
    the domain must be ASCII, internationalised domains as A-labels: that is
    the form docs/graph.md says the relay sends, so the fake holds it to it.
    """
    return bool(_ADDRESS.match(address)) and address.rpartition("@")[2].isascii()


def parse_mime(mime: bytes) -> EmailMessage:
    """The message as Graph reads it; the standard library's parser stands in for Graph's.

    It ends the header block at the first line that is not a field (a
    broken fold, a stray sentence) and splits lines at CRLF, bare CR and
    bare LF: a field the relay writes below such a line is not seen.
    """
    message = BytesParser(policy=policy.default).parsebytes(mime)
    assert isinstance(message, EmailMessage)  # what policy.default builds
    return message


def mime_addresses(message: EmailMessage, name: str) -> tuple[str, ...]:
    """Every address in the message's C{name} fields, as Graph would read them.

    The structured parser (groups, encoded words, comments) decides; where
    it fails on a damaged value, the lenient one reads what it can.
    """
    found: list[str] = []
    for key, value in message.raw_items():
        if key.lower() != name:
            continue
        try:
            header: Any = policy.default.header_factory(key, value)
            found += [a.addr_spec for a in header.addresses if a.addr_spec not in ("", "<>")]
        except Exception:
            unfolded = re.sub(r"[\r\n]", "", value)
            found += [address for _, address in getaddresses([unfolded]) if address]
    return tuple(found)


def mime_attachments(message: EmailMessage) -> list[tuple[str, bytes]]:
    """The attachments a recipient would see: every leaf with a file name, an
    attachment disposition or non-text content, decoded; embedded messages
    are opened, as a mail reader opens them."""
    found: list[tuple[str, bytes]] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() == "multipart":
            continue  # a container (one whose parts could not be found holds none)
        named = part.get_filename()
        if named is None and part.get_content_maintype() == "text" and not part.is_attachment():
            continue
        try:
            data = part.get_payload(decode=True)
        except Exception:
            data = None
        if not isinstance(data, bytes):
            data = str(part.get_payload()).encode("utf-8", "surrogateescape")
        found.append((named or "", data))
    return found


def with_attachments(mime: bytes, added: list[tuple[str, str, bytes]]) -> bytes:
    """The message a MIME draft becomes once sent: its bytes, then the added attachments.

    Exchange keeps a MIME draft's structure and header fields (it stores
    the MIME skeleton, MS-OXCMAIL 2.1.3.5) and writes added attachments as
    further parts of a multipart/mixed.  The original bytes stay as they
    are: a multipart/mixed root gets the parts before its closing boundary;
    any other root becomes the first part of a new multipart/mixed whose
    header block is the original one (less its Content- fields, which move
    down to that first part).
    """
    if not added:
        return mime
    parsed = parse_mime(mime)
    head, sep, body = mime.partition(b"\r\n\r\n")
    boundary = parsed.get_boundary() if parsed.get_content_type() == "multipart/mixed" else None
    if boundary is not None:
        closing = b"\r\n--" + boundary.encode("ascii") + b"--"
        at = body.rfind(closing)
        if at >= 0:
            parts = b"".join(_attachment_part(boundary, *attachment) for attachment in added)
            return head + sep + body[:at] + b"\r\n" + parts.removesuffix(b"\r\n") + body[at:]
    outer = "=_fake_graph_" + uuid.uuid4().hex
    parts = b"".join(_attachment_part(outer, *attachment) for attachment in added)
    lines = re.split(rb"\r\n(?![ \t])", head)
    content = [line for line in lines if line.lower().startswith(b"content-")]
    kept = [line for line in lines if not line.lower().startswith(b"content-")]
    first = b"\r\n".join(content) + b"\r\n\r\n" + body
    return (
        b"\r\n".join(kept)
        + f'\r\nContent-Type: multipart/mixed; boundary="{outer}"\r\n\r\n'.encode()
        + f"--{outer}\r\n".encode()
        + first
        + b"\r\n"
        + parts
        + f"--{outer}--\r\n".encode()
    )


def _attachment_part(boundary: str, name: str, content_type: str, data: bytes) -> bytes:
    """One attachment as a MIME part, opened by its boundary line."""
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    header = (
        f"--{boundary}\r\nContent-Type: {content_type or 'application/octet-stream'}\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    return header.encode() + encoded


def make_email(
    envelope_to: tuple[str, ...],
    *,
    from_: str | None = "App Server <app@example.org>",
    to: tuple[str, ...] = (),
    cc: tuple[str, ...] = (),
    bcc: tuple[str, ...] = (),
    subject: str = "Quarterly report",
    text: str = "Hello,\nthe report is attached.\n",
    html: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    attachments: tuple[tuple[str, bytes], ...] = (),
    envelope_from: str = "app@example.org",
) -> Email:
    """A message as a client would send it, parsed by the real parser."""
    message = EmailMessage()
    if from_ is not None:
        message["From"] = from_
    for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc)):
        if values:
            message[name] = ", ".join(values)
    message["Subject"] = subject
    message["Message-ID"] = "<report-42@example.org>"
    for name, value in headers:
        message[name] = value
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for filename, data in attachments:
        message.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=filename
        )
    raw = message.as_bytes(policy=policy.SMTP)
    return parse_message(envelope_from, list(envelope_to), raw)


def _managed_error(status: int, error: str, description: str) -> _Answer:
    document = {"error": error, "error_description": description}
    return status, {"Content-Type": "application/json"}, json.dumps(document).encode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt_part(token: str, index: int) -> dict[str, Any]:
    try:
        document = json.loads(_b64url_decode(token.split(".")[index]))
    except (ValueError, IndexError, binascii.Error):
        return {}
    return document if isinstance(document, dict) else {}


def check_assertion(
    assertion: str,
    certificate: x509.Certificate,
    client_id: str,
    audience: str,
    now: float,
    seen_jti: set[str],
) -> tuple[int, str, bool] | None:
    """Check a client assertion as Entra does: None, or (AADSTS code, text, relay's fault).

    Written from Microsoft's "certificate credentials" page, independently
    of the relay's signer: the header's algorithm and thumbprint, the
    signature against the registered certificate's public key, the
    audience, issuer and subject, a fresh C{jti}, and a short validity that
    includes C{now}.
    """
    parts = assertion.split(".")
    if len(parts) != 3:
        return 50027, "JWT token is invalid or malformed.", True
    header, claims = _jwt_part(assertion, 0), _jwt_part(assertion, 1)
    try:
        signature = _b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        return 50027, "JWT signature is not base64url.", True
    der = certificate.public_bytes(serialization.Encoding.DER)
    sha256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    if header.get("typ") != "JWT":
        return 50027, f"typ {header.get('typ')!r} is not JWT.", True
    if header.get("x5t#S256") != sha256:
        return (
            700027,
            "The certificate with identifier used to sign the client assertion is not"
            " registered on application.",
            False,
        )
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    algorithm = header.get("alg")
    scheme: padding.AsymmetricPadding
    if algorithm == "PS256":
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    elif algorithm == "RS256":
        scheme = padding.PKCS1v15()
    else:
        return 50027, f"alg {algorithm!r} is not PS256 or RS256.", True
    try:
        public.verify(signature, signed, scheme, hashes.SHA256())
    except InvalidSignature:
        return 700027, "Client assertion failed signature validation.", False
    if claims.get("aud") != audience:
        return 700027, f"The audience {claims.get('aud')!r} is not {audience!r}.", True
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return 700027, "iss and sub must both be the client id.", True
    jti = claims.get("jti")
    try:
        uuid.UUID(str(jti))
    except ValueError:
        return 700027, "jti is not a GUID.", True
    if jti in seen_jti:
        return 700027, "The jti of the client assertion was used before.", True
    numbers = [claims.get(k) for k in ("nbf", "exp", "iat")]
    if not all(isinstance(n, int) for n in numbers):
        return 700027, "nbf, exp and iat must be whole seconds.", True
    nbf, exp, _ = numbers
    assert isinstance(nbf, int) and isinstance(exp, int)
    if exp - nbf > ASSERTION_MAX_LIFETIME:
        return 700027, f"The assertion is valid for {exp - nbf} s: keep it short.", True
    if not nbf - CLOCK_SKEW <= now < exp + CLOCK_SKEW:
        return 700024, "Client assertion is not within its valid time range.", True
    return None


_RSA: dict[str, tuple[bytes, bytes]] = {}
_SERVER: list[tuple[bytes, bytes]] = []


def server_certificate() -> tuple[bytes, bytes]:
    """The fake's TLS certificate (for localhost and 127.0.0.1), made once per run."""
    if not _SERVER:
        _SERVER.append(tls.self_signed("localhost"))
    return _SERVER[0]


def client_certificate(
    name: str = "relay", password: bytes | None = None, *, valid_days: int = 365
) -> tuple[bytes, bytes]:
    """An app's RSA certificate: (the PEM file the relay reads, the certificate alone).

    The file holds the certificate then the key (encrypted with C{password}
    when given), as C{openssl req -x509 ... -out} and a key appended give.
    Keys are made once per name and run; C{valid_days} (from now) is part of
    the name, so a short-lived certificate has its own key.
    """
    if valid_days != 365:
        name = f"{name}/{valid_days}"
    if name not in _RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"smtpproxy {name}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _RSA[name] = (cert.public_bytes(serialization.Encoding.PEM), key_pem)
    cert_pem, key_pem = _RSA[name]
    if password is not None:
        loaded = serialization.load_pem_private_key(key_pem, None)
        key_pem = loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
    return cert_pem + key_pem, cert_pem
