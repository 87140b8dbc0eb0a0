"""Review 4: defects found in the Graph provider's second round (issue 13).

Each test fails on the code as reviewed and says in its docstring what is
wrong and what is expected.  HTTP runs in memory (StubTreq over the fake
Graph) and time on a Clock, as in test_budget_provider.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import TransientDeliveryError, reply_for_failure
from smtpproxy.mime.message import Email
from tests.fakegraph import Fault
from tests.providers.graph import test_provider as tp
from tests.providers.graph.test_budget_provider import Harness, _email


class BudgetChargeWithoutRequestTests(SynchronousTestCase):
    def test_token_failure_does_not_use_up_the_sending_budget(self) -> None:
        """A message that fails before any request reaches Graph must give its
        budget charge back.

        docs/graph.md ("What counts") says a message is charged "when the relay
        hands it to Graph"; one refused before any request gives its charge
        back.  But GraphProvider._send charges in _choose_mailbox and gives back
        only when plan_delivery raises: when the token cannot be had (Entra
        refuses the credential, is down, the certificate file is unreadable)
        no request ever reaches Graph, yet each attempt is charged.  With
        2 messages a minute, two such failures leave the mailbox "out of
        budget" and the next message, with a working token, is held back with
        451 4.7.0 although nothing was sent.  Under a queue that retries
        through an Entra outage the phantom charges eat the day's recipients
        budget and hold real mail for up to 24 h after Entra recovers.

        Expected: the third message goes out (charge returned on failures
        that never reached Graph).
        """
        h = Harness(per_minute=2, exchange_per_minute=2)
        h.fake.script(
            "token",
            Fault(400, "invalid_client", "bad secret"),
            Fault(400, "invalid_client", "bad secret"),
        )
        for n in range(2):
            error = self.failureResultOf(h.send(_email(n)), TransientDeliveryError).value
            self.assertEqual(reply_for_failure(error).status, "4.3.5")
        self.assertEqual(h.fake.routes("sendMail"), [])
        # Entra works again: nothing has been sent this minute.
        self.assertIsNone(self.successResultOf(h.send(_email(2))))
        self.assertEqual(len(h.fake.deliveries), 1)


class HugeRetryAfterTests(SynchronousTestCase):
    """A Retry-After header Graph (or a gateway in front of it) sends is taken as is.

    parse_retry_after (retry.py) returns any digit string as a float, so
    C{Retry-After: 999...9} (400 digits) is C{inf}, and an HTTP date in 2100
    is some 2.3e9 s; provider._call copies it to the error's C{retry_after}
    unbounded.
    """

    def _failed(self, retry_after: str) -> TransientDeliveryError:
        h = Harness(per_minute=0)
        h.fake.script("sendMail", Fault(503, retry_after=retry_after))
        error = self.failureResultOf(h.send(_email(1)), TransientDeliveryError).value
        assert isinstance(error, TransientDeliveryError)
        return error

    def test_infinite_retry_after_gives_the_api_client_a_503(self) -> None:
        """HTTP API, direct mode: error_for_failure (web/api/submit.py:89) does
        C{round(wait)} on the provider's C{retry_after}; for C{inf} that raises
        OverflowError, so the client gets an internal error instead of
        503 temporary_failure.  Expected: a 503 with a finite Retry-After
        (the provider should clamp what it parses, e.g. to GRAPH_SEND_TIMEOUT
        or an hour, and the API should not trust any float)."""
        from smtpproxy.web.api.submit import error_for_failure

        error = self._failed("9" * 400)
        answer = error_for_failure(error)
        self.assertEqual(answer.status, 503)
        self.assertIsNotNone(answer.retry_after)
        assert answer.retry_after is not None
        self.assertLessEqual(answer.retry_after, 86_400)

    def test_far_future_retry_after_does_not_expire_a_queued_message(self) -> None:
        """Queue mode: a 503 with C{Retry-After: Fri, 01 Jan 2100 00:00:00 GMT}
        makes the queue's decide (queue/policy.py:122-127) take
        max(back-off, 2.3e9 s), which passes QUEUE_MAX_AGE, so the message is
        dead (EXPIRED, bounced) after its first attempt, from one odd header.
        Expected: the ask is honoured only up to the schedule's longest wait
        (max_interval); the message is retried, not bounced."""
        from smtpproxy.queue.policy import Retry, Schedule, decide

        error = self._failed("Fri, 01 Jan 2100 00:00:00 GMT")
        schedule = Schedule(min_interval=60.0, max_interval=3600.0, max_age=5 * 86_400.0)
        now = 1_700_000_000.0
        decision = decide(error, 1, now, now, schedule, 0.0)
        self.assertIsInstance(decision, Retry)
        assert isinstance(decision, Retry)
        self.assertLessEqual(decision.at, now + schedule.max_interval)


class DraftAmbiguityTests(SynchronousTestCase):
    """The draft path (large mail) when an answer is lost after Graph acted."""

    def test_lost_answer_to_create_draft_leaves_no_draft_behind(self) -> None:
        """createDraft is retried after a dropped connection (ambiguous: the
        fake created the draft, the relay never heard its id).  _send_draft
        (provider.py ~376) simply POSTs /messages again and goes on with the
        second draft; the first one, the whole message less the uploaded
        part, stays in the mailbox's Drafts folder for good: nobody deletes
        it, and anyone can send it by hand (a duplicate).  docs/graph.md: a
        failed step must not leave a draft behind.

        Expected: after a successful send no draft of this message is left
        (e.g. tag the draft with a client-generated id, and after an
        ambiguous createDraft look it up, or delete strays by that tag)."""

        h = tp.Harness()
        h.fake.script("createDraft", Fault(drop=True, after_processing=True))
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(h.fake.routes("createDraft")), 2)
        self.assertEqual(h.fake.drafts, {}, "a stray draft of the message is left in Drafts")

    def test_sent_draft_is_not_reported_failed(self) -> None:
        """sendDraft's first answer is lost although Graph sent the message,
        then Graph answers 503 to each retry.  _call gives up with 451, so
        _send_draft deletes the draft: Graph answers 404 (it was sent and so
        is gone), which _delete_draft only logs.  The client is told 451 and
        sends the message again: the recipients get it twice.

        Expected: a 404 on deleting a draft whose send may have gone through
        means it was sent: the message counts as delivered (once)."""

        h = tp.Harness()
        h.fake.script(
            "sendDraft",
            Fault(drop=True, after_processing=True),
            *[Fault(503, "ServiceUnavailable")] * 3,
        )
        email, _ = tp._big_email()
        d = h.send(email)
        h.run()
        self.assertEqual(len(h.fake.deliveries), 1)  # Graph did send it
        self.successResultOf(d)


class SignedMessageTests(SynchronousTestCase):
    """Issue 13: a signed message that cannot be sent intact is refused with
    554 5.3.4 "rather than break the signature silently".  plan_delivery
    (payload.py ~665) checks is_signed only on the large-MIME draft path;
    every other road to the JSON form, which is rebuilt from the parse and
    cannot carry multipart/signed, breaks the signature without a word."""

    def _signed(self, envelope_to: tuple[str, ...]) -> Email:
        from pathlib import Path

        from smtpproxy.mime.message import parse_message

        raw = (
            Path(__file__)
            .parent.parent.parent.joinpath("data", "mime", "smime_signed.eml")
            .read_bytes()
        )
        raw = raw.replace(b"\n", b"\r\n") if b"\r\n" not in raw else raw
        return parse_message("signer@example.org", envelope_to, raw)

    def test_signed_message_is_not_rebuilt_as_json(self) -> None:
        """The envelope holds only bcc@example.com (To names partner@example.net,
        who must not get it): the planner goes JSON "so that they do not
        receive it", rebuilding a signed message and so breaking its
        signature.  A MIME send would reach partner@example.net, so the only
        right answer is 554 5.3.4 naming the signature.  (The same holds for
        the other JSON roads: a header with no ASCII form, GRAPH_SEND_MODE=json,
        and the ErrorMimeContent fallback in provider._send.)"""
        from smtpproxy.errors import PermanentDeliveryError
        from smtpproxy.providers.graph.payload import plan_delivery

        email = self._signed(("bcc@example.com",))
        try:
            plan = plan_delivery(email, ("relay@contoso.example",), "auto")
        except PermanentDeliveryError as e:
            self.assertEqual((e.code, e.status), (554, "5.3.4"))
            self.assertIn("signature", str(e))
            return
        self.fail(f"a signed message planned as {type(plan).__name__}: its signature breaks")


class TokenRenewalTests(SynchronousTestCase):
    def test_slow_renewal_does_not_fail_mail_while_the_token_is_valid(self) -> None:
        """TokenCache.get (tokens.py ~196) hands out the cached token only before
        refresh_at (five minutes before expiry); after that every caller waits
        for the renewal, and gets the still-valid old token only once the
        renewal has *failed*.  When Entra hangs (a stalled proxy, a slow
        token endpoint), the renewal's retries take the whole
        GRAPH_SEND_TIMEOUT, so each message fails 451 "time limit reached
        waiting for a token" although a token valid for minutes was in hand
        all along (docs/graph.md: "if renewal fails while the old token is
        still valid, the old token is used").

        Expected: while the current token is valid, get() answers with it at
        once and the renewal runs in the background; the message is sent."""

        h = tp.Harness()
        first = h.send(tp._simple())
        h.run()
        self.successResultOf(first)
        # Into the renewal window: 3599 s tokens are renewed 300 s early.
        h.clock.advance(3599 - 300 + 10)
        h.fake.script("token", *[Fault(delay=10_000.0)] * 5)
        second = h.send(tp._simple())
        h.run(horizon=130)
        self.assertEqual(len(h.fake.deliveries), 2, "the second message was not sent")
        self.successResultOf(second)


class GraphRequestMetricTests(SynchronousTestCase):
    def test_requests_without_a_response_are_counted_as_status_0(self) -> None:
        """smtpproxy_graph_requests' help says "by response status (0: no
        response)", and Metrics reads the provider's count by status.  But
        provider._exchange counted a request only after a response arrived: a
        dropped connection, a timeout or a refused tunnel raises
        _NoResponseError before it, so status 0 never appears and an outage
        that gives no answers at all is invisible in the one Graph request
        counter.  Expected: each attempt without a response counts once as
        status="0"."""
        from twisted.logger import globalLogPublisher

        from smtpproxy.web.metrics import Metrics

        metrics = Metrics()
        globalLogPublisher.addObserver(metrics.observer)
        self.addCleanup(globalLogPublisher.removeObserver, metrics.observer)
        h = tp.Harness()
        # The provider keeps the counts; /metrics reads them at scrape time.
        metrics.watch_graph_requests(lambda: h.provider.request_statuses)
        h.fake.script("sendMail", Fault(drop=True))
        d = h.send(tp._simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.routes("sendMail")), 2)
        value = metrics.registry.get_sample_value("smtpproxy_graph_requests_total", {"status": "0"})
        self.assertEqual(value, 1.0, metrics.text().decode())


class UploadResumeTests(SynchronousTestCase):
    def test_range_whose_answer_was_lost_does_not_fail_the_message(self) -> None:
        """The first upload range reaches Graph, but the connection drops before
        its answer (ambiguous).  _call retries the same PUT; the session has
        that range already and answers 416 InvalidRange ("expected bytes from
        3932160"), which _classify turns into a 451 4.3.0: the draft is deleted
        and the whole (5 MB) message fails, from one dropped connection that
        docs/graph.md says is retried.  Expected: the upload resumes where
        the session says it stands (a GET of the upload URL, or the 416's
        nextExpectedRanges) and the message is delivered once, intact."""

        h = tp.Harness()
        h.fake.script("upload", Fault(drop=True, after_processing=True))
        email, data = tp._big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        (delivery,) = h.fake.deliveries
        self.assertEqual(dict(delivery.attachments)["big.bin"], data)
