"""C{GET /metrics}: the relay's counters in Prometheus's text format.

Where the numbers come from, and why:

- B{Log events} (L{Metrics.observe}, a log observer).  The relay already
  logs one structured event per message outcome (C{message delivered},
  C{message not delivered}, C{message queued}, ...), per login and per Graph
  request or retry, with the fields a metric needs (provider, outcome,
  duration, size, status).  Counting those events keeps all counting in this
  one module and leaves the hot paths (the session, the delivery pipeline,
  the Graph client), which other work edits too, untouched; a new event
  field is a new label here, not a new call there.  The observer sees every
  event whatever C{LOG_LEVEL} filters out of the log itself.
- B{The guard} (L{CountingGuard}).  Refused connections and rate-limit
  refusals are answered, not logged (a flood must not flood the log), so
  the guard's answers are counted by a subclass wrapping its decisions.
- B{Scrape time} (gauges read when Prometheus asks): open SMTP sessions, the
  queue's depth and oldest age from the L{StatusPoller}'s last answer (the
  scrape never waits on the database), Graph token fetches, and Graph
  requests by status.  The Graph provider counts its requests itself (a
  dictionary entry per request) rather than log an event per request: an
  event is built and passed to every observer even when C{LOG_LEVEL} then
  drops it, which cost more CPU than the rest of the counting (issue 13).

A L{Metrics} owns its C{CollectorRegistry} (never the process-wide default
one), so tests can build several.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from smtpproxy.errors import Reply
from smtpproxy.policy.guard import Guard, GuardSettings
from smtpproxy.web.health import only_get
from smtpproxy.web.site import Mount
from smtpproxy.web.status import StatusPoller

__all__ = ["CountingGuard", "Metrics", "MetricsResource", "mount"]

#: Seconds: delivery takes milliseconds to stdout, a second or more to Graph.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Bytes: a one-line alert to a 25 MiB attachment.
SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7)


def _outcome_of(event: LogEvent) -> str | None:
    """The outcome a message event records, or None when it is no message event."""
    fmt = event.get("log_format")
    if fmt in ("message delivered", "message not delivered", "provider failed unexpectedly"):
        outcome = event.get("outcome")
        return str(outcome) if outcome else "deferred"
    if fmt == "message queued":
        return "queued"
    if fmt == "message not queued: the queue is full":
        return "queue_full"
    if fmt == "message could not be queued":
        return "queue_failed"
    if fmt == "message abandoned before delivery":
        return "abandoned"
    if fmt in _CANCELLED and event.get("ended_by") == "cancel":
        # Only a send the cancellation ended: one the provider finished
        # anyway was counted by its "message (not) delivered" line.
        return _CANCELLED[fmt]
    return None


#: The lines of a send cancelled at a forced shutdown (L{smtpproxy.delivery.log_cancelled}),
#: and the outcome each counts as: nothing reached the backend, or it may have.
_CANCELLED = {
    "delivery cancelled at shutdown, message not delivered": "cancelled",
    "delivery cancelled at shutdown after the provider had the message: "
    "it may be delivered although the client was told it was not accepted": "cancelled_unknown",
    "delivery cancelled at shutdown after the provider had the message: "
    "it may be delivered, and the client got no reply": "cancelled_unknown",
    "delivery cancelled, the client disconnected before its answer: "
    "message not delivered": "cancelled",
}


@implementer(ILogObserver)
class _EventCounter:
    """The log observer feeding L{Metrics.observe}."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, event: LogEvent) -> None:
        self._metrics.observe(event)


