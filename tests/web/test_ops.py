"""The operations side of the HTTP listener: pure decisions, then the real twistd.

Pure parts (client address, body limits, readiness, the descriptor plan,
the metrics' event counting, the poller on a C{Clock}) are tested without
sockets; C{/metrics}, C{/readyz} and HTTPS against C{twistd smtpproxy} with
real clients (smtplib, http.client), the metrics read back with
C{prometheus_client}'s own parser.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import ssl
import subprocess
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from smtpproxy import fdlimit, tls
from smtpproxy.policy.rules import parse_networks
from smtpproxy.queue.model import Stats, Writability
from smtpproxy.web import clientaddr, ready
from smtpproxy.web.channel import body_problem
from smtpproxy.web.metrics import Metrics
from smtpproxy.web.status import StatusPoller
from tests.support import async_test, in_thread, message, sendmail
from tests.test_twistd import Relay, free_port

PROXIES = parse_networks("10.0.0.0/8")


class ClientAddressTests(SynchronousTestCase):
    def test_untrusted_peer_header_ignored(self) -> None:
        """Without trusted proxies, or from a peer outside them, the peer is the client."""
        xff = [b"192.0.2.7"]
        self.assertEqual(clientaddr.client_host("203.0.113.5", xff, ()), "203.0.113.5")
        self.assertEqual(clientaddr.client_host("203.0.113.5", xff, PROXIES), "203.0.113.5")

    def test_trusted_chain_read_from_the_right(self) -> None:
        """Trusted hops are stepped over; what a client prepended is never reached."""
        chain = [b"192.0.2.66, 198.51.100.9", b"10.1.1.1"]
        self.assertEqual(clientaddr.client_host("10.0.0.2", chain, PROXIES), "198.51.100.9")
        self.assertEqual(clientaddr.client_host("10.0.0.2", [b"10.3.3.3"], PROXIES), "10.3.3.3")

    def test_ports_and_brackets(self) -> None:
        """Entries with ports, IPv6 in brackets, are read as their address."""
        self.assertEqual(
            clientaddr.forwarded_hops([b"192.0.2.1:4711, [2001:db8::1]:80, 2001:db8::2"]),
            ["192.0.2.1", "2001:db8::1", "2001:db8::2"],
        )

    def test_unreadable_header_from_proxy_is_unknown_client(self) -> None:
        """Junk, an empty entry, non-ASCII or too many hops: None (refused by every policy)."""
        for bad in (b"junk", b"192.0.2.1,,", "\u00e9".encode(), b"192.0.2.1," * 40):
            self.assertIsNone(clientaddr.client_host("10.0.0.2", [bad], PROXIES), bad)


class BodyLimitTests(SynchronousTestCase):
    def test_body_problem(self) -> None:
        """Declared lengths over the limit and chunked bodies where none is taken: 413."""
        self.assertIsNone(body_problem(0, 0))
        self.assertEqual(body_problem(1, 0), 413)
        self.assertEqual(body_problem(None, 0), 413)
        self.assertIsNone(body_problem(None, 10))
        self.assertIsNone(body_problem(10, 10))
        self.assertEqual(body_problem(11, 10), 413)


class ReadinessTests(SynchronousTestCase):
    def facts(self, **changes: Any) -> ready.Facts:
        values: dict[str, Any] = {
            "listening": True,
            "stopping": False,
            "provider_problem": None,
            "queue_problem": None,
            "queued_mode": True,
        }
        values.update(changes)
        return ready.Facts(**values)

    def test_ready(self) -> None:
        """All checks pass: 200 and each check "ok"."""
        code, body = ready.readiness(self.facts())
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            {
                "status": "ready",
                "checks": {"listeners": "ok", "shutdown": "ok", "provider": "ok", "queue": "ok"},
            },
        )

    def test_each_failure_named(self) -> None:
        """Any failing check gives 503 and names what failed."""
        for change, key, value in (
            ({"listening": False}, "listeners", "not listening"),
            ({"stopping": True}, "shutdown", "stopping"),
            ({"provider_problem": "no token"}, "provider", "no token"),
            ({"queue_problem": "queue not open"}, "queue", "queue not open"),
        ):
            code, body = ready.readiness(self.facts(**change))
            self.assertEqual(code, 503, change)
            self.assertEqual(body["checks"][key], value)  # type: ignore[index]

    def test_direct_mode_has_no_queue_check(self) -> None:
        """Without a queue there is no queue check to fail."""
        code, body = ready.readiness(self.facts(queued_mode=False, queue_problem="x"))
        self.assertEqual(code, 200)
        self.assertNotIn("queue", body["checks"])


MB = 1024 * 1024


class QueueProblemTests(SynchronousTestCase):
    """L{ready.queue_problem}: when a queue counts as able to take mail, and how it says not."""

    def problem(self, **changes: Any) -> str | None:
        values: dict[str, Any] = {
            "is_open": True,
            "stats": Stats(queued=1, delivering=0, dead=0, bytes=500, oldest_queued_at=1.0),
            "stats_problem": None,
            "writability": Writability(None, free_bytes=100 * MB),
            "write_problem": None,
            "max_bytes": 1000,
            "need_bytes": 40 * MB,
        }
        values.update(changes)
        return ready.queue_problem(**values)

    def test_writable_with_room_is_ready(self) -> None:
        """Open, writable, room on disk, under QUEUE_MAX_BYTES: no problem."""
        self.assertIsNone(self.problem())

    def test_each_reason_named(self) -> None:
        """Each way a queue cannot take mail gives a reason an operator can act on."""
        for change, expected in (
            ({"is_open": False}, "queue not open"),
            ({"writability": Writability("read-only database")}, "read-only database"),
            (
                {"writability": Writability(None, free_bytes=5 * MB + 7)},
                "disk has 5 MB free, need 40 MB",
            ),
            (
                {"stats": Stats(0, 0, 2, 1000, None)},
                "queue full: 1000 of 1000 bytes",
            ),
            ({"write_problem": "no answer within 10 s"}, "no answer within 10 s"),
            ({"stats_problem": "not checked yet"}, "not checked yet"),
        ):
            self.assertEqual(self.problem(**change), expected, change)

    def test_boundaries(self) -> None:
        """Free space exactly what is needed is enough; the queue is full once less than
        64 KiB (or half a smaller limit) is left under QUEUE_MAX_BYTES."""
        self.assertIsNone(self.problem(writability=Writability(None, free_bytes=40 * MB)))
        limit = 10 * MB
        self.assertIsNone(self.problem(max_bytes=limit, stats=Stats(0, 0, 0, limit - 65536, None)))
        self.assertEqual(
            self.problem(max_bytes=limit, stats=Stats(0, 0, 0, limit - 65535, None)),
            f"queue full: {limit - 65535} of {limit} bytes",
        )
        self.assertIsNone(self.problem(max_bytes=1000, stats=Stats(0, 0, 0, 500, None)))
        self.assertEqual(
            self.problem(max_bytes=1000, stats=Stats(0, 0, 0, 501, None)),
            "queue full: 501 of 1000 bytes",
        )

    def test_every_reason_at_once(self) -> None:
        """A full queue on a read-only disk short of space says all three, not the first only."""
        found = self.problem(
            writability=Writability("read-only filesystem at /q", free_bytes=0),
            stats=Stats(0, 0, 0, 2000, None),
        )
        self.assertEqual(
            found,
            "read-only filesystem at /q; disk has 0 MB free, need 40 MB;"
            " queue full: 2000 of 1000 bytes",
        )

    def test_not_checked_yet_is_said_once(self) -> None:
        """Before the first answers, both questions say "not checked yet": named once."""
        found = self.problem(
            stats=None,
            writability=None,
            stats_problem="not checked yet",
            write_problem="not checked yet",
        )
        self.assertEqual(found, "not checked yet")

    def test_no_limit_and_no_disk_figure(self) -> None:
        """QUEUE_MAX_BYTES 0 is no limit; a store with no free-space figure (PostgreSQL)
        is not held to one."""
        self.assertIsNone(self.problem(max_bytes=0, writability=Writability(None, free_bytes=None)))

    def test_room_needed(self) -> None:
        """One largest message plus half again, never less than 10 MB of margin."""
        self.assertEqual(ready.room_needed(40 * MB), 60 * MB)
        self.assertEqual(ready.room_needed(1 * MB), 11 * MB)


class FdLimitTests(SynchronousTestCase):
    def test_plan(self) -> None:
        """Enough: unchanged; below the hard limit: raised to what is needed; above: refused."""
        want = fdlimit.needed(1000, 64)
        self.assertEqual(want, 1000 + 64 + fdlimit.MARGIN)
        self.assertIsNone(fdlimit.plan(20000, 20000, want))
        self.assertEqual(fdlimit.plan(1024, 4096, want), want)
        self.assertEqual(fdlimit.plan(1024, resource.RLIM_INFINITY, want), want)
        with self.assertRaises(fdlimit.FdLimitError) as caught:
            fdlimit.plan(1024, 1024, want)
        self.assertIn("open-file limit is 1024", str(caught.exception))

    def test_unlimited_smtp_raises_to_the_hard_limit(self) -> None:
        """SMTP_MAX_CONNECTIONS=0 bounds nothing: the soft limit goes to the hard one."""
        self.assertIsNone(fdlimit.needed(0, 64))
        self.assertEqual(fdlimit.plan(1024, 4096, None), 4096)
        self.assertIsNone(fdlimit.plan(4096, 4096, None))


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text output, parsed by prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(SynchronousTestCase):
    def test_message_events_counted(self) -> None:
        """Delivery events become counts, latencies and sizes; worker attempts are not sizes."""
        metrics = Metrics()
        base = {"provider": "graph", "size": 2048}
        metrics.observe(
            {"log_format": "message delivered", "outcome": "delivered", "duration_ms": 120, **base}
        )
        metrics.observe(
            {"log_format": "message not delivered", "outcome": "rejected", "duration_ms": 5, **base}
        )
        metrics.observe(
            {"log_format": "message delivered", "outcome": "delivered", "attempts": 2, **base}
        )
        found = samples(metrics)
        key = "smtpproxy_messages_total"
        door = (("front_door", "smtp"), ("outcome", "delivered"), ("provider", "graph"))
        self.assertEqual(found[(key, door)], 1)
        queue = (("front_door", "queue"), ("outcome", "delivered"), ("provider", "graph"))
        self.assertEqual(found[(key, queue)], 1)
        sizes = ("smtpproxy_message_size_bytes_count", (("front_door", "smtp"),))
        self.assertEqual(found[sizes], 2)
        latency = (("outcome", "delivered"), ("provider", "graph"))
        self.assertEqual(found[("smtpproxy_delivery_duration_seconds_sum", latency)], 0.12)

    def test_auth_and_graph_events(self) -> None:
        """Logins, Graph statuses (from the provider), retries and throttle waits are counted."""
        metrics = Metrics()
        # The provider counts its requests by status itself (no event per request).
        metrics.watch_graph_requests(lambda: {202: 1})
        for event in (
            {"log_format": "authenticated"},
            {"log_format": "authentication failed"},
            {"log_format": "authentication failed"},
            {"log_format": "Graph request failed; retrying", "status": 429, "delay": 2.5},
            {"log_format": "Graph request failed; retrying", "status": 503, "delay": 1.0},
        ):
            metrics.observe(event)
        found = samples(metrics)
        self.assertEqual(found[("smtpproxy_auth_attempts_total", (("result", "failure"),))], 2)
        self.assertEqual(found[("smtpproxy_graph_requests_total", (("status", "202"),))], 1)
        self.assertEqual(found[("smtpproxy_graph_retries_total", ())], 2)
        self.assertEqual(found[("smtpproxy_graph_throttle_wait_seconds_total", ())], 2.5)

    def test_tls_events(self) -> None:
        """Completed handshakes are counted by front door and version, failures by front door."""
        metrics = Metrics()
        done = {"log_format": "TLS handshake completed"}
        for event in (
            {**done, "front_door": "smtps", "tls_version": "TLSv1.3"},
            {**done, "front_door": "smtps", "tls_version": "TLSv1.3"},
            {**done, "front_door": "https", "tls_version": "TLSv1.2"},
            {"log_format": "TLS handshake failed", "front_door": "starttls"},
        ):
            metrics.observe(event)
        found = samples(metrics)
        name = "smtpproxy_tls_handshakes_total"
        self.assertEqual(found[(name, (("front_door", "smtps"), ("version", "TLSv1.3")))], 2)
        self.assertEqual(found[(name, (("front_door", "https"), ("version", "TLSv1.2")))], 1)
        failed = ("smtpproxy_tls_handshake_failures_total", (("front_door", "starttls"),))
        self.assertEqual(found[failed], 1)

    def test_bad_event_never_raises(self) -> None:
        """An event with odd field types is skipped, never an exception in logging."""
        Metrics().observe({"log_format": "message delivered", "provider": object(), "size": "x"})

    def test_registries_are_separate(self) -> None:
        """Two Metrics do not share counts (no global registry)."""
        one, two = Metrics(), Metrics()
        one.observe({"log_format": "authenticated"})
        success = ("smtpproxy_auth_attempts_total", (("result", "success"),))
        self.assertEqual(samples(one)[success], 1)
        self.assertEqual(samples(two)[success], 0)


class PollerTests(SynchronousTestCase):
    def test_answers_cached_and_bounded(self) -> None:
        """The poller keeps the last answers; a question never answered times out as a problem.
        The queue's statistics are asked at the reactor's time (leases expire by it)."""
        clock = Clock()
        pending: defer.Deferred[None] = defer.Deferred()
        stats = Stats(queued=3, delivering=1, dead=0, bytes=100, oldest_queued_at=40.0)
        asked_at: list[float] = []

        def stats_at(now: float) -> defer.Deferred[Stats]:
            asked_at.append(now)
            return defer.succeed(stats)

        poller = StatusPoller(clock, lambda: pending, stats_at)
        clock.advance(100)
        poller.start()
        self.assertEqual(poller.queue_stats, stats)
        self.assertEqual(asked_at, [100.0])
        self.assertEqual(poller.provider_problem, "not checked yet")
        clock.advance(11)
        self.assertIn("no answer", poller.provider_problem or "")
        metrics = Metrics()
        metrics.watch_queue(poller)
        found = samples(metrics)
        self.assertEqual(found[("smtpproxy_queue_messages", (("state", "queued"),))], 3)
        self.assertEqual(
            found[("smtpproxy_queue_oldest_age_seconds", (("state", "queued"),))], 111 - 40
        )
        poller.stop()

    def test_write_check_kept_and_its_failure_named(self) -> None:
        """The queue's write check is asked with the others; its finding is kept, and a
        check that fails leaves no stale finding behind, only why it failed, named as the
        write check's (the statistics question to the same store may fail alike)."""
        clock = Clock()
        answers: list[defer.Deferred[Writability]] = [
            defer.succeed(Writability("read-only database", 10)),
            defer.fail(RuntimeError("the queue store is not open")),
        ]
        poller = StatusPoller(
            clock, None, lambda now: defer.succeed(Stats(0, 0, 0, 0, None)), lambda: answers.pop(0)
        )
        self.assertEqual(poller.queue_write_problem, "not checked yet")
        poller.start()
        self.assertEqual(poller.queue_writability, Writability("read-only database", 10))
        self.assertIsNone(poller.queue_write_problem)
        metrics = Metrics()
        metrics.watch_queue(poller)
        found = samples(metrics)
        self.assertEqual(found[("smtpproxy_queue_writable", ())], 0)
        self.assertEqual(found[("smtpproxy_queue_disk_free_bytes", ())], 10)
        clock.advance(5)
        self.assertIsNone(poller.queue_writability)
        self.assertEqual(poller.queue_write_problem, "write check: the queue store is not open")
        self.assertNotIn(("smtpproxy_queue_disk_free_bytes", ()), samples(metrics))
        poller.stop()


