"""The Graph provider against the fake Graph, with time driven by a Clock.

The HTTP runs in memory (treq's StubTreq in front of the fake's resource),
so retries, Retry-After, timeouts, token expiry and the time budget are
checked at exact clock readings, without waiting.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
    reply_for_failure,
)
from smtpproxy.mime.message import Email, parse_message
from smtpproxy.providers import create
from smtpproxy.providers.graph.provider import GraphProvider, HTTPRequester
from smtpproxy.providers.graph.retry import Tuning
from smtpproxy.providers.result import SendCancelledError
from tests.fakegraph import FakeGraph, Fault, make_email
from tests.providers.graph.test_mimeparts import ENVELOPED

EPOCH = 1_700_000_000.0
MAILBOX = "relay@contoso.example"


class Harness:
    """A provider wired to a fake Graph through memory, on a Clock."""

    def __init__(
        self,
        *,
        senders: tuple[str, ...] = (MAILBOX,),
        mailboxes: tuple[str, ...] | None = None,
        mode: str = "auto",
        timeout: float = 120.0,
        concurrency: int = 4,
        tuning: Tuning | None = None,
        secret: str | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.fake = FakeGraph(self.clock, mailboxes=mailboxes or senders)
        self.stub = StubTreq(self.fake.resource)
        self.config = Config.build(
            graph_tenant_id=self.fake.tenant,
            graph_client_id=self.fake.client_id,
            graph_client_secret=secret or self.fake.client_secret,
            graph_sender=senders,
            graph_authority_host="http://login.test",
            graph_endpoint="http://graph.test",
            graph_send_mode=mode,
            graph_send_timeout=timeout,
            graph_max_concurrency=concurrency,
        )
        self.provider = GraphProvider(
            self.config,
            self.clock,
            cast(HTTPRequester, self.stub),
            tuning=tuning,
            jitter=lambda: 0.0,
        )

    def send(self, email: Email) -> Deferred[None]:
        d = self.provider.send(email)
        self.stub.flush()
        return d

    def run(self, horizon: float = 600.0) -> None:
        """Let time pass timer by timer until nothing is due within C{horizon} seconds."""
        end = self.clock.seconds() + horizon
        self.stub.flush()
        for _ in range(10_000):
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.active()]
            if not due or min(due) > end:
                return
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
            self.stub.flush()
        raise AssertionError("the clock never settled")

    def times(self, route: str) -> list[float]:
        """When each request on C{route} arrived, in seconds from the start."""
        return [round(seen.time - EPOCH, 3) for seen in self.fake.routes(route)]


def _simple(**kwargs: Any) -> Email:
    return make_email(("a@x.example",), to=("a@x.example",), **kwargs)


def _reply(failure: Any) -> str:
    reply = reply_for_failure(failure.value)
    return f"{reply.code} {reply.status}"


class DeliveryTests(SynchronousTestCase):
    def test_mime_delivery(self) -> None:
        """A plain message goes out as raw MIME; the hidden recipient is Bcc and stays hidden."""
        h = Harness()
        email = make_email(("a@x.example", "hidden@x.example"), to=("a@x.example",))
        d = h.send(email)
        h.run()
        self.assertIsNone(self.successResultOf(d))
        (delivery,) = h.fake.deliveries
        self.assertEqual(delivery.method, "mime")
        self.assertEqual((delivery.to, delivery.bcc), (("a@x.example",), ("hidden@x.example",)))
        copy = delivery.copy_for("a@x.example")
        assert copy is not None
        self.assertNotIn(b"hidden@x.example", copy)
        (seen,) = h.fake.routes("sendMail")
        self.assertEqual(seen.headers["content-type"], "text/plain")
        self.assertTrue(seen.headers["authorization"].startswith("Bearer "))
        self.assertEqual(h.fake.violations, [])

    def test_registered(self) -> None:
        """The provider is registered under the name 'graph'."""
        h = Harness()
        self.assertIsInstance(create("graph", h.config, h.clock), GraphProvider)

    def test_outside_recipients_sent_as_json(self) -> None:
        """Header recipients outside the envelope do not receive the message."""
        h = Harness()
        email = make_email(("a@x.example",), to=("a@x.example", "boss@x.example"))
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        (delivery,) = h.fake.deliveries
        self.assertEqual(delivery.method, "json")
        self.assertEqual(delivery.recipients, ("a@x.example",))
        self.assertEqual(h.fake.received_by("boss@x.example"), [])
        self.assertEqual(h.fake.violations, [])

    def test_sender_chosen_from_header(self) -> None:
        """A message From the second mailbox is sent as the second mailbox."""
        second = "billing@contoso.example"
        h = Harness(senders=(MAILBOX, second))
        d = h.send(_simple(from_=f"Billing <{second}>"))
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.fake.deliveries[0].mailbox, second)
        self.assertIn("/users/billing@contoso.example/", h.fake.routes("sendMail")[0].path)

    def test_identity_mailbox_wins_over_from(self) -> None:
        """An Email bound to a mailbox (an identity's policy) is sent as that mailbox, in
        the configured spelling, even when its From names the other configured one."""
        second = "billing@contoso.example"
        h = Harness(senders=(MAILBOX, second))
        email = dataclasses.replace(
            _simple(from_=f"Relay <{MAILBOX}>"), mailbox="Billing@Contoso.Example"
        )
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.fake.deliveries[0].mailbox, second)
        self.assertIn(f"/users/{second}/sendMail", h.fake.routes("sendMail")[0].path)
        self.assertEqual(h.fake.violations, [])

    def test_identity_mailbox_outside_graph_sender(self) -> None:
        """A bound mailbox that is not a GRAPH_SENDER is refused for good (550 5.7.1,
        naming it) without a request to Graph."""
        h = Harness()
        d = h.send(dataclasses.replace(_simple(), mailbox="other@contoso.example"))
        h.run()
        failure = self.failureResultOf(d, PermanentDeliveryError)
        self.assertEqual(_reply(failure), "550 5.7.1")
        self.assertIn("other@contoso.example", failure.value.reason)
        self.assertEqual(h.fake.routes("sendMail"), [])

    def test_unknown_mailbox(self) -> None:
        """A mailbox Graph does not know bounces with Graph's code."""
        h = Harness(senders=("nobody@contoso.example",), mailboxes=(MAILBOX,))
        d = h.send(_simple())
        h.run()
        failure = self.failureResultOf(d, PermanentDeliveryError)
        self.assertEqual(_reply(failure), "550 5.1.0")
        self.assertIn("Graph ErrorInvalidUser", failure.value.reason)

    def test_every_request_has_a_fresh_id(self) -> None:
        """Each request, retries included, carries its own client-request-id GUID."""
        h = Harness()
        h.fake.script("sendMail", Fault(503), Fault(503))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        ids = [seen.headers["client-request-id"] for seen in h.fake.requests]
        self.assertEqual(len(ids), 4)
        self.assertEqual(len(set(ids)), 4)
        self.assertEqual(h.fake.violations, [])


class TokenTests(SynchronousTestCase):
    def test_cached_across_messages(self) -> None:
        """Three messages, one token request."""
        h = Harness()
        for _ in range(3):
            d = h.send(_simple())
            h.run()
            self.successResultOf(d)
        self.assertEqual(len(h.fake.routes("token")), 1)

    def test_renewed_before_expiry(self) -> None:
        """Within five minutes of expiry a new token is fetched before sending."""
        h = Harness()
        self.successResultOf(h.send(_simple()))
        h.clock.advance(3599 - 200)
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.routes("token")), 2)
        self.assertEqual(h.fake.violations, [])

    def test_one_request_for_concurrent_messages(self) -> None:
        """Messages arriving while the token is fetched all wait for that one request."""
        h = Harness()
        h.fake.script("token", Fault(delay=2.0))
        sends = [h.send(_simple()) for _ in range(5)]
        h.run()
        for d in sends:
            self.successResultOf(d)
        self.assertEqual(len(h.fake.routes("token")), 1)
        self.assertEqual(len(h.fake.deliveries), 5)

    def test_expired_token_refreshed_once(self) -> None:
        """A 401 renews the token and retries at once, without counting as a retry."""
        h = Harness()
        self.successResultOf(h.send(_simple()))
        h.fake.expire_tokens()
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.routes("token")), 2)
        self.assertEqual(h.times("sendMail"), [0.0, 0.0, 0.0])
        self.assertEqual(len(h.fake.deliveries), 2)

    def test_second_401_is_451(self) -> None:
        """A token refused even when fresh is our configuration: 451 after one refresh."""
        h = Harness()
        refused = Fault(401, "InvalidAuthenticationToken", "Invalid audience.")
        h.fake.script("sendMail", refused, refused)
        d = h.send(_simple())
        h.run()
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(_reply(failure), "451 4.3.5")
        self.assertEqual(len(h.fake.routes("sendMail")), 2)
        self.assertEqual(len(h.fake.routes("token")), 2)

    def test_wrong_secret(self) -> None:
        """Entra refusing the secret is a 451 naming the AADSTS code; it is not retried."""
        h = Harness(secret="not-the-secret")
        d = h.send(_simple())
        h.run()
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(_reply(failure), "451 4.3.5")
        self.assertIn("AADSTS7000215", failure.value.reason)
        self.assertEqual(len(h.fake.routes("token")), 1)
        self.assertEqual(h.fake.routes("sendMail"), [])

    def test_token_outage_retried(self) -> None:
        """A 503 from the token endpoint is retried with backoff."""
        h = Harness()
        h.fake.script("token", Fault(503, "temporarily_unavailable"))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.times("token"), [0.0, 1.0])

    def test_secrets_never_logged(self) -> None:
        """Neither the client secret nor any token appears in any log event."""
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        h = Harness()
        h.fake.script("sendMail", Fault(503), Fault(400, "ErrorInvalidRecipients"))
        self.failureResultOf(_settled(h, h.send(_simple())))
        h.fake.expire_tokens()
        self.successResultOf(_settled(h, h.send(_simple())))
        bad = Harness(secret="wrong-secret-value")
        self.failureResultOf(_settled(bad, bad.send(_simple())))
        text = repr(events)
        self.assertTrue(events)
        for secret in [h.fake.client_secret, "wrong-secret-value", *h.fake.tokens]:
            self.assertNotIn(secret, text)

    def test_reply_to_left_out_is_a_warning(self) -> None:
        """A From that cannot become a valid Reply-To is delivered without one, and the log
        says so at warn level, with the address clipped and nothing of the body."""
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        h = Harness()
        author = "ops@" + "x" * 200
        email = make_email(
            ("a@x.example",), from_=author, to=("a@x.example",), text="secret body text\n"
        )
        self.successResultOf(_settled(h, h.send(email)))
        (delivery,) = h.fake.deliveries
        self.assertNotIn(b"Reply-To", delivery.mime or b"")
        (warned,) = [e for e in events if e.get("log_format") == "adjusting the message's headers"]
        self.assertEqual(warned["log_level"].name, "warn")
        self.assertIn("ops@xxx", warned["note"])
        self.assertLess(len(warned["note"]), 200)
        self.assertNotIn("secret body text", repr(events))