class Metrics:
    """Every metric of one relay, in its own registry.

    @ivar observer: add it to the log publisher while the relay runs.
    """

    def __init__(self) -> None:
        self.observer: ILogObserver = _EventCounter(self)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            "smtpproxy_messages",
            "Messages by front door, provider and outcome "
            "(delivered, partly delivered, deferred, rejected, queued, queue_full, "
            "queue_failed, abandoned, cancelled, cancelled_unknown).",
            ["front_door", "provider", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "smtpproxy_delivery_duration_seconds",
            "Time from the end of DATA (or the queue's pick-up) to the provider's answer.",
            ["provider", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.message_bytes = Histogram(
            "smtpproxy_message_size_bytes",
            "Size of messages accepted from clients.",
            ["front_door"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "smtpproxy_connections_refused",
            "Connections or requests refused before any work, by front door and reason.",
            ["front_door", "reason"],
            registry=r,
        )
        self.auth = Counter(
            "smtpproxy_auth_attempts", "SMTP AUTH attempts by result.", ["result"], registry=r
        )
        self.rate_limited = Counter(
            "smtpproxy_rate_limit_refusals",
            "Messages refused by a rate limit, by scope (ip or user).",
            ["scope"],
            registry=r,
        )
        self.graph_retries = Counter(
            "smtpproxy_graph_retries", "Graph requests retried after a failure.", registry=r
        )
        self.graph_throttle = Counter(
            "smtpproxy_graph_throttle_wait_seconds",
            "Seconds spent waiting because Graph throttled (429) before retrying.",
            registry=r,
        )
        self.tls_handshakes = Counter(
            "smtpproxy_tls_handshakes",
            "TLS handshakes completed, by front door (smtps, starttls, https) and version.",
            ["front_door", "version"],
            registry=r,
        )
        self.tls_failures = Counter(
            "smtpproxy_tls_handshake_failures",
            "TLS handshakes that ended in an OpenSSL error, by front door.",
            ["front_door"],
            registry=r,
        )
        self.sessions = Gauge("smtpproxy_smtp_sessions_open", "SMTP sessions open now.", registry=r)
        self._extra = _ScrapeCollector()
        r.register(self._extra)
        for door, reason in (("smtp", "network"), ("http", "connection_cap")):
            self.refused.labels(door, reason)
        for result in ("success", "failure"):
            self.auth.labels(result)

    # -- scrape-time sources -------------------------------------------------

    def watch_sessions(self, count: Callable[[], int]) -> None:
        """Read the number of open SMTP sessions from C{count} at each scrape."""
        self.sessions.set_function(lambda: float(count()))

    def watch_queue(self, poller: StatusPoller) -> None:
        """Report the queue's last statistics from C{poller} at each scrape."""
        self._extra.poller = poller

    def watch_token_fetches(self, count: Callable[[], int]) -> None:
        """Report how many Graph tokens were fetched, read from C{count}."""
        self._extra.token_fetches = count

    def watch_graph_requests(self, statuses: Callable[[], Mapping[int, int]]) -> None:
        """Report Graph requests by response status, read from C{statuses} (status: count)."""
        self._extra.graph_requests = statuses

    # -- events ---------------------------------------------------------

    def refusal(self, front_door: str, reason: str) -> None:
        self.refused.labels(front_door, reason).inc()

    def observe(self, event: LogEvent) -> None:
        """Count one log event (a log observer: it must never raise)."""
        # A metric must never break logging.
        with contextlib.suppress(Exception):
            self._observe(event)

    def _observe(self, event: LogEvent) -> None:
        fmt = event.get("log_format")
        outcome = _outcome_of(event)
        if outcome is not None:
            # The queue's worker logs its attempts with their count: that
            # message came in earlier, through whichever door queued it.
            from_queue = "attempts" in event
            door = str(event.get("front_door") or ("queue" if from_queue else "smtp"))
            provider = str(event.get("provider") or "unknown")
            self.messages.labels(door, provider, outcome).inc()
            duration = event.get("duration_ms")
            if isinstance(duration, (int, float)):
                self.delivery_seconds.labels(provider, outcome).observe(duration / 1000)
            size = event.get("size")
            if isinstance(size, int) and not from_queue:
                self.message_bytes.labels(door).observe(size)
        elif fmt == "authenticated":
            self.auth.labels("success").inc()
        elif fmt == "authentication failed":
            self.auth.labels("failure").inc()
        elif fmt == "TLS handshake completed":
            door = str(event.get("front_door"))
            self.tls_handshakes.labels(door, str(event.get("tls_version"))).inc()
        elif fmt == "TLS handshake failed":
            self.tls_failures.labels(str(event.get("front_door"))).inc()
        elif fmt == "Graph request failed; retrying":
            self.graph_retries.inc()
            delay = event.get("delay")
            if event.get("status") == 429 and isinstance(delay, (int, float)):
                self.graph_throttle.inc(delay)

    def text(self) -> bytes:
        """The registry in the text format."""
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    """Values read at scrape time from objects that keep them anyway."""

    def __init__(self) -> None:
        self.poller: StatusPoller | None = None
        self.token_fetches: Callable[[], int] | None = None
        self.graph_requests: Callable[[], Mapping[int, int]] | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        # Always described, as when it was a registered counter, even with
        # no Graph provider (then it has no samples).
        requests = CounterMetricFamily(
            "smtpproxy_graph_requests",
            "Graph HTTP requests by response status (0: no response).",
            labels=["status"],
        )
        if self.graph_requests is not None:
            for status, count in sorted(self.graph_requests().items()):
                requests.add_metric([str(status)], float(count))
        yield requests
        if self.token_fetches is not None:
            fetched = CounterMetricFamily(
                "smtpproxy_graph_token_refreshes", "Access tokens requested from Entra ID."
            )
            fetched.add_metric([], float(self.token_fetches()))
            yield fetched
        poller = self.poller
        if poller is None:
            return
        stats = poller.queue_stats
        depth = GaugeMetricFamily(
            "smtpproxy_queue_messages", "Messages in the queue by state.", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "smtpproxy_queue_oldest_age_seconds",
            "Age of the oldest message waiting in the queue (0 when none).",
            labels=["state"],
        )
        size = GaugeMetricFamily("smtpproxy_queue_bytes", "Bytes of mail held in the queue.")
        up = GaugeMetricFamily(
            "smtpproxy_queue_stats_up", "1 when the queue's last statistics came back."
        )
        up.add_metric([], 0.0 if poller.queue_problem else 1.0)
        found = poller.queue_writability
        writable = GaugeMetricFamily(
            "smtpproxy_queue_writable",
            "1 when the queue's last write check could take the write lock (or session).",
        )
        writable.add_metric([], 1.0 if found is not None and found.problem is None else 0.0)
        yield writable
        if found is not None and found.free_bytes is not None:
            free = GaugeMetricFamily(
                "smtpproxy_queue_disk_free_bytes",
                "Free bytes on the filesystem holding the queue's files (SQLite only).",
            )
            free.add_metric([], float(found.free_bytes))
            yield free
        if stats is not None:
            for state in ("queued", "delivering", "dead"):
                depth.add_metric([state], float(getattr(stats, state)))
            age = 0.0
            if stats.oldest_queued_at is not None:
                age = max(0.0, poller.now() - stats.oldest_queued_at)
            oldest.add_metric(["queued"], age)
            size.add_metric([], float(stats.bytes))
            yield depth
            yield oldest
            yield size
        yield up


class CountingGuard(Guard):
    """The relay's guard, counting each refusal it decides into L{Metrics}."""

    def __init__(self, settings: GuardSettings, clock: IReactorTime, metrics: Metrics) -> None:
        super().__init__(settings, clock)
        self._metrics = metrics

    def connect(self, ip: str) -> tuple[Reply | None, bool]:
        refusal, needs_auth = super().connect(ip)
        if refusal is not None:
            self._metrics.refusal("smtp", _connect_reason(refusal))
        return refusal, needs_auth

    def message(self, ip: str, user: str | None) -> Reply | None:
        refusal = super().message(ip, user)
        if refusal is not None:
            self._metrics.rate_limited.labels("user" if "user" in refusal.text else "ip").inc()
        return refusal


def _connect_reason(reply: Reply) -> str:
    """A label for a connect refusal, from the guard's reply."""
    text = reply.text
    if reply.code == 554:
        return "network"
    if "failed logins" in text:
        return "auth_blocked"
    if "from your address" in text:
        return "per_ip_cap"
    return "total_cap"


class MetricsResource(Resource):
    """C{/metrics}: the text format, for Prometheus (network policy as every path)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._metrics = metrics

    def render(self, request: Request) -> bytes:
        wrong = only_get(request)
        if wrong is not None:
            return wrong
        data = self._metrics.text()
        request.setResponseCode(200)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode("ascii")])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(data)])
        return b"" if request.method == b"HEAD" else data


def mount(metrics: Metrics) -> Mount:
    """C{/metrics} for the site."""
    return Mount("/metrics", MetricsResource(metrics))
