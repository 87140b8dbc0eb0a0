"""Direct mode and an upstream that defers some recipients: the whole message or nothing.

The decision is pure (L{whole_message_deferral}, L{wire.held_back},
L{PartlyRefused.summary}) and tested first without sockets; then the
provider against the scripted upstream on a real loopback socket shows that
the body never reaches an upstream that deferred a recipient, with and
without PIPELINING, and that the queue's way (per-recipient retries) is
untouched.  The real twistd relay is in L{tests.providers.smtp.test_partial_twistd}.
"""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.errors import reply_for_failure
from smtpproxy.providers.result import (
    NAMED_IN_REPLY,
    PartlyDeferredError,
    PartlyRefused,
    RecipientRefusal,
    whole_message_deferral,
)
from smtpproxy.providers.smtp import wire
from smtpproxy.web.api.submit import DEFAULT_RETRY_AFTER, error_for_failure
from tests.providers.smtp.test_client import RAW, Case, message
from tests.providers.smtp.upstream import Script
from tests.support import async_test

BUSY = RecipientRefusal("busy@example.org", 450, "4.2.1", "Mailbox busy")
GREY = RecipientRefusal("grey@example.org", 451, "", "Greylisted, come back later")
GONE = RecipientRefusal("gone@example.org", 550, "5.1.1", "No such user")


def _reply(text: str) -> wire.Reply:
    code, _, rest = text.partition(" ")
    return wire.Reply(int(code), (rest.encode(),))


class DecisionTests(SynchronousTestCase):
    """L{whole_message_deferral}: plain values in, a verdict out."""

    def test_every_recipient_accepted_sends(self) -> None:
        """Nothing refused: send."""
        self.assertIsNone(whole_message_deferral(["a@example.org"], []))

    def test_a_deferred_recipient_holds_the_message_back(self) -> None:
        """One accepted, one deferred (450 4.2.1): a 451 with the deferral's own status,
        a text counting and naming the deferred recipient, and the refusals kept."""
        error = whole_message_deferral(["a@example.org"], [BUSY])
        assert error is not None
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (451, "4.2.1"))
        self.assertIn("deferred 1 of 2 recipients", reply.text)
        self.assertIn("<busy@example.org> 450 4.2.1 Mailbox busy", reply.text)
        self.assertEqual((error.accepted, error.refused), (("a@example.org",), (BUSY,)))

    def test_permanent_refusals_alone_do_not_hold_it_back(self) -> None:
        """Only 5xx refusals: retrying cannot help them, so the accepted ones get it."""
        self.assertIsNone(whole_message_deferral(["a@example.org"], [GONE]))

    def test_mixed_refusals_hold_it_back_naming_only_the_deferred(self) -> None:
        """A 5xx and a 4xx: held back (the 4xx one can still be reached by a retry); the
        text names the deferred recipient, and the status falls back to 4.0.0 when the
        deferral carried none; the 5xx refusal is still kept for the log."""
        error = whole_message_deferral(["a@example.org"], [GONE, GREY])
        assert error is not None
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (451, "4.0.0"))
        self.assertIn("deferred 1 of 3 recipients", reply.text)
        self.assertNotIn("gone@", reply.text)
        self.assertEqual(error.refused, (GONE, GREY))

    def test_nobody_accepted_is_not_this_decision(self) -> None:
        """Every recipient refused: the provider's all-refused answer stands (None here)."""
        self.assertIsNone(whole_message_deferral([], [BUSY, GONE]))

    def test_reply_stays_bounded(self) -> None:
        """Fifty deferred recipients with long addresses: the first few are named, the rest
        counted, and the reply line stays inside RFC 5321's 512 octets."""
        long = "x" * 60
        refused = [
            RecipientRefusal(f"{long}{n}@example.org", 450, "4.2.1", "busy " * 40)
            for n in range(50)
        ]
        error = whole_message_deferral(["a@example.org"], refused)
        assert error is not None
        reply = reply_for_failure(error)
        line = f"{reply.code} ".encode() + reply.render() + b"\r\n"
        self.assertLessEqual(len(line), 512)
        self.assertIn("deferred 50 of 51 recipients", reply.text)

    def test_summary_for_the_250(self) -> None:
        """A partial delivery's summary counts who got it and names who did not, bounded."""
        text = PartlyRefused(("a@example.org", "b@example.org"), (GONE,)).summary
        self.assertEqual(
            text,
            "to 2 of 3 recipients; not delivered to: <gone@example.org> 550 5.1.1 No such user",
        )
        many = tuple(
            RecipientRefusal(f"{'y' * 200}{n}@example.org", 550, "5.1.1", "no " * 100)
            for n in range(NAMED_IN_REPLY + 4)
        )
        summary = PartlyRefused(("a@example.org",), many).summary
        self.assertLessEqual(len(summary.encode()), 400)
        self.assertTrue(summary.startswith(f"to 1 of {NAMED_IN_REPLY + 5} recipients"))


