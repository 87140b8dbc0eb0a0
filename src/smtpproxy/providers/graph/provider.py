"""The Microsoft Graph provider: Twisted and treq glue around the Graph cores.

The decisions live in pure modules: L{smtpproxy.providers.graph.payload} chooses and
builds the requests, L{smtpproxy.providers.graph.retry} decides whether and when to
retry, L{smtpproxy.providers.graph.tokens} caches the access token.  This module only
carries them out: it sends HTTP requests through one persistent connection
pool, waits on the injected reactor, and keeps at most
C{GRAPH_MAX_CONCURRENCY} requests in flight per mailbox.

Every message has a time budget (C{GRAPH_SEND_TIMEOUT}) that covers queueing,
the token, every request and every wait between retries; when it runs out
the message fails with a 451 and the SMTP client retries later.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    gatherResults,
    succeed,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from smtpproxy.config import Config
from smtpproxy.errors import TransientDeliveryError
from smtpproxy.mime.message import Email
from smtpproxy.providers.graph.agentclient import ON_THE_WIRE, AgentClient, pooled_agent
from smtpproxy.providers.graph.budgetkeeper import BudgetKeeper, Charge
from smtpproxy.providers.graph.credentials import (
    CredentialError,
    credential_for,
    credential_warning,
)
from smtpproxy.providers.graph.drafts import (
    MAX_RESUMES,
    Deletion,
    deletion_outcome,
    found_ids,
    gone_draft_error,
    in_sent_items,
    internet_message_id,
    lookup_filter,
    lookup_url,
    resume_at,
    sent_although_failed,
    sent_lookup_url,
    strays,
    tag_json_draft,
)
from smtpproxy.providers.graph.draftturns import DraftTurns, TurnKey, turn_key
from smtpproxy.providers.graph.handshake import HandshakeFailedError
from smtpproxy.providers.graph.payload import (
    MAX_RECIPIENTS,
    UPLOAD_CHUNK,
    DraftSend,
    GraphUrls,
    JsonSend,
    MimeSend,
    Plan,
    Recipients,
    Upload,
    bound_mailbox,
    content_range,
    json_fallback,
    matching_mailbox,
    plan_delivery,
    plan_recipients,
)
from smtpproxy.providers.graph.proxyconfig import parse_no_proxy, parse_proxy
from smtpproxy.providers.graph.retry import (
    QUOTA_CODES,
    GraphRequestError,
    Problem,
    Stop,
    Tuning,
    decide,
    network_problem,
    parse_graph_error,
    parse_retry_after,
    response_problem,
)
from smtpproxy.providers.graph.settings import (
    CREDENTIAL_NAMES,
    GraphSettings,
)
from smtpproxy.providers.graph.slots import SlotGate, SlotTimeoutError
from smtpproxy.providers.graph.tokens import (
    Token,
    TokenCache,
    parse_token,
    token_problem,
    token_url,
)
from smtpproxy.providers.graph.tunnel import GraphEndpoints, ProxyTunnelError
from smtpproxy.providers.result import SendCancelledError, current_handover
from smtpproxy.queue.store import CounterStore

log = Logger(namespace="smtpproxy.graph")

USER_AGENT = "smtpproxy"
JSON = "application/json"
# Deleting a failed draft gets its own short budget: it runs after the
# message's budget may already be spent, and must not hold the SMTP reply long.
CLEANUP_BUDGET = 10.0
IDLE_CONNECTION_TIMEOUT = 60
# Answers the draft path reads itself rather than fail on.
_RANGE_REFUSED = frozenset({416})
_NOT_FOUND = frozenset({404})


class HTTPRequester(Protocol):
    """The part of treq's C{HTTPClient} we use (L{AgentClient} and treq's StubTreq provide it)."""

    @property
    def request(self) -> Callable[..., Deferred[Any]]: ...


@dataclass(frozen=True, slots=True)
class _Request:
    """One HTTP request as the retry loop sees it.

    @ivar what: a label for logs (C{sendMail}, C{uploadRange}, ...).
    @ivar auth: send the bearer token (never for the token endpoint itself,
        never for an upload URL, which carries its own credential).
    @ivar mailbox: whose concurrency gate the request holds, if any.
    @ivar kind: which classifier reads its failures: graph, token, managed
        (an identity endpoint's token) or upload.
    @ivar read_write: part of the draft path (needs Mail.ReadWrite).
    """

    what: str
    method: str
    url: str = field(repr=False)
    body: bytes | None = field(default=None, repr=False)
    content_type: str | None = None
    auth: bool = True
    mailbox: str | None = None
    kind: str = "graph"
    read_write: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> str:
        # An upload URL carries a credential in its query: never log it.
        return "(upload URL)" if self.kind == "upload" else urlsplit(self.url).path


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: Headers
    body: bytes = field(repr=False)
    client_request_id: str
    request_id: str


@dataclass(slots=True)
class _Attempts:
    """What L{GraphProvider._call} saw of one request's attempts, for callers that need it.

    @ivar uncertain: an attempt may have taken effect although no success
        was seen (its answer was lost); set even when the call then fails.
    """

    uncertain: bool = False


@dataclass(slots=True)
class _Handover:
    """Whether a request that sends one message (L{_SENDING}) may have taken effect.

    Set by L{GraphProvider._attempts} when one attempt of such a request
    was accepted (2xx) or failed ambiguously (L{Problem.ambiguous}: a cut
    connection or a timeout after the request left, a 500, 502 or 504),
    and by L{GraphProvider._call} when it was cancelled on the wire.  Once
    set it stays set, whatever later attempts see: 503, then a lost answer,
    then 202 counts, and so does a lost answer followed by refusals.
    Until then nothing was sent, and the message's budget charge is given
    back if it fails: no token, Graph or the proxy unreachable (refused or
    timed out while connecting), no free slot in time, cancelled before the
    request, a draft step refused, or Graph refusing the send itself (429,
    503, a 4xx such as ErrorInvalidRecipients: Exchange sent nothing, and
    a throttled message retried by the queue must not use the day's budget
    once per attempt).
    """

    reached: bool = False


# The message whose requests the current coroutine makes.  L{GraphProvider._send}
# sets it for its own coroutine (Twisted runs each coroutine in its own
# copy of the context), so the sending request deep in the plan's steps
# (the MIME send, the draft's last step) marks the right message without
# a parameter threaded through every step.  A token fetch started on a
# message's behalf inherits it, but never sends.
_HANDOVER: ContextVar[_Handover | None] = ContextVar("graph_handover", default=None)


def _note_handed_over(request: _Request) -> None:
    """C{request} may have taken effect: if it sends the message, the message counts."""
    handover = _HANDOVER.get()
    if handover is not None and request.what in _SENDING:
        handover.reached = True


class _NoResponseError(Exception):
    """The exchange ended without an HTTP response."""

    def __init__(self, description: str, *, timed_out: bool, connected: bool) -> None:
        super().__init__(description)
        self.description = description
        self.timed_out = timed_out
        self.connected = connected


def _reasons(error: BaseException) -> list[BaseException]:
    """The error and, for twisted.web's wrappers, the errors they wrap."""
    found: list[BaseException] = [error]
    if isinstance(error, ResponseFailed):
        found.extend(reason.value for reason in error.reasons)
    return found


def _never_connected(reasons: list[BaseException]) -> bool:
    """Whether an exchange failed before its connection to Graph was made.

    A refused connection, a failed DNS lookup, a refused proxy tunnel, a
    TLS handshake that never completed (L{HandshakeEndpoint} connects only
    after it), or a connection attempt cancelled (by the request timer)
    before it completed: the request cannot have left, so it had no effect.
    """
    return any(isinstance(r, _NOT_CONNECTED) for r in reasons)


_NOT_CONNECTED = (
    ConnectError,
    DNSLookupError,
    ProxyTunnelError,
    ConnectingCancelledError,
    HandshakeFailedError,
)


def _describe(error: BaseException) -> str:
    """Class names only: exception text could quote a URL with a token in it."""
    names = [type(e).__name__ for e in _reasons(error)]
    return "/".join(dict.fromkeys(names))


class GraphProvider:
    """Delivers mail through Microsoft Graph as one of the configured mailboxes."""

    name = "graph"
    # MIME mode sends the raw bytes base64-encoded, so any octet arrives;
    # the JSON and draft forms are built from the parse, which decodes a
    # binary part like an 8bit one (see docs/graph.md, "Extensions").
    binary_mime = True

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        http_client: HTTPRequester | None = None,
        *,
        tuning: Tuning | None = None,
        jitter: Callable[[], float] = random.random,
        trust_root: object | None = None,
    ) -> None:
        """
        @param trust_root: an C{IOpenSSLTrustRoot}: the certificate authorities
            HTTPS peers are verified against (default: the system's, which
            C{SSL_CERT_FILE} can replace); tests pass their own.
        """
        settings = GraphSettings.from_config(config)
        if not settings.sender:
            raise ValueError("GraphProvider needs at least one GRAPH_SENDER mailbox")
        self._config = config
        self._settings = settings
        self._reactor = reactor
        self._tuning = tuning or Tuning()
        self._jitter = jitter
        self._senders = settings.sender
        self._concurrency = settings.max_concurrency
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
            # Every mailbox may use its full share of connections at once.
            pool.maxPersistentPerHost = self._concurrency * len(self._senders)
            # Close idle connections before Graph's front end does: a POST on
            # a connection the server already dropped fails and costs a retry.
            pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
            self._pool = pool
            proxy = parse_proxy(settings.https_proxy) if settings.https_proxy else None
            endpoints = GraphEndpoints(
                reactor,
                BrowserLikePolicyForHTTPS(trust_root),  # type: ignore[no-untyped-call]
                proxy,
                parse_no_proxy(settings.no_proxy),
            )
            if proxy is not None:
                log.info(
                    "Graph requests go through the proxy",
                    proxy=proxy.display,
                    authenticated=proxy.authorization is not None,
                    no_proxy=settings.no_proxy,
                )
            agent = pooled_agent(reactor, pool, endpoints)
            # Agent straight, not treq's HTTPClient: see agentclient's docstring.
            http_client = AgentClient(agent)
        self._http: HTTPRequester = http_client
        self._urls = GraphUrls(settings.endpoint)
        self._token_url = token_url(settings.authority_host, settings.tenant_id)
        self._credential = credential_for(settings)
        log.info(
            "Graph credential",
            kind=CREDENTIAL_NAMES[settings.credential],
            credential=self._credential.description,
        )
        warning = credential_warning(self._credential, reactor.seconds())
        if warning is not None:
            log.warn("Graph credential needs attention", problem=warning)
        self._tokens = TokenCache(reactor, self._fetch_token)
        # Requests answered, by HTTP status, for /metrics (read at scrape
        # time).  Log events are built only at the levels that keep them: an
        # event is made and handed to every observer before the level filter
        # drops it, which costs measurable CPU per message (as for the
        # delivery's own "message delivered", see RelayRealm).
        self._statuses: dict[int, int] = {}
        self._log_requests = config.log_level == "debug"
        self._log_accepted = config.log_level in ("debug", "info")
        self._gates: dict[str, SlotGate] = {}
        self._draft_turns = DraftTurns()
        self._budgets = BudgetKeeper(settings.budget, self._senders, reactor)

    @property
    def mailboxes(self) -> tuple[str, ...]:
        """The mailboxes this provider sends as (C{GRAPH_SENDER})."""
        return self._senders

    @property
    def mailbox_concurrency(self) -> int:
        """Requests in flight per mailbox (C{GRAPH_MAX_CONCURRENCY}); the queue's per-route cap."""
        return self._concurrency

    @property
    def accepts_raw_mime(self) -> bool:
        """Graph takes raw MIME unless told to send JSON only."""
        return self._settings.send_mode != "json"

    @property
    def request_statuses(self) -> Mapping[int, int]:
        """HTTP requests answered so far, by status (for the metrics)."""
        return self._statuses

    @property
    def token_fetches(self) -> int:
        """How many access tokens were requested so far (for the metrics)."""
        return self._tokens.fetches

    def check_ready(self) -> Deferred[None]:
        """Fire once a token is at hand (cached, or fetched now); fail with why not.

        For C{/readyz}: without a token no message can go out.
        """
        return self._tokens.get().addCallback(lambda _: None)

    def send(self, email: Email) -> Deferred[None]:
        """Deliver C{email}; fire once Graph accepted it (HTTP 202)."""
        return Deferred.fromCoroutine(self._send(email))

    def close(self) -> Deferred[None]:
        """Close the idle connections of the pool."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed

    # -- one message -------------------------------------------------------

    async def _send(self, email: Email) -> None:
        deadline = self._reactor.seconds() + self._settings.send_timeout
        recipients = plan_recipients(email)
        senders, charge = await self._choose_mailbox(email, recipients.count)
        handover = _Handover()
        _HANDOVER.set(handover)
        try:
            await self._send_as(email, senders, recipients, deadline)
        except Exception:  # CancelledError included
            # Nothing reached Graph (refused by the planner, no token, no
            # connection, cancelled before the request): the message was
            # not sent, so it must not use up the mailbox's budget.
            if charge is not None and not handover.reached:
                await self._budgets.give_back(charge)
            raise

    async def _send_as(
        self, email: Email, senders: tuple[str, ...], recipients: Recipients, deadline: float
    ) -> None:
        """Plan C{email} for one of C{senders} and carry the plan out."""
        domain = self._config.smtp_default_domain
        save = self._settings.save_to_sent_items
        plan = plan_delivery(email, senders, self._settings.send_mode, domain, save, recipients)
        try:
            reply = await self._carry_out(plan, deadline, email.message_id)
        except GraphRequestError as rejected:
            # auto mode: Graph could not read the raw message; the JSON form
            # is built from our own parse and may well be acceptable.
            if not (
                isinstance(plan, MimeSend)
                and self._settings.send_mode == "auto"
                and not email.abandoned
                and rejected.graph_code.startswith("ErrorMimeContent")
            ):
                raise
            plan = json_fallback(email, plan, rejected.graph_code, domain, save, recipients)
            log.warn(
                "Graph could not read the raw message; sending it as JSON",
                mailbox=plan.mailbox,
                graph_code=rejected.graph_code,
            )
            reply = await self._carry_out(plan, deadline)
        if not self._log_accepted:
            return
        log.info(
            "Graph accepted the message",
            mailbox=plan.mailbox,
            method=_method(plan),
            recipients=plan.recipients.count,
            size=email.size,
            client_request_id=reply.client_request_id,
            request_id=reply.request_id,
        )

    async def _choose_mailbox(
        self, email: Email, recipients: int
    ) -> tuple[tuple[str, ...], Charge | None]:
        """The mailbox(es) to plan with, and the budget charge made for the message.

        An identity bound to a mailbox: that one (L{bound_mailbox}).  From
        naming a sending mailbox: that one.  Otherwise the least-used
        mailbox by the budgets (the first one when nothing is counted).  A
        message that the planner will refuse anyway (no recipients, too
        many) is not charged.
        """
        if email.mailbox:
            candidates: tuple[str, ...] = (bound_mailbox(email.mailbox, self._senders),)
        else:
            matched = matching_mailbox(email.from_, self._senders)
            candidates = (matched,) if matched is not None else self._senders
        if not self._budgets.counting or not 0 < recipients <= MAX_RECIPIENTS:
            return candidates, None
        charge = await self._budgets.charge(candidates, recipients)
        return (charge.mailbox,), charge

    def keep_budgets_in(self, store: CounterStore) -> None:
        """Keep the sending budgets in the queue's store (shared, and kept over restarts)."""
        self._budgets.keep_in(store)

    async def _carry_out(
        self, plan: Plan, deadline: float, message_id: str | None = None
    ) -> _Reply:
        emit = log.warn if self._settings.send_mode == "mime" else log.info
        for note in plan.notes:
            emit("adjusting how the message is sent", mailbox=plan.mailbox, note=note)
        for warning in plan.warnings:
            # A header we write was trimmed rather than have Graph bounce the
            # message; say so, since nobody else will.
            log.warn("adjusting the message's headers", mailbox=plan.mailbox, note=warning)
        mailbox = plan.mailbox
        if isinstance(plan, DraftSend):
            return await self._send_draft(plan, deadline, message_id)
        content_type = "text/plain" if isinstance(plan, MimeSend) else JSON
        url = self._urls.send_mail(mailbox)
        request = _Request("sendMail", "POST", url, plan.body, content_type, mailbox=mailbox)
        return await self._call(request, deadline)

    async def _send_draft(
        self, plan: DraftSend, deadline: float, message_id: str | None = None
    ) -> _Reply:
        """Draft, attachments, uploads, send; delete the draft if any step fails.

        The draft is the raw message less the parts added afterwards
        (C{text/plain}, base64) or Graph's JSON message (see L{DraftSend}).
        Lost answers (see L{smtpproxy.providers.graph.drafts}): a draft
        created unseen is found again and deleted; a send that may have gone
        through counts as sent when the draft is then gone.

        A MIME draft is found again by its C{internetMessageId}, which every
        send of the same message shares: such sends take turns
        (L{smtpproxy.providers.graph.draftturns}), so that one's clean-up
        never deletes the draft another is still working on.  A JSON draft
        carries a tag of its own attempt and needs no turn.

        @param message_id: the message's Message-ID field, by which Graph
            knows a MIME draft (C{internetMessageId}); a message without
            one was given one of ours in the draft (C{plan.made_message_id}).
        """
        mime_id = internet_message_id(plan.made_message_id or message_id) if plan.mime else None
        # Clean-ups left running in the background by a cancelled send.
        background: list[Deferred[None]] = []
        if mime_id is None:
            return await self._draft_steps(plan, deadline, None, background)
        key = turn_key(plan.mailbox, mime_id)
        await self._wait_for_turn(key, deadline)
        try:
            return await self._draft_steps(plan, deadline, mime_id, background)
        finally:
            if background:
                # The turn ends when the last of this send's drafts is gone.
                ended = gatherResults(background, consumeErrors=True)
                ended.addBoth(lambda _: self._draft_turns.give_back(key))
            else:
                self._draft_turns.give_back(key)

    async def _wait_for_turn(self, key: TurnKey, deadline: float) -> None:
        """Wait, within the message's budget, until no other send of it is on the draft path."""
        try:
            await self._bounded(
                self._draft_turns.take(key),
                deadline,
                "waiting for another send of the same message (same Message-ID)",
            )
        except CancelledError:
            raise SendCancelledError(handed_over=False) from None

    async def _draft_steps(
        self,
        plan: DraftSend,
        deadline: float,
        mime_id: str | None,
        background: list[Deferred[None]],
    ) -> _Reply:
        """L{_send_draft}'s steps; clean-ups a cancellation leaves running go to C{background}."""
        mailbox = plan.mailbox
        body = plan.draft
        tag = None
        if not plan.mime:
            tag = str(uuid.uuid4())
            body = tag_json_draft(body, tag)
        lookup = lookup_filter(message_id=mime_id, tag=tag)
        creating = _Attempts()
        try:
            created = await self._call(
                _Request(
                    "createDraft",
                    "POST",
                    self._urls.messages(mailbox),
                    body,
                    plan.draft_type,
                    mailbox=mailbox,
                    read_write=True,
                ),
                deadline,
                attempts=creating,
            )
        except Exception as e:
            if creating.uncertain:
                if isinstance(e, CancelledError):
                    # As for a cancelled send below: answer now, clean up meanwhile.
                    background.append(
                        Deferred.fromCoroutine(self._delete_strays(mailbox, lookup, None))
                    )
                else:
                    await self._clear_strays(mailbox, lookup, None, background)
            raise
        draft_id = _json_field(created.body, "id")
        # How a sent copy is found in Sent Items: a JSON draft's id is Exchange's.
        sent_id = mime_id or internet_message_id(_json_field(created.body, "internetMessageId"))
        if creating.uncertain:
            # An attempt whose answer was lost may have made a draft too.
            await self._clear_strays(mailbox, lookup, draft_id, background)
        if draft_id is None:
            raise TransientDeliveryError("Graph created a draft without an id; try again later")
        sending = _Attempts()
        try:
            for attachment in plan.attachments:
                await self._call(
                    _Request(
                        "addAttachment",
                        "POST",
                        self._urls.attachments(mailbox, draft_id),
                        attachment,
                        JSON,
                        mailbox=mailbox,
                        read_write=True,
                    ),
                    deadline,
                )
            for upload in plan.uploads:
                await self._upload(mailbox, draft_id, upload, deadline)
            sent = await self._call(
                _Request(
                    "sendDraft",
                    "POST",
                    self._urls.send_draft(mailbox, draft_id),
                    b"",
                    mailbox=mailbox,
                    read_write=True,
                ),
                deadline,
                gone_means_done=True,
                attempts=sending,
            )
        except Exception as e:
            if isinstance(e, CancelledError):
                # A forced shutdown: the relay must learn the outcome now (its
                # log line), not after the clean-up; the draft goes meanwhile.
                background.append(_ended(self._delete_draft(mailbox, draft_id)))
                raise
            try:
                deletion, reply = await self._delete_draft(mailbox, draft_id)
            except CancelledError:
                # A forced shutdown during the clean-up: the relay learns of
                # the cancel (and whether Graph may have the message) now,
                # and the draft is deleted meanwhile, as above.
                background.append(_ended(self._delete_draft(mailbox, draft_id)))
                raise SendCancelledError(handed_over=sending.uncertain) from None
            if reply is not None and sent_although_failed(sending.uncertain, deletion):
                await self._confirm_sent(mailbox, sent_id)
                log.warn(
                    "the draft was sent although no answer said so: counted as delivered",
                    mailbox=mailbox,
                )
                return reply
            if sending.uncertain and deletion is not Deletion.GONE:
                log.error(
                    "a send whose answer was lost may have gone through; the client is told "
                    "to retry, which may deliver the message twice",
                    mailbox=mailbox,
                    draft=deletion.value,
                )
            raise
        if sent.status in _NOT_FOUND:
            # gone_means_done: the draft is gone after an attempt that may have sent it.
            await self._confirm_sent(mailbox, sent_id)
        return sent

    async def _confirm_sent(self, mailbox: str, message_id: str | None) -> None:
        """A send that may have gone through, and its draft is gone: was it sent?

        Graph files every draft it sends in the mailbox's Sent Items (its
        C{send} takes no C{saveToSentItems}, whatever C{GRAPH_SAVE_TO_SENT_ITEMS}
        says), so the copy there is the proof; without it, someone deleted
        the draft and nothing was sent.  Returns when the message counts as
        sent; otherwise fails with a 451 (an unanswered lookup too: a
        duplicate is better than a message lost without a word).

        @param message_id: the draft's C{internetMessageId}; without one the
            copy cannot be looked up and a gone draft counts as sent, as
            before this check existed.
        """
        if message_id is None:
            log.warn(
                "a draft whose send may have gone through is gone and cannot be looked up in "
                "Sent Items (no internetMessageId): counted as sent",
                mailbox=mailbox,
            )
            return
        found: bool | None = None
        try:
            reply = await self._list_ids(
                "findSent", sent_lookup_url(self._urls, mailbox, message_id), mailbox
            )
        except Exception as e:
            if isinstance(e, CancelledError):
                # Graph may have sent it: the relay must not report it unsent.
                raise SendCancelledError(handed_over=True) from None
        else:
            found = in_sent_items(reply.status, reply.body)
        if found:
            return
        if found is None:
            log.error(
                "could not look in Sent Items for a send whose answer was lost; the client "
                "is told to retry, which may deliver the message twice",
                mailbox=mailbox,
            )
        else:
            log.error(
                "a send whose answer was lost found its draft gone but no copy in Sent Items: "
                "someone else deleted the draft; the client is told to retry",
                mailbox=mailbox,
            )
        raise TransientDeliveryError(
            "the draft was deleted before Graph confirmed sending it, and the mailbox's Sent "
            "Items has no copy of it; try again later",
            "4.3.0",
        )

    async def _upload(self, mailbox: str, message_id: str, upload: Upload, deadline: float) -> None:
        """Stream one big part through an upload session, range by range, in order.

        A range Graph refuses with 416 (typically a retry of a range whose
        answer was lost, which Graph already has) does not fail the part:
        the session's URL is read for where it stands and the upload goes on
        from there, up to L{MAX_RESUMES} times.
        """
        session = await self._call(
            _Request(
                "createUploadSession",
                "POST",
                self._urls.upload_session(mailbox, message_id),
                upload.session_request(),
                JSON,
                mailbox=mailbox,
                read_write=True,
            ),
            deadline,
        )
        url = _json_field(session.body, "uploadUrl")
        if url is None or urlsplit(url).scheme not in ("http", "https"):
            raise TransientDeliveryError("Graph sent no usable upload URL; try again later")
        total = len(upload.data)
        position = 0
        resumes = 0
        while True:
            last = min(position + UPLOAD_CHUNK, total) - 1
            reply = await self._call(
                _Request(
                    "uploadRange",
                    "PUT",
                    url,
                    upload.data[position : last + 1],
                    "application/octet-stream",
                    auth=False,
                    mailbox=mailbox,
                    kind="upload",
                    headers={"Content-Range": content_range(position, last, total)},
                ),
                deadline,
                answers=_RANGE_REFUSED,
            )
            if reply.status in _RANGE_REFUSED:
                resumes += 1
                where = None
                if resumes <= MAX_RESUMES:
                    where = await self._upload_position(url, mailbox, total, deadline)
                if where is None:
                    raise TransientDeliveryError(
                        f"Graph refused a range of {upload.name!r} and did not say where "
                        "the upload stands; try again later",
                        "4.3.0",
                    )
                log.info(
                    "resuming an upload where Graph says it stands",
                    mailbox=mailbox,
                    sent_up_to=position,
                    resume_at=where,
                )
                position = where
                continue
            if last + 1 >= total:
                break
            position = last + 1
        if reply.status != 201:
            raise TransientDeliveryError(
                f"Graph did not complete the upload of {upload.name!r}; try again later"
            )

    async def _upload_position(
        self, url: str, mailbox: str, total: int, deadline: float
    ) -> int | None:
        """Where the upload session at C{url} expects the next byte (a GET of the URL)."""
        try:
            status = await self._call(
                _Request("uploadStatus", "GET", url, auth=False, mailbox=mailbox, kind="upload"),
                deadline,
            )
        except TransientDeliveryError:
            return None
        return resume_at(status.body, total)

    async def _clear_strays(
        self,
        mailbox: str,
        condition: str | None,
        keep: str | None,
        background: list[Deferred[None]],
    ) -> None:
        """L{_delete_strays}; if the send is cancelled meanwhile, the clean-up
        starts again in the background (C{keep} deleted too: the send ends)."""
        try:
            await self._delete_strays(mailbox, condition, keep)
        except CancelledError:
            background.append(Deferred.fromCoroutine(self._delete_strays(mailbox, condition, None)))
            if keep is not None:
                background.append(_ended(self._delete_draft(mailbox, keep)))
            raise

    async def _delete_strays(self, mailbox: str, condition: str | None, keep: str | None) -> None:
        """Delete the drafts of this attempt that are not C{keep} (best effort, logged).

        Runs after a createDraft with a lost answer: Graph may hold a draft
        we never heard of, which anyone could later send by hand.
        A cancellation is passed on (the send must end); every other failure
        is logged and ends the clean-up.
        """
        if condition is None:
            log.warn(
                "a draft may have been created unseen and cannot be looked up "
                "(the message's Message-ID names no <...> id); check the mailbox's Drafts folder",
                mailbox=mailbox,
            )
            return
        try:
            reply = await self._list_ids(
                "findDrafts", lookup_url(self._urls, mailbox, condition), mailbox
            )
        except Exception as e:
            if isinstance(e, CancelledError):
                # The caller goes on: it must learn that it was cancelled.
                raise
            log.warn("could not look for drafts created unseen", mailbox=mailbox, error=str(e))
            return
        found = found_ids(reply.body)
        if found is None:
            log.warn("unreadable answer looking for drafts created unseen", mailbox=mailbox)
            return
        for stray in strays(found, keep):
            log.info(
                "deleting a draft created by an attempt whose answer was lost", mailbox=mailbox
            )
            await self._delete_draft(mailbox, stray)

    async def _list_ids(self, what: str, url: str, mailbox: str) -> _Reply:
        """A listing of a mail folder (C{$select=id}) for the draft path's checks.

        It gets its own short budget, as a clean-up does: it runs after a
        failure, when the message's budget may already be spent.
        """
        request = _Request(what, "GET", url, mailbox=mailbox, read_write=True)
        return await self._call(request, self._reactor.seconds() + CLEANUP_BUDGET)

    async def _delete_draft(self, mailbox: str, message_id: str) -> tuple[Deletion, _Reply | None]:
        """Best effort: a failed message must not leave a draft behind to be sent by hand.

        A cancellation is passed on (the send must end; its callers start
        the delete again in the background); every other failure is logged.

        @return: what the delete found, and Graph's last answer (if any).
        """
        request = _Request(
            "deleteDraft", "DELETE", self._urls.message(mailbox, message_id), mailbox=mailbox
        )
        deleting = _Attempts()
        try:
            reply = await self._call(
                request,
                self._reactor.seconds() + CLEANUP_BUDGET,
                answers=_NOT_FOUND,
                attempts=deleting,
            )
        except Exception as e:
            if isinstance(e, CancelledError):
                # The send is being cancelled: its caller must learn so.
                raise
            log.warn("could not delete a failed message's draft", mailbox=mailbox, error=str(e))
            return Deletion.UNKNOWN, None
        code = parse_graph_error(reply.status, reply.body).code if reply.status >= 300 else None
        return deletion_outcome(reply.status, code, uncertain=deleting.uncertain), reply

    # -- tokens ------------------------------------------------------------

    def _fetch_token(self) -> Deferred[Token]:
        return Deferred.fromCoroutine(self._request_token())

    async def _request_token(self) -> Token:
        deadline = self._reactor.seconds() + self._settings.send_timeout
        try:
            wanted = self._credential.token_request(self._reactor.seconds())
        except CredentialError as e:
            log.error("cannot read the Graph credential", problem=str(e))
            raise TransientDeliveryError(
                "relay misconfigured: its Graph credential cannot be read; try again later",
                "4.3.5",
            ) from None
        reload_error = getattr(self._credential, "reload_error", None)
        if reload_error:
            log.error(
                "the certificate file changed but cannot be used; still using the previous one",
                problem=reload_error,
            )
        request = _Request(
            "token",
            wanted.method,
            wanted.url,
            wanted.body,
            wanted.content_type,
            auth=False,
            kind="managed" if wanted.kind == "managed" else "token",
            headers=wanted.headers,
        )
        reply = await self._call(request, deadline)
        try:
            return parse_token(reply.body, self._reactor.seconds())
        except ValueError as e:
            log.error(
                "unreadable token response",
                problem=str(e),
                client_request_id=reply.client_request_id,
            )
            raise TransientDeliveryError(
                "Entra ID sent an unreadable token response; try again later"
            ) from None

    async def _token(self, deadline: float) -> str:
        value: str = await self._bounded(self._tokens.get(), deadline, "waiting for a token")
        return value

    # -- one request, with retries ----------------------------------------

    async def _call(
        self,
        request: _Request,
        deadline: float,
        *,
        gone_means_done: bool = False,
        answers: frozenset[int] = frozenset(),
        attempts: _Attempts | None = None,
    ) -> _Reply:
        """Send C{request} until it succeeds, retrying per L{decide}.

        A cancelled call (the relay giving up at shutdown) fails with a
        L{SendCancelledError} saying whether the message may have been
        handed over: only a sending request (C{sendMail}, C{sendDraft})
        that was on the wire, or whose earlier attempt was ambiguous,
        can have taken effect.

        @param gone_means_done: a 404 after an attempt that may have taken
            effect is returned, not raised: that attempt may have sent the
            draft (once sent, it no longer exists), which the caller checks.
        @param answers: error statuses the caller reads itself: returned,
            neither retried nor raised.
        @param attempts: filled in with what the attempts saw.
        """
        uncertain: list[bool] = []
        try:
            return await self._attempts(
                request, deadline, gone_means_done, uncertain, answers, attempts
            )
        except CancelledError as e:
            if isinstance(e, SendCancelledError):
                raise
            sending = request.what in _SENDING
            handed_over = sending and (bool(uncertain) or isinstance(e, _CancelledOnWireError))
            if handed_over:
                _note_handed_over(request)
            raise SendCancelledError(handed_over=handed_over) from None

    async def _attempts(
        self,
        request: _Request,
        deadline: float,
        gone_means_done: bool,
        ambiguous: list[bool],
        answers: frozenset[int],
        attempts: _Attempts | None,
    ) -> _Reply:
        """L{_call}'s loop; appends to C{ambiguous} once an attempt may have taken effect."""
        attempt = 0
        refreshed = False
        uncertain = False
        while True:
            token = await self._token(deadline) if request.auth else None
            client_request_id = str(uuid.uuid4())
            problem: Problem
            reply: _Reply | None = None
            try:
                reply = await self._exchange(request, token, client_request_id, deadline)
            except _NoResponseError as e:
                problem = network_problem(
                    e.description, timed_out=e.timed_out, connected=e.connected
                )
            else:
                if 200 <= reply.status < 300:
                    _note_handed_over(request)
                    return reply
                if reply.status in answers:
                    return reply
                if reply.status == 404 and gone_means_done and uncertain:
                    # The caller confirms (Sent Items) before counting it sent.
                    log.info(
                        "an earlier attempt may have gone through: the draft is gone",
                        what=request.what,
                        client_request_id=client_request_id,
                    )
                    return reply
                if reply.status == 401 and token is not None and not refreshed:
                    refreshed = True
                    self._tokens.invalidate(token)
                    if request.what in _SENDING and not uncertain:
                        # Refused before it was read: Graph does not have the
                        # message while the new token is fetched.
                        current_handover().clear()
                    log.warn(
                        "Graph refused the access token; renewing it once",
                        what=request.what,
                        client_request_id=client_request_id,
                        request_id=reply.request_id,
                    )
                    continue
                problem = self._classify(request, reply)
            uncertain = uncertain or problem.ambiguous
            if request.what in _SENDING and not uncertain:
                # Refused, and no earlier attempt may have gone through:
                # Graph does not have the message (a retry may hand it over).
                current_handover().clear()
            if uncertain and not ambiguous:
                # A definite refusal (429, 503, 4xx) took no effect; this may have.
                ambiguous.append(True)
                _note_handed_over(request)
            if attempts is not None:
                attempts.uncertain = uncertain
            now = self._reactor.seconds()
            step = decide(problem, attempt, now, deadline, self._tuning, self._jitter())
            fields: dict[str, Any] = {
                "what": request.what,
                "method": request.method,
                "path": request.log_path,
                "status": problem.status,
                "client_request_id": client_request_id,
                "request_id": reply.request_id if reply is not None else "",
                "attempt": attempt + 1,
                **problem.fields,
            }
            if isinstance(step, Stop):
                log.error("Graph request failed", reason=step.error.reason, **fields)
                if problem.code in QUOTA_CODES or problem.status == 507:
                    log.error(
                        "the sending mailbox is over its storage quota; "
                        "free space in it (Sent Items, Deleted Items) or raise its quota",
                        mailbox=request.mailbox or "",
                        graph_code=problem.code or "",
                    )
                # For the durable queue's retry schedule and attempt history.
                step.error.retry_after = problem.retry_after
                step.error.request_id = (reply.request_id or None) if reply is not None else None
                raise step.error
            log.warn("Graph request failed; retrying", delay=round(step.delay, 3), **fields)
            await deferLater(self._reactor, step.delay)
            attempt += 1

    def _classify(self, request: _Request, reply: _Reply) -> Problem:
        retry_after = parse_retry_after(
            _header(reply.headers, "retry-after"), self._reactor.seconds()
        )
        if request.kind in ("token", "managed"):
            return token_problem(
                reply.status, reply.body, retry_after, managed=request.kind == "managed"
            )
        problem = response_problem(
            reply.status, reply.body, retry_after, needs_read_write=request.read_write
        )
        if reply.status in _NOT_FOUND and request.what in _ON_DRAFT:
            # The mailbox exists (the draft was made in it): the draft is gone.
            return replace(problem, retryable=False, error=gone_draft_error(problem.summary))
        if request.kind == "upload" and not problem.retryable:
            # A refused range means the session went wrong, not the message:
            # let the client retry the whole message later.
            error = TransientDeliveryError(
                f"Graph upload failed ({problem.summary}); try again later", "4.3.0"
            )
            problem = replace(problem, error=error)
        return problem

    async def _exchange(
        self, request: _Request, token: str | None, client_request_id: str, deadline: float
    ) -> _Reply:
        """One HTTP exchange holding the mailbox's gate, bounded by the request timeout."""
        if deadline <= self._reactor.seconds():
            raise TransientDeliveryError(
                "time limit reached before Graph answered; try again later", "4.4.7"
            )
        gate = None
        if request.mailbox is not None:
            key = request.mailbox.casefold()
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = SlotGate(self._concurrency, self._reactor)
            waiting = gate.take(deadline)
            if waiting is not None:
                try:
                    await waiting
                except SlotTimeoutError:
                    raise TransientDeliveryError(
                        "time limit reached waiting for a free Graph slot; try again later",
                        "4.4.7",
                    ) from None
        try:
            headers = {
                "client-request-id": client_request_id,
                "return-client-request-id": "true",
                "User-Agent": USER_AGENT,
                **request.headers,
            }
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            if request.content_type is not None:
                headers["Content-Type"] = request.content_type
            remaining = deadline - self._reactor.seconds()
            timeout = min(self._tuning.request_timeout, remaining)
            if timeout <= 0:
                raise TransientDeliveryError(
                    "time limit reached before Graph answered; try again later", "4.4.7"
                )
            roundtrip = self._roundtrip(request, headers)
            expired: list[bool] = []

            def expire() -> None:
                expired.append(True)
                roundtrip.cancel()

            timer = self._reactor.callLater(timeout, expire)
            try:
                status, response_headers, body = await roundtrip
            except Exception as e:
                reasons = _reasons(e)
                if expired:
                    # Timed out while still connecting (a firewall dropping
                    # packets): the request never left, as for a refused
                    # connection.  Otherwise it may have.
                    connected = not _never_connected(reasons)
                    self._log_request(request, 0, client_request_id, "")
                    raise _NoResponseError(
                        _describe(e), timed_out=True, connected=connected
                    ) from None
                if any(isinstance(r, ConnectingCancelledError) for r in reasons):
                    raise CancelledError() from None
                if any(isinstance(r, CancelledError) for r in reasons):
                    # Cancelled once connected: the request may have left.
                    raise _CancelledOnWireError() from None
                connected = not _never_connected(reasons)
                self._log_request(request, 0, client_request_id, "")
                raise _NoResponseError(_describe(e), timed_out=False, connected=connected) from None
            finally:
                if timer.active():
                    timer.cancel()
        finally:
            if gate is not None:
                gate.release()
        request_id = _header(response_headers, "request-id") or ""
        self._log_request(request, status, client_request_id, request_id)
        return _Reply(status, response_headers, body, client_request_id, request_id)

    def _log_request(
        self, request: _Request, status: int, client_request_id: str, request_id: str
    ) -> None:
        """Count one attempt for C{/metrics} by status: 0 when no response came
        (no connection, a timeout, a cut connection, a refused proxy tunnel),
        so that an outage without answers shows too.  A cancelled attempt
        (the relay gave up) is not counted.  The event itself only at debug."""
        statuses = self._statuses
        statuses[status] = statuses.get(status, 0) + 1
        if self._log_requests:
            log.debug(
                "Graph request",
                what=request.what,
                method=request.method,
                path=request.log_path,
                status=status,
                client_request_id=client_request_id,
                request_id=request_id,
            )

    def _roundtrip(
        self, request: _Request, headers: dict[str, str]
    ) -> Deferred[tuple[int, Headers, bytes]]:
        """The request sent, its whole answer read: status, headers, body.

        A chain of callbacks rather than a coroutine of its own: one step
        fewer per request, and cancelling the result still cancels whichever
        part is under way (the request, or the body's reading).
        """
        data = request.body
        if data is None and request.method in ("POST", "PUT"):
            data = b""
        # A send request on the wire hands the message over: from then on
        # a forced stop waits for Graph's answer rather than cancelling.
        on_the_wire = current_handover().mark if request.what in _SENDING else None
        token = ON_THE_WIRE.set(on_the_wire)
        try:
            sent: Deferred[Any] = self._http.request(
                request.method,
                request.url,
                headers=headers,
                data=data,
                # A redirect would carry the bearer token to another host.
                allow_redirects=False,
            )
        finally:
            ON_THE_WIRE.reset(token)
        return sent.addCallback(_read_whole)

    async def _bounded(self, waiting: Deferred[Any], deadline: float, what: str) -> Any:
        """Await C{waiting}, but no later than C{deadline} (then fail with a 451)."""
        if waiting.called:
            # A cached token, a free slot: no timer to arm and cancel (twice per request).
            return await waiting
        remaining = deadline - self._reactor.seconds()
        if remaining <= 0:
            waiting.cancel()
            waiting.addErrback(lambda _: None)
            raise TransientDeliveryError(f"time limit reached {what}; try again later", "4.4.7")
        waiting.addTimeout(remaining, self._reactor)
        try:
            return await waiting
        except TimeoutError:
            raise TransientDeliveryError(
                f"time limit reached {what}; try again later", "4.4.7"
            ) from None


