"""When a Graph request fails: try again, how long to wait, or stop with which reply.

Everything here is a pure function of plain values (status, headers, body,
the clock's reading and a random number), so every branch is tested without
a socket.  The provider's glue feeds in what happened and does what the
returned L{Retry} or L{Stop} says.

The rules, from the spec and from how Graph behaves:
  - 429, 503, 504, any other 5xx, dropped connections and timeouts are
    transient: retry up to three times, waiting 1 s, 2 s, 4 s (with a little
    jitter so a burst of failures does not retry in lock step), or exactly
    what C{Retry-After} asks for when Graph says (at most
    L{MAX_RETRY_AFTER}: a longer ask, from Graph or a gateway in front of it,
    is read as that long);
  - never wait past the message's time budget: when the wait would cross it,
    stop at once with a 451 so the SMTP client retries on its own schedule;
  - 409 and 423 (the mailbox is busy) are retried the same way;
  - a full sending mailbox (C{ErrorQuotaExceeded}, or 507) is not retried
    now but answered C{452 4.2.2}: the client retries once space is freed;
  - other 4xx are final: the reply carries Graph's error code so the person
    reading the bounce (or the operator) sees what Graph objected to.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from smtpproxy.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError


class GraphRequestError(PermanentDeliveryError):
    """Graph refused a request for good; C{graph_code} is its error code."""

    def __init__(self, reason: str, status: str, code: int, graph_code: str) -> None:
        super().__init__(reason, status, code)
        self.graph_code = graph_code


@dataclass(frozen=True, slots=True)
class Tuning:
    """Retry and timeout knobs; the defaults are the documented behaviour.

    Tests shrink the waits; operators have no reason to change them.

    @ivar max_retries: retries after the first attempt.
    @ivar backoff_base: first backoff in seconds; it doubles each retry.
    @ivar jitter: extra fraction of the backoff added at random (0.2 = up to 20%).
    @ivar request_timeout: the longest one HTTP exchange may take, so that a
        hung request leaves time in the budget for a retry.
    """

    max_retries: int = 3
    backoff_base: float = 1.0
    jitter: float = 0.2
    request_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one attempt failed, reduced to what the retry decision needs.

    @ivar summary: short text for logs and replies, e.g. C{"HTTP 503 ServiceUnavailable"}.
    @ivar retryable: whether another attempt may succeed.
    @ivar error: what to raise if we stop because of this problem.
    @ivar retry_after: seconds the server asked us to wait, if it did.
    @ivar ambiguous: the request may have taken effect even though we saw
        no success (the connection died after sending, or a gateway timed out).
    @ivar fields: extra log fields (Graph's error code, request id, AADSTS...).
    """

    summary: str
    retryable: bool
    error: DeliveryError
    retry_after: float | None = None
    status: int | None = None
    code: str | None = None
    ambiguous: bool = False
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after C{delay} seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Give up; fail the message with C{error}."""

    error: DeliveryError


def backoff(attempt: int, tuning: Tuning, rand: float) -> float:
    """The wait before retry number C{attempt + 1}: base * 2**attempt, plus jitter.

    @param rand: a number in [0, 1), injected so tests are deterministic.
    """
    base: float = tuning.backoff_base * (2**attempt)
    return base * (1.0 + tuning.jitter * rand)


def decide(
    problem: Problem,
    attempt: int,
    now: float,
    deadline: float,
    tuning: Tuning,
    rand: float,
) -> Retry | Stop:
    """Choose what to do after attempt number C{attempt} (0-based) failed with C{problem}."""
    if not problem.retryable:
        return Stop(problem.error)
    status = problem.error.status
    if attempt >= tuning.max_retries:
        return Stop(
            TransientDeliveryError(
                f"{problem.summary}; gave up after {attempt + 1} attempts, try again later",
                status,
            )
        )
    if problem.retry_after is not None:
        delay = problem.retry_after
    else:
        delay = backoff(attempt, tuning, rand)
    if now + delay >= deadline:
        return Stop(
            TransientDeliveryError(
                f"{problem.summary}; waiting {delay:g} s more would pass this message's "
                "time limit, try again later",
                status,
            )
        )
    return Retry(delay)


#: The longest wait, in seconds, a C{Retry-After} is honoured for: one hour,
#: the queue's default longest wait between attempts (C{QUEUE_RETRY_MAX_INTERVAL}).
#: Graph asks for seconds to minutes; a longer ask (a 400-digit number, a
#: date in 2100, from Graph or a gateway in front of it) is read as this
#: long, so that one odd header neither overflows a conversion nor lets the
#: queue expire a message on its first attempt.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a C{Retry-After} value: delta-seconds or an HTTP date.

    @param now: the current POSIX time, for the date form.
    @return: None when absent or unreadable (then our own backoff applies);
        otherwise a wait from 0 to L{MAX_RETRY_AFTER}.
    """
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        # float() of a long digit string is inf, never an error: capped below.
        return bounded_wait(float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return bounded_wait(max(0.0, when.timestamp() - now))


def bounded_wait(seconds: float) -> float | None:
    """C{seconds} as a wait to honour: at most L{MAX_RETRY_AFTER}, None if NaN or negative."""
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class GraphError:
    """The C{error} object of a Graph error response, or what we could salvage."""

    code: str
    message: str
    request_id: str | None = None
    client_request_id: str | None = None


def parse_graph_error(status: int, body: bytes) -> GraphError:
    """Read C{{"error": {"code", "message", "innerError": {...}}}}; tolerate anything else.

    Gateways in front of Graph sometimes answer with HTML; then the code is
    C{HTTP<status>} and the message is left empty rather than echoing markup.
    """
    fallback = GraphError(f"HTTP{status}", "")
    try:
        document = json.loads(body)
    except ValueError:
        return fallback
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return fallback
    code = error.get("code")
    message = error.get("message")
    inner = error.get("innerError") or error.get("innererror") or {}
    if not isinstance(inner, dict):
        inner = {}
    request_id = inner.get("request-id")
    client_request_id = inner.get("client-request-id")
    return GraphError(
        code if isinstance(code, str) and code else fallback.code,
        _clip(message) if isinstance(message, str) else "",
        request_id if isinstance(request_id, str) else None,
        client_request_id if isinstance(client_request_id, str) else None,
    )


def _clip(text: str, limit: int = 200) -> str:
    """One line of at most C{limit} characters: replies and logs stay readable."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# Graph codes that mean "a recipient address is wrong": the bounce should say
# so with the recipient status codes.
_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients", "ErrorRecipientNotFound"})
_TOO_LARGE_CODES = frozenset(
    {"ErrorMessageSizeExceeded", "RequestEntityTooLarge", "ErrorAttachmentSizeLimitExceeded"}
)
_THROTTLED = frozenset({429, 503})
# The sending mailbox is over its storage quota (Exchange answers 413
# ErrorQuotaExceeded; Graph's error list gives 507 for a storage quota).
# Freeing space fixes it, so the client is told to retry later (452, RFC
# 5321's "insufficient system storage"), but not within this message's
# budget: space is not freed in seconds.
QUOTA_CODES = frozenset({"ErrorQuotaExceeded"})
# Conflict and Locked: the mailbox or item is busy (a move, a concurrent
# change); Graph's error list says a 409 may be repeated after a delay.
_BUSY = frozenset({409, 423})
# Statuses after which the request may nevertheless have been carried out.
_AMBIGUOUS = frozenset({500, 502, 504})


def response_problem(
    status: int,
    body: bytes,
    retry_after: float | None,
    *,
    needs_read_write: bool = False,
) -> Problem:
    """Classify a non-2xx Graph response.

    @param needs_read_write: the request was part of the draft path, which
        needs the Mail.ReadWrite permission; a 403 then says so.
    """
    error = parse_graph_error(status, body)
    summary = f"HTTP {status} {error.code}"
    fields = {"graph_code": error.code}
    if error.request_id:
        fields["request_id"] = error.request_id
    if error.code in QUOTA_CODES or status == 507:
        reason = (
            f"Graph {error.code}: the sending mailbox is over its storage quota; try again later"
        )
        return Problem(
            summary,
            False,
            TransientDeliveryError(reason, "4.2.2", 452),
            None,
            status,
            error.code,
            fields=fields,
        )
    if status in _BUSY:
        reason = f"Graph {error.code}: the mailbox is busy (HTTP {status})"
        return Problem(
            summary,
            True,
            TransientDeliveryError(reason, "4.2.1"),
            retry_after,
            status,
            error.code,
            fields=fields,
        )
    if status == 429 or status >= 500:
        transient_status = "4.4.5" if status in _THROTTLED else "4.3.0"
        reason = f"Graph {error.code}: temporarily unavailable (HTTP {status})"
        return Problem(
            summary,
            True,
            TransientDeliveryError(reason, transient_status),
            retry_after,
            status,
            error.code,
            ambiguous=status in _AMBIGUOUS,
            fields=fields,
        )
    if status == 401:
        # Reached only after one refresh: a fresh token that Graph still
        # refuses means our configuration is wrong (audience, tenant), which
        # is ours to fix, not a reason to bounce the sender's mail.
        reason = (
            f"Graph {error.code}: the relay's Graph credentials were refused; "
            "the operator must fix them, try again later"
        )
        return Problem(
            summary,
            False,
            TransientDeliveryError(reason, "4.3.5"),
            None,
            status,
            error.code,
            fields=fields,
        )
    detail = f": {error.message}" if error.message else ""
    reason = f"Graph {error.code}{detail}"
    code, enhanced = 554, "5.6.0"
    if error.code in _RECIPIENT_CODES:
        code, enhanced = 550, "5.1.1"
    elif status == 413 or error.code in _TOO_LARGE_CODES:
        enhanced = "5.3.4"
    elif status == 403 and error.code == "ErrorSendAsDenied":
        # The app has its permission; it may not use it for this mailbox.
        enhanced = "5.7.1"
        reason += (
            " (the relay's Entra app may not send as this mailbox: check GRAPH_SENDER,"
            " and the application access policy or RBAC for Applications scope)"
        )
    elif status == 403:
        enhanced = "5.7.1"
        permission = "Mail.Send and Mail.ReadWrite" if needs_read_write else "Mail.Send"
        reason += f" (the relay's Entra app needs the {permission} application permission)"
    elif status == 404:
        code, enhanced = 550, "5.1.0"
    return Problem(
        summary,
        False,
        GraphRequestError(reason, enhanced, code, error.code),
        None,
        status,
        error.code,
        fields=fields,
    )


def network_problem(description: str, *, timed_out: bool, connected: bool) -> Problem:
    """Classify a request that got no HTTP response at all.

    @param description: the exception's class name(s), never its full text
        (which could quote a URL carrying an upload token).
    @param connected: False when the connection was never made, so the
        request certainly had no effect.  A timeout while still connecting
        (packets dropped on the way) is retried like a refused connection.
    """
    if timed_out and not connected:
        summary = f"no connection to Graph in time ({description})"
        enhanced = "4.4.1"
    elif timed_out:
        summary = f"no answer from Graph in time ({description})"
        enhanced = "4.4.1"
    else:
        summary = f"connection to Graph failed ({description})"
        enhanced = "4.4.2"
    return Problem(
        summary,
        True,
        TransientDeliveryError(f"{summary}, try again later", enhanced),
        ambiguous=connected,
    )