def fetch(port: int, path: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """GET C{path} with http.client (HTTPS when C{context} is given)."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def certificate_files(case: TestCase) -> tuple[str, str]:
    """A throw-away certificate and key for relay.test, written as PEM files under the test."""
    cert, key = tls.self_signed("relay.test")
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    paths = []
    for name, data in (("cert.pem", cert), ("key.pem", key)):
        paths.append(os.path.join(directory, name))
        with open(paths[-1], "wb") as f:
            f.write(data)
    return paths[0], paths[1]


class TwistdTests(TestCase):
    @async_test
    async def test_metrics_and_readyz_from_the_real_process(self) -> None:
        """After one message over SMTP, /metrics counts it and /readyz says ready."""
        relay = Relay(self)

        def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            relay.wait_listening()
            sendmail(relay.smtp_port, "a@example.com", ["b@example.org"], message())
            return fetch(relay.http_port, "/readyz"), fetch(relay.http_port, "/metrics")

        (ready_code, ready_body), (code, text) = await in_thread(scenario)
        self.assertEqual((ready_code, json.loads(ready_body)["status"]), (200, "ready"))
        self.assertEqual(code, 200)
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.labels.get("outcome") in (None, "delivered"):
                    found[sample.name] = sample.value
        self.assertEqual(found["smtpproxy_messages_total"], 1)
        self.assertEqual(found["smtpproxy_smtp_sessions_open"], 0)

    @async_test
    async def test_https(self) -> None:
        """With HTTP_TLS_CERT_FILE/KEY_FILE the listener speaks HTTPS (TLS 1.2+)."""
        paths = certificate_files(self)
        relay = Relay(self, HTTP_TLS_CERT_FILE=paths[0], HTTP_TLS_KEY_FILE=paths[1])
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def scenario() -> tuple[int, bytes]:
            relay.wait_listening()
            return fetch(relay.http_port, "/healthz", context)

        self.assertEqual(await in_thread(scenario), (200, b'{"status": "ok"}'))

    @async_test
    async def test_tls_handshakes_by_version(self) -> None:
        """openssl s_client's handshakes on SMTPS, STARTTLS and HTTPS move exactly their counters.

        TLS 1.2 and 1.3 on each SMTP door, one refused handshake on each
        (a cipher the relay does not offer), then two scrapes over HTTPS:
        the first scrape's own handshake is in its answer, and the second
        shows that nothing else moved in between.
        """
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is installed by .ci/run")
        paths = certificate_files(self)
        smtps = free_port()
        relay = Relay(
            self,
            SMTPS_LISTEN=f"127.0.0.1:{smtps}",
            TLS_CERT_FILE=paths[0],
            TLS_KEY_FILE=paths[1],
            HTTP_TLS_CERT_FILE=paths[0],
            HTTP_TLS_KEY_FILE=paths[1],
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3

        def s_client(port: int, *args: str) -> bool:
            done = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
            return b"Cipher is (NONE)" not in done.stdout and b", Cipher is " in done.stdout

        def scenario() -> tuple[list[bool], bytes, bytes]:
            relay.wait_listening()
            starttls = ("-starttls", "smtp")
            shook = [
                s_client(smtps, "-tls1_2"),
                s_client(smtps, "-tls1_3"),
                s_client(smtps, "-tls1_3"),
                s_client(relay.smtp_port, *starttls, "-tls1_2"),
                s_client(relay.smtp_port, *starttls, "-tls1_3"),
                s_client(smtps, "-tls1_2", "-cipher", "AES128-SHA"),
                s_client(relay.smtp_port, *starttls, "-tls1_2", "-cipher", "AES128-SHA"),
            ]
            first = fetch(relay.http_port, "/metrics", context)[1]
            second = fetch(relay.http_port, "/metrics", context)[1]
            return shook, first, second

        shook, first, second = await in_thread(scenario)
        self.assertEqual(shook, [True] * 5 + [False] * 2)

        def counts(text: bytes) -> dict[tuple[str, ...], float]:
            found: dict[tuple[str, ...], float] = {}
            for family in text_string_to_metric_families(text.decode()):
                for sample in family.samples:
                    if sample.name == "smtpproxy_tls_handshakes_total":
                        labels = (sample.labels["front_door"], sample.labels["version"])
                        found[labels] = sample.value
                    elif sample.name == "smtpproxy_tls_handshake_failures_total":
                        found[(sample.labels["front_door"], "failed")] = sample.value
            return found

        expected = {
            ("smtps", "TLSv1.2"): 1.0,
            ("smtps", "TLSv1.3"): 2.0,
            ("starttls", "TLSv1.2"): 1.0,
            ("starttls", "TLSv1.3"): 1.0,
            ("smtps", "failed"): 1.0,
            ("starttls", "failed"): 1.0,
            ("https", "TLSv1.3"): 1.0,
        }
        self.assertEqual(counts(first), expected)
        self.assertEqual(counts(second), {**expected, ("https", "TLSv1.3"): 2.0})
