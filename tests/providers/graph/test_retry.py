"""Retry decisions for Graph: what is retried, how long we wait, and what the client is told."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError, reply_for_failure
from smtpproxy.providers.graph.retry import (
    MAX_RETRY_AFTER,
    GraphRequestError,
    Problem,
    Retry,
    Stop,
    Tuning,
    backoff,
    bounded_wait,
    decide,
    network_problem,
    parse_graph_error,
    parse_retry_after,
    response_problem,
)

NOW = 1_700_000_000.0
TUNING = Tuning()


def _graph_body(code: str, message: str = "Something went wrong.") -> bytes:
    inner = {"request-id": "4f8b7c3e-0000-4000-8000-000000000001", "date": "2030-01-01T00:00:00"}
    return json.dumps({"error": {"code": code, "message": message, "innerError": inner}}).encode()


def _reply(problem: Problem) -> str:
    reply = reply_for_failure(problem.error)
    return f"{reply.code} {reply.render().decode()}"


class RetryAfterTests(SynchronousTestCase):
    def test_seconds(self) -> None:
        """Delta-seconds are read as they are, fractions included."""
        self.assertEqual(parse_retry_after("120", NOW), 120.0)
        self.assertEqual(parse_retry_after(" 1.5 ", NOW), 1.5)

    def test_http_date(self) -> None:
        """An HTTP date is turned into the seconds from now until then (never negative)."""
        later = format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)
        earlier = format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True)
        self.assertEqual(parse_retry_after(later, NOW), 30.0)
        self.assertEqual(parse_retry_after(earlier, NOW), 0.0)

    def test_unreadable(self) -> None:
        """Absent or unreadable values mean 'use our own backoff'."""
        for value in (None, "", "soon", "-5", "Wed, 99 Foo 2030"):
            self.assertIsNone(parse_retry_after(value, NOW), value)

    def test_huge_values_are_capped(self) -> None:
        """A wait longer than MAX_RETRY_AFTER is read as MAX_RETRY_AFTER: 400 digits (which
        float() makes inf) and an HTTP date in 2100 or 9999 alike; a shorter one is kept."""
        for value in (
            "9" * 400,
            "86400",
            "Fri, 01 Jan 2100 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ):
            self.assertEqual(parse_retry_after(value, NOW), MAX_RETRY_AFTER, value)
        self.assertEqual(parse_retry_after(str(int(MAX_RETRY_AFTER) - 1), NOW), MAX_RETRY_AFTER - 1)

    def test_bounded_wait(self) -> None:
        """NaN and negative waits are no waits (None: our backoff); inf is the cap."""
        self.assertIsNone(bounded_wait(float("nan")))
        self.assertIsNone(bounded_wait(-1.0))
        self.assertIsNone(bounded_wait(float("-inf")))
        self.assertEqual(bounded_wait(float("inf")), MAX_RETRY_AFTER)
        self.assertEqual(bounded_wait(0.0), 0.0)


class BackoffTests(SynchronousTestCase):
    def test_schedule(self) -> None:
        """Without jitter the waits are 1 s, 2 s, 4 s; jitter adds at most 20%."""
        self.assertEqual([backoff(n, TUNING, 0.0) for n in range(3)], [1.0, 2.0, 4.0])
        self.assertAlmostEqual(backoff(2, TUNING, 0.999), 4.0 * 1.1998)

    def test_transient_retried_three_times(self) -> None:
        """A 503 is retried after attempts 0, 1 and 2; the fourth failure stops with a 451."""
        problem = response_problem(503, _graph_body("ServiceUnavailable"), None)
        steps = [decide(problem, n, NOW, NOW + 120, TUNING, 0.0) for n in range(4)]
        self.assertEqual(steps[:3], [Retry(1.0), Retry(2.0), Retry(4.0)])
        stop = steps[3]
        assert isinstance(stop, Stop)
        self.assertIsInstance(stop.error, TransientDeliveryError)
        self.assertIn("gave up after 4 attempts", stop.error.reason)
        self.assertEqual(reply_for_failure(stop.error).code, 451)

    def test_retry_after_wins(self) -> None:
        """Retry-After replaces our backoff, even when it asks for less."""
        problem = response_problem(429, _graph_body("ApplicationThrottled"), 0.25)
        self.assertEqual(decide(problem, 0, NOW, NOW + 120, TUNING, 0.5), Retry(0.25))
        problem = response_problem(429, _graph_body("ApplicationThrottled"), 30.0)
        self.assertEqual(decide(problem, 1, NOW, NOW + 120, TUNING, 0.5), Retry(30.0))

    def test_budget(self) -> None:
        """A wait that would cross the time budget stops at once with a 451."""
        problem = response_problem(429, _graph_body("ApplicationThrottled"), 90.0)
        step = decide(problem, 0, NOW, NOW + 60, TUNING, 0.0)
        assert isinstance(step, Stop)
        self.assertIn("time limit", step.error.reason)
        self.assertEqual(_reply(problem)[:3], "451")
        backoff_problem = response_problem(500, b"", None)
        self.assertIsInstance(decide(backoff_problem, 2, NOW, NOW + 3.9, TUNING, 0.0), Stop)
        self.assertEqual(decide(backoff_problem, 2, NOW, NOW + 4.1, TUNING, 0.0), Retry(4.0))

    def test_final_errors_are_not_retried(self) -> None:
        """A 400 stops on the first attempt with Graph's own error."""
        problem = response_problem(400, _graph_body("ErrorInvalidRecipients"), None)
        self.assertEqual(decide(problem, 0, NOW, NOW + 120, TUNING, 0.0), Stop(problem.error))