class HeldBackTests(SynchronousTestCase):
    """L{wire.held_back}: the decision over the upstream's replies to MAIL and RCPT."""

    def transaction(self, whole: bool) -> wire.Transaction:
        email = message("a@example.org", "busy@example.org")
        planned = wire.plan(
            dataclasses.replace(email, per_recipient_retry=not whole), wire.Capabilities()
        )
        self.assertEqual(planned.whole_message, whole)
        return planned

    def test_direct_mode_holds_back(self) -> None:
        """Direct mode (the default for any caller): a 450 recipient holds the body back."""
        error = wire.held_back(
            self.transaction(True), _reply("250 ok"), [_reply("250 ok"), _reply("450 busy")]
        )
        self.assertIsInstance(error, PartlyDeferredError)

    def test_queue_mode_never_holds_back(self) -> None:
        """With per-recipient retries (the queue) the body goes to the accepted ones."""
        self.assertIsNone(
            wire.held_back(
                self.transaction(False), _reply("250 ok"), [_reply("250 ok"), _reply("450 busy")]
            )
        )

    def test_refused_sender_is_judged_elsewhere(self) -> None:
        """MAIL refused: nothing to hold back; L{wire.outcome} reports the sender's refusal."""
        self.assertIsNone(
            wire.held_back(
                self.transaction(True),
                _reply("451 later"),
                [_reply("250 ok"), _reply("450 busy")],
            )
        )


def _busy_rcpt(address: str) -> str:
    if address.startswith("busy"):
        return "450 4.2.1 Mailbox busy"
    if address.startswith("gone"):
        return "550 5.1.1 No such user"
    return "250 2.1.5 Ok"


class ProviderTests(Case):
    """The provider against the scripted upstream on loopback."""

    @async_test
    async def test_pipelined_deferral_cuts_before_the_body(self) -> None:
        """PIPELINING: DATA was already sent when the 450 arrived; the upstream says 354
        and gets no body and no final dot (the connection is cut), so it stores nothing;
        send fails with the 451 naming the deferred recipient, and the next message goes
        through on a fresh connection."""
        script = Script(rcpt=_busy_rcpt)
        provider = await self.upstream(script)
        error = await self.failure_of(provider.send(message("ok@example.org", "busy@example.org")))
        self.assertIsInstance(error, PartlyDeferredError)
        reply = reply_for_failure(error)
        self.assertEqual((reply.code, reply.status), (451, "4.2.1"))
        self.assertIn("<busy@example.org>", reply.text)
        self.assertEqual(script.bodies, [])
        self.assertIn(b"DATA", script.commands)
        [line] = self.logged("upstream deferred some recipients, message not sent")
        self.assertEqual(line["refused"], ["<busy@example.org> 450 4.2.1 Mailbox busy"])
        self.assertEqual(self.logged("upstream refused some recipients"), [])
        script.rcpt = lambda address: "250 2.1.5 Ok"
        self.assertIsNone(await provider.send(message("ok@example.org", "busy@example.org")))
        self.assertEqual((script.bodies, script.connections), ([RAW], 2))

    @async_test
    async def test_without_pipelining_data_is_never_sent(self) -> None:
        """No PIPELINING: after the 450 the provider sends no DATA at all and keeps the
        connection; the next message on it starts with RSET and is delivered once."""
        script = Script(capabilities=["8BITMIME"], rcpt=_busy_rcpt)
        provider = await self.upstream(script)
        error = await self.failure_of(provider.send(message("ok@example.org", "busy@example.org")))
        self.assertIsInstance(error, PartlyDeferredError)
        self.assertNotIn(b"DATA", script.commands)
        self.assertEqual(script.bodies, [])
        script.rcpt = lambda address: "250 2.1.5 Ok"
        self.assertIsNone(await provider.send(message("ok@example.org", "busy@example.org")))
        self.assertEqual((script.bodies, script.connections), ([RAW], 1))
        self.assertIn(b"RSET", script.commands)

    @async_test
    async def test_permanent_refusal_still_delivers_to_the_others(self) -> None:
        """Direct mode, only a 550 refusal: the accepted recipient gets the message and send
        fires with the refusal (the relay's 250 names it)."""
        script = Script(rcpt=_busy_rcpt)
        provider = await self.upstream(script)
        result = await provider.send(message("ok@example.org", "gone@example.org"))
        assert result is not None
        self.assertEqual(result.refused[0].address, "gone@example.org")
        self.assertEqual(script.bodies, [RAW])

    @async_test
    async def test_queue_mode_unchanged(self) -> None:
        """Per-recipient retries (the queue's worker): the 450 recipient is reported and
        the accepted one gets the message, as before."""
        script = Script(rcpt=_busy_rcpt)
        provider = await self.upstream(script)
        email = message("ok@example.org", "busy@example.org")
        result = await provider.send(dataclasses.replace(email, per_recipient_retry=True))
        assert result is not None
        self.assertEqual([r.address for r in result.temporary], ["busy@example.org"])
        self.assertEqual(script.bodies, [RAW])


class HttpAnswerTests(SynchronousTestCase):
    def test_deferral_is_a_503_to_retry(self) -> None:
        """An HTTP submission without a queue that an upstream partly deferred: 503 with
        Retry-After (send the same request again), the text naming the deferred recipient;
        not 502, which tells a client that retrying will not help."""
        deferral = whole_message_deferral(["a@example.org"], [BUSY])
        assert deferral is not None
        answer = error_for_failure(deferral)
        self.assertEqual(
            (answer.status, answer.code, answer.retry_after),
            (503, "temporary_failure", DEFAULT_RETRY_AFTER),
        )
        self.assertIn("<busy@example.org>", str(answer))