def _settled(h: Harness, d: Deferred[None]) -> Deferred[None]:
    h.run()
    return d


class RetryTests(SynchronousTestCase):
    def test_retry_after_honoured(self) -> None:
        """A 429 with Retry-After: 7 is retried exactly 7 seconds later."""
        h = Harness()
        h.fake.script("sendMail", Fault(429, "ApplicationThrottled", retry_after="7"))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.times("sendMail"), [0.0, 7.0])

    def test_backoff_schedule(self) -> None:
        """Three 503s in a row are retried after 1, 2 and 4 seconds."""
        h = Harness()
        h.fake.script("sendMail", Fault(503), Fault(503), Fault(504, "GatewayTimeout"))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.times("sendMail"), [0.0, 1.0, 3.0, 7.0])
        self.assertEqual(len(h.fake.deliveries), 1)

    def test_gives_up_after_three_retries(self) -> None:
        """A fourth failure is a 451; no fifth request is made."""
        h = Harness()
        h.fake.script("sendMail", *[Fault(503)] * 5)
        d = h.send(_simple())
        h.run()
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(_reply(failure), "451 4.4.5")
        self.assertEqual(len(h.fake.routes("sendMail")), 4)

    def test_retry_after_beyond_budget(self) -> None:
        """A Retry-After longer than the budget fails at once instead of waiting; the
        error carries the wait Graph asked for and Graph's request id."""
        h = Harness(timeout=30)
        h.fake.script("sendMail", Fault(429, "ApplicationThrottled", retry_after="60"))
        d = h.send(_simple())
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertIn("time limit", failure.value.reason)
        self.assertEqual(h.clock.seconds(), EPOCH)
        # The durable queue reads both off the error (smtpproxy.queue.policy).
        self.assertEqual(failure.value.retry_after, 60.0)
        self.assertEqual(len(failure.value.request_id or ""), 36)

    def test_permanent_error_not_retried(self) -> None:
        """A 400 bounces at once with Graph's error code in the reply."""
        h = Harness()
        h.fake.script(
            "sendMail", Fault(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
        )
        d = h.send(_simple())
        failure = self.failureResultOf(d, PermanentDeliveryError)
        reply = reply_for_failure(failure.value)
        self.assertEqual(
            f"{reply.code} {reply.render().decode()}",
            "550 5.1.1 Graph ErrorInvalidRecipients: At least one recipient isn't valid.",
        )
        self.assertEqual(len(h.fake.routes("sendMail")), 1)

    def test_slow_answer_times_out_and_is_retried(self) -> None:
        """An answer slower than the request timeout is abandoned and the request retried."""
        h = Harness(tuning=Tuning(request_timeout=5.0))
        h.fake.script("sendMail", Fault(delay=30.0))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.times("sendMail"), [0.0, 6.0])
        self.assertEqual(len(h.fake.deliveries), 1)

    def test_dropped_connection_retried(self) -> None:
        """A connection closed without an answer is retried."""
        h = Harness()
        h.fake.script("sendMail", Fault(drop=True))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual(h.times("sendMail"), [0.0, 1.0])
        self.assertEqual(len(h.fake.deliveries), 1)

    def test_budget_bounds_slow_answers(self) -> None:
        """Slow answers use up the budget; the message then fails with 451, not later."""
        h = Harness(timeout=12.0, tuning=Tuning(request_timeout=5.0))
        h.fake.script("sendMail", *[Fault(delay=100.0)] * 4)
        d = h.send(_simple())
        h.run()
        failure = self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(_reply(failure)[:3], "451")
        self.assertEqual(h.times("sendMail"), [0.0, 6.0])
        self.assertEqual(h.fake.deliveries, [])

    def test_cancel_stops_retrying(self) -> None:
        """Cancelling a send (shutdown) stops it; it is not retried as a network error."""
        h = Harness()
        h.fake.script("sendMail", Fault(delay=30.0))
        d = h.send(_simple())
        d.cancel()
        h.run()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(h.fake.routes("sendMail")), 1)

    def test_mime_refused_falls_back_to_json(self) -> None:
        """In auto mode, Graph refusing the raw MIME makes us send the JSON form."""
        h = Harness()
        h.fake.script("sendMail", Fault(400, "ErrorMimeContentInvalidBase64String"))
        d = h.send(_simple())
        h.run()
        self.successResultOf(d)
        self.assertEqual([x.method for x in h.fake.deliveries], ["json"])

    def test_signed_message_has_no_json_fallback(self) -> None:
        """Graph refusing a signed message's MIME: 554 5.3.4 naming the signature, and
        nothing rebuilt as JSON (that would break the signature without a word)."""
        h = Harness()
        h.fake.script("sendMail", Fault(400, "ErrorMimeContentInvalidBase64String"))
        d = h.send(parse_message("app@example.org", ("a@x.example",), ENVELOPED))
        h.run()
        failure = self.failureResultOf(d, PermanentDeliveryError)
        self.assertEqual(_reply(failure), "554 5.3.4")
        self.assertIn("signature", str(failure.value))
        self.assertIn("ErrorMimeContentInvalidBase64String", str(failure.value))
        self.assertEqual(len(h.fake.routes("sendMail")), 1)
        self.assertEqual(h.fake.deliveries, [])

    def test_mime_mode_has_no_fallback(self) -> None:
        """In mime mode the same refusal is a bounce."""
        h = Harness(mode="mime")
        h.fake.script("sendMail", Fault(400, "ErrorMimeContentInvalidBase64String"))
        d = h.send(_simple())
        self.failureResultOf(d, PermanentDeliveryError)