#: The requests that send the message: once one is on the wire, Graph may have it.
_SENDING = frozenset({"sendMail", "sendDraft"})
#: The steps on a draft the relay created: a 404 means the draft (or its
#: upload session) was deleted meanwhile, not that the mailbox is unknown.
_ON_DRAFT = frozenset({"addAttachment", "createUploadSession", "uploadRange", "sendDraft"})


class _CancelledOnWireError(CancelledError):
    """A request cancelled after its connection was made: it may have reached Graph."""


def _method(plan: Plan) -> str:
    if isinstance(plan, MimeSend):
        return "mime"
    if isinstance(plan, JsonSend):
        return "json"
    return "mime-draft" if plan.mime else "draft"


def _ended(work: Coroutine[Deferred[Any], Any, object]) -> Deferred[None]:
    """C{work} started, as a Deferred that fires (with None) when it ends."""
    return Deferred.fromCoroutine(work).addCallback(lambda _: None)


def _read_whole(response: Any) -> Deferred[tuple[int, Headers, bytes]]:
    """A response's status, headers and whole body, once the body is in."""
    code: int = response.code
    headers: Headers = response.headers
    content: Deferred[bytes] = response.content()
    return content.addCallback(lambda body: (code, headers, body))


def _header(headers: Headers, name: str) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def _json_field(body: bytes, name: str) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    value = document.get(name) if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None