class ClassificationTests(SynchronousTestCase):
    def test_transient_statuses(self) -> None:
        """429, 503, 504 and other 5xx are retryable; 500/502/504 may have taken effect."""
        for status in (409, 423, 429, 500, 502, 503, 504, 509):
            problem = response_problem(status, _graph_body("x"), None)
            self.assertTrue(problem.retryable, status)
            self.assertEqual(problem.ambiguous, status in (500, 502, 504), status)
            self.assertEqual(reply_for_failure(problem.error).code, 451, status)
        self.assertEqual(response_problem(429, b"", None).error.status, "4.4.5")
        self.assertEqual(response_problem(409, b"", None).error.status, "4.2.1")

    def test_full_mailbox(self) -> None:
        """413 ErrorQuotaExceeded (and 507) is 452 4.2.2 at once: temporary for the client,
        but not retried within the message's budget (freeing space takes longer)."""
        for status, code in ((413, "ErrorQuotaExceeded"), (507, "x")):
            problem = response_problem(status, _graph_body(code), None)
            self.assertFalse(problem.retryable, status)
            reply = reply_for_failure(problem.error)
            self.assertEqual((reply.code, reply.status), (452, "4.2.2"), status)
            self.assertIn("over its storage quota", reply.text)
        # Only the quota: any other 413 stays a size bounce.
        other = reply_for_failure(response_problem(413, _graph_body("x"), None).error)
        self.assertEqual((other.code, other.status), (554, "5.3.4"))

    def test_permanent_statuses(self) -> None:
        """400, 403, 404, 413 and other 4xx are final, with Graph's code in the reply."""
        cases = {
            (400, "ErrorInvalidRecipients"): "550 5.1.1 Graph ErrorInvalidRecipients: Bad.",
            (400, "ErrorInvalidParameter"): "554 5.6.0 Graph ErrorInvalidParameter: Bad.",
            (404, "ErrorInvalidUser"): "550 5.1.0 Graph ErrorInvalidUser: Bad.",
            (413, "RequestEntityTooLarge"): "554 5.3.4 Graph RequestEntityTooLarge: Bad.",
            (415, "UnsupportedMediaType"): "554 5.6.0 Graph UnsupportedMediaType: Bad.",
        }
        for (status, code), expected in cases.items():
            problem = response_problem(status, _graph_body(code, "Bad."), None)
            self.assertFalse(problem.retryable)
            self.assertIsInstance(problem.error, GraphRequestError)
            self.assertEqual(_reply(problem), expected)

    def test_forbidden_names_the_permission(self) -> None:
        """A 403 says which application permission the relay needs for that path."""
        simple = response_problem(403, _graph_body("ErrorAccessDenied", "Access is denied."), None)
        self.assertEqual(
            _reply(simple),
            "554 5.7.1 Graph ErrorAccessDenied: Access is denied. "
            "(the relay's Entra app needs the Mail.Send application permission)",
        )
        draft = response_problem(403, _graph_body("ErrorAccessDenied"), None, needs_read_write=True)
        self.assertIn("Mail.Send and Mail.ReadWrite", draft.error.reason)

    def test_send_as_denied_names_the_mailbox_fixes(self) -> None:
        """ErrorSendAsDenied points at GRAPH_SENDER and the access policy, not a permission
        the app already has (granting Mail.Send again would not help)."""
        for read_write in (False, True):
            problem = response_problem(
                403, _graph_body("ErrorSendAsDenied", "No."), None, needs_read_write=read_write
            )
            reply = _reply(problem)
            self.assertTrue(reply.startswith("554 5.7.1 Graph ErrorSendAsDenied: No. "), reply)
            for fix in ("GRAPH_SENDER", "application access policy", "RBAC for Applications"):
                self.assertIn(fix, reply)
            self.assertNotIn("Mail.Send", reply)

    def test_unauthorized_after_refresh_is_ours(self) -> None:
        """A 401 that survived a token refresh is our configuration: 451, not a bounce."""
        problem = response_problem(401, _graph_body("InvalidAuthenticationToken"), None)
        self.assertFalse(problem.retryable)
        self.assertNotIsInstance(problem.error, PermanentDeliveryError)
        self.assertTrue(_reply(problem).startswith("451 4.3.5 Graph InvalidAuthenticationToken"))

    def test_unreadable_error_body(self) -> None:
        """An HTML error page yields the HTTP status as the code and no echoed markup."""
        error = parse_graph_error(502, b"<html><body>Bad gateway</body></html>")
        self.assertEqual((error.code, error.message), ("HTTP502", ""))
        problem = response_problem(400, b"<html>nope</html>", None)
        self.assertEqual(_reply(problem), "554 5.6.0 Graph HTTP400")

    def test_error_fields(self) -> None:
        """Graph's request id from innerError is kept for the log; long messages are clipped."""
        error = parse_graph_error(400, _graph_body("ErrorInvalidRecipients", "x" * 500))
        self.assertEqual(error.request_id, "4f8b7c3e-0000-4000-8000-000000000001")
        self.assertEqual(len(error.message), 200)
        problem = response_problem(400, _graph_body("ErrorInvalidRecipients"), None)
        self.assertEqual(problem.fields["request_id"], "4f8b7c3e-0000-4000-8000-000000000001")

    def test_network_problems(self) -> None:
        """Timeouts and dropped connections are retryable; refused connects had no effect."""
        timeout = network_problem("CancelledError", timed_out=True, connected=True)
        self.assertTrue(timeout.retryable and timeout.ambiguous)
        self.assertEqual(timeout.error.status, "4.4.1")
        refused = network_problem("ConnectionRefusedError", timed_out=False, connected=False)
        self.assertTrue(refused.retryable)
        self.assertFalse(refused.ambiguous)
        self.assertEqual(refused.error.status, "4.4.2")

    def test_timeout_while_connecting(self) -> None:
        """A timeout before the connection was made (packets dropped on the way) is
        retried like a refused connection, had no effect, and says it never connected."""
        problem = network_problem("ConnectingCancelledError", timed_out=True, connected=False)
        self.assertTrue(problem.retryable)
        self.assertFalse(problem.ambiguous)
        self.assertEqual(problem.error.status, "4.4.1")
        self.assertIn("no connection to Graph in time", problem.summary)
        self.assertIsInstance(decide(problem, 0, 0.0, 100.0, Tuning(), 0.0), Retry)