class ConcurrencyTests(SynchronousTestCase):
    def test_cap_per_mailbox(self) -> None:
        """With a cap of 2, six slow messages never have more than 2 requests in flight."""
        h = Harness(concurrency=2)
        h.fake.script("sendMail", *[Fault(delay=1.0)] * 6)
        sends = [h.send(_simple()) for _ in range(6)]
        h.run()
        for d in sends:
            self.successResultOf(d)
        self.assertEqual(h.fake.max_in_flight[MAILBOX], 2)
        self.assertEqual(h.times("sendMail"), [0.0, 0.0, 1.0, 1.0, 2.0, 2.0])

    def test_mailboxes_do_not_share_a_cap(self) -> None:
        """Each mailbox has its own cap: one busy mailbox does not hold up another."""
        other = "billing@contoso.example"
        h = Harness(senders=(MAILBOX, other), concurrency=1)
        h.fake.script("sendMail", *[Fault(delay=1.0)] * 4)
        sends = [h.send(_simple()), h.send(_simple()), h.send(_simple(from_=other))]
        h.run()
        for d in sends:
            self.successResultOf(d)
        self.assertEqual(h.fake.max_in_flight[MAILBOX], 1)
        self.assertEqual(h.fake.max_in_flight[other], 1)
        self.assertEqual(h.times("sendMail"), [0.0, 0.0, 1.0])

    def test_queued_message_respects_budget(self) -> None:
        """A message queued behind a stuck one fails at its own deadline, without a request."""
        h = Harness(concurrency=1, timeout=5.0)
        h.fake.script("sendMail", Fault(delay=100.0))
        first, second = h.send(_simple()), h.send(_simple())
        h.run()
        self.failureResultOf(first, TransientDeliveryError)
        failure = self.failureResultOf(second, TransientDeliveryError)
        self.assertIn("time limit reached", failure.value.reason)
        self.assertEqual(len(h.fake.routes("sendMail")), 1)


def _big_email(size: int = 5_000_000) -> tuple[Email, bytes]:
    data = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    email = make_email(
        ("a@x.example", "hidden@x.example"),
        to=("a@x.example",),
        attachments=(("big.bin", data), ("small.txt", b"small")),
    )
    return email, data


class DraftTests(SynchronousTestCase):
    def test_upload_session(self) -> None:
        """A 5 MB part goes through an upload session in ordered ranges, without the token."""
        h = Harness()
        email, data = _big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(
            [seen.route for seen in h.fake.requests],
            ["token", "createDraft", "createUploadSession", "upload", "upload", "sendDraft"],
        )
        uploads = h.fake.routes("upload")
        self.assertEqual(
            [seen.headers["content-range"] for seen in uploads],
            ["bytes 0-3932159/5000000", "bytes 3932160-4999999/5000000"],
        )
        for seen in uploads:
            self.assertNotIn("authorization", seen.headers)
        (delivery,) = h.fake.deliveries
        # The draft is the message itself (MIME) less the big part, added back by the upload.
        self.assertEqual(delivery.method, "mime-draft")
        self.assertEqual(dict(delivery.attachments), {"small.txt": b"small", "big.bin": data})
        self.assertEqual(delivery.bcc, ("hidden@x.example",))
        self.assertEqual(h.fake.violations, [])

    def test_draft_deleted_when_upload_fails(self) -> None:
        """When an upload keeps failing, the draft is deleted and the client told 451."""
        h = Harness()
        h.fake.script("upload", *[Fault(500, "InternalServerError")] * 4)
        email, _ = _big_email()
        d = h.send(email)
        h.run()
        self.failureResultOf(d, TransientDeliveryError)
        self.assertEqual(len(h.fake.deleted), 1)
        self.assertEqual(h.fake.drafts, {})
        self.assertEqual(h.fake.deliveries, [])

    def test_draft_deleted_when_send_forbidden(self) -> None:
        """A 403 on the draft path names Mail.ReadWrite, and the draft is deleted."""
        h = Harness()
        h.fake.script("sendDraft", Fault(403, "ErrorAccessDenied", "Access is denied."))
        email, _ = _big_email()
        d = h.send(email)
        h.run()
        failure = self.failureResultOf(d, PermanentDeliveryError)
        self.assertIn("Mail.ReadWrite", failure.value.reason)
        self.assertEqual(h.fake.drafts, {})

    def test_send_that_went_through_is_not_repeated(self) -> None:
        """If the answer to 'send' is lost but the send worked, the retry finds the draft gone
        and the message counts as sent, once."""
        h = Harness()
        h.fake.script("sendDraft", Fault(drop=True, after_processing=True))
        email, _ = _big_email()
        d = h.send(email)
        h.run()
        self.successResultOf(d)
        self.assertEqual(len(h.fake.deliveries), 1)
        self.assertEqual(len(h.fake.routes("sendDraft")), 2)
        self.assertEqual(h.fake.deleted, [])

    def test_closing_without_a_pool(self) -> None:
        """close() succeeds when the HTTP client was injected (no pool of our own)."""
        self.successResultOf(Harness().provider.close())


class CancelTests(SynchronousTestCase):
    """A send cancelled by the relay (a forced shutdown) says whether Graph may have it."""

    def cancelled(self, h: Harness, d: Deferred[None]) -> SendCancelledError:
        d.cancel()
        error = self.failureResultOf(d, SendCancelledError).value
        assert isinstance(error, SendCancelledError)
        return error

    def test_send_request_on_the_wire_is_handed_over(self) -> None:
        """Cancelled while Graph is answering sendMail: it may have the message."""
        h = Harness()
        h.fake.script("sendMail", Fault(delay=10))
        d = h.send(_simple())
        self.assertEqual(len(h.fake.routes("sendMail")), 1)
        self.assertTrue(self.cancelled(h, d).handed_over)

    def test_waiting_to_retry_is_not_handed_over(self) -> None:
        """Cancelled while waiting out a 503's Retry-After: nothing reached Graph, and
        the retry never goes."""
        h = Harness()
        h.fake.script("sendMail", Fault(503, retry_after="5"))
        d = h.send(_simple())
        self.assertFalse(self.cancelled(h, d).handed_over)
        h.run()
        self.assertEqual((len(h.fake.routes("sendMail")), h.fake.deliveries), (1, []))

    def test_draft_path_answers_at_once_and_still_deletes_the_draft(self) -> None:
        """Cancelled while Graph is answering sendDraft: the outcome (handed over) is
        known at once, not after the draft's deletion, which still happens."""
        h = Harness()
        h.fake.script("sendDraft", Fault(delay=10))
        h.fake.script("deleteDraft", Fault(delay=5))
        email, _ = _big_email()
        d = h.send(email)
        h.run(horizon=1.0)
        self.assertEqual(len(h.fake.routes("sendDraft")), 1)
        self.assertTrue(self.cancelled(h, d).handed_over)
        h.run()
        self.assertEqual(len(h.fake.deleted), 1)
