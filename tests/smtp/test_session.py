"""The SMTP dialogue without I/O: commands in, replies and effects out.

No transport, no reactor: a L{Session} is fed command arguments and the
test looks at what it decided, as C{test_commands} does for the parsers.
"""

from __future__ import annotations

from twisted.mail.smtp import User
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import ConfigError, load
from smtpproxy.errors import Reply
from smtpproxy.providers.graph.settings import GraphSettings
from smtpproxy.smtp.chunking import Chunk, ChunkReader
from smtpproxy.smtp.commands import RcptArguments
from smtpproxy.smtp.session import (
    ERROR,
    GO_AHEAD,
    REFUSAL,
    Abandon,
    CheckAuthBlocked,
    CheckRecipient,
    CheckSender,
    Close,
    Greeted,
    Login,
    Message,
    OpenData,
    Outcome,
    ParsedAddress,
    ReadChunk,
    ReplyBudget,
    Say,
    Session,
    StartTLS,
    ValidateRecipient,
    session_settings,
)
from tests.support import session_defaults


def _never_opened() -> Message:
    """A recipient's message factory: the session only stores it; opening is the shell's job."""
    raise AssertionError("the pure session never opens a message")


def session(
    *, auth_enabled: bool = False, max_recipients: int = 500, binarymime: bool = False
) -> Session:
    settings = session_defaults(
        auth_enabled=auth_enabled,
        max_recipients=max_recipients,
        binarymime=binarymime,
    )
    return Session(settings, "192.0.2.7")


def said(outcome: Outcome) -> list[tuple[int, str, str | None]]:
    """The replies of an outcome as (code, text, budget), effects left out."""
    return [
        (a.reply.code, a.reply.render().decode(), a.counts_as)
        for a in outcome
        if isinstance(a, Say)
    ]


def effects(outcome: Outcome) -> list[type]:
    return [type(a) for a in outcome if not isinstance(a, Say)]


def in_transaction(s: Session, *recipients: str) -> None:
    """Drive a session through EHLO and MAIL (and RCPT) as the shell would."""
    s.helo("client.test", extended=True)
    [check] = s.mail("FROM:<a@example.com>")
    assert isinstance(check, CheckSender)
    s.sender_accepted(ParsedAddress(check.arguments.sender, check.arguments))
    for recipient in recipients:
        [allowed] = s.rcpt(f"TO:<{recipient}>")
        assert isinstance(allowed, CheckRecipient)
        [validate] = s.recipient_allowed(allowed.arguments)
        assert isinstance(validate, ValidateRecipient)
        user = User(validate.address, None, None, s.tx.sender)
        s.recipient_accepted(user, _never_opened, validate.key)


class GreetingTests(SynchronousTestCase):
    def test_ehlo_greets_and_lists_keywords(self) -> None:
        """EHLO names the client back, asks for the keyword lines and records the name."""
        outcome = session().helo("client.test", extended=True)
        self.assertEqual(outcome[0], Greeted("client.test"))
        [reply] = [a for a in outcome if isinstance(a, Say)]
        self.assertEqual(reply.reply, Reply(250, "", "relay.test greets client.test [192.0.2.7]"))
        self.assertTrue(reply.keywords)

    def test_helo_has_no_keywords(self) -> None:
        """HELO is the same greeting as one line."""
        [reply] = [a for a in session().helo("c", extended=False) if isinstance(a, Say)]
        self.assertFalse(reply.keywords)

    def test_greeting_needs_a_name(self) -> None:
        """A bare HELO or EHLO is a client error (501) and greets nobody."""
        s = session()
        self.assertEqual(
            said(s.helo("", extended=True)),
            [(501, "5.5.4 EHLO needs your domain name or address", ERROR)],
        )
        self.assertFalse(s.greeted)

    def test_simple_commands(self) -> None:
        """NOOP, VRFY, EXPN, HELP, RSET answer at once; QUIT answers and closes."""
        s = session()
        self.assertEqual(said(s.noop("")), [(250, "2.0.0 OK", None)])
        self.assertEqual(said(s.vrfy("x"))[0][0], 252)
        self.assertEqual(said(s.expn("x"))[0][0], 502)
        self.assertEqual(said(s.help(""))[0][0], 214)
        self.assertEqual(said(s.rset("")), [(250, "2.0.0 OK", None)])
        quit = s.quit("")
        self.assertEqual(said(quit), [(221, "2.0.0 relay.test closing connection", None)])
        self.assertEqual(effects(quit), [Close])


class TransactionTests(SynchronousTestCase):
    def test_mail_needs_a_greeting(self) -> None:
        """MAIL before HELO is a 503 that counts as an error."""
        self.assertEqual(
            said(session().mail("FROM:<a@example.com>")),
            [(503, "5.5.1 Send HELO or EHLO first", ERROR)],
        )

    def test_mail_needs_auth_when_required(self) -> None:
        """With AUTH required, MAIL is refused (530) against the refusal budget."""
        s = session(auth_enabled=True)
        s.helo("c", extended=True)
        self.assertEqual(
            said(s.mail("FROM:<a@example.com>")), [(530, "5.7.0 Authentication required", REFUSAL)]
        )
        s.authenticated = True
        self.assertEqual(effects(s.mail("FROM:<a@example.com>")), [CheckSender])

    def test_mail_syntax_error_counts(self) -> None:
        """A malformed MAIL gets the parser's reply, as an error."""
        s = session()
        s.helo("c", extended=True)
        self.assertEqual(said(s.mail("FROM <a@example.com>"))[0][::2], (501, ERROR))

    def test_bare_local_part_is_qualified(self) -> None:
        """MAIL FROM:<root> is qualified with the default domain, else the host name."""
        s = session()
        s.helo("c", extended=True)
        [check] = s.mail("FROM:<root>")
        assert isinstance(check, CheckSender)
        self.assertEqual(check.arguments.sender, "root@relay.test")

    def test_accepted_sender_starts_a_transaction(self) -> None:
        """The shell's accepted sender becomes the transaction's, with its parameters."""
        s = session(binarymime=True)
        s.helo("c", extended=True)
        [check] = s.mail("FROM:<a@example.com> BODY=BINARYMIME SMTPUTF8")
        assert isinstance(check, CheckSender)
        outcome = s.sender_accepted(ParsedAddress(check.arguments.sender, check.arguments))
        self.assertEqual(said(outcome), [(250, "2.1.0 Sender OK", None)])
        self.assertEqual(s.tx.sender and s.tx.sender.addrstr, b"a@example.com")
        self.assertTrue(s.tx.binary and s.tx.smtputf8)
        self.assertEqual(said(s.mail("FROM:<b@example.com>"))[0][0], 503)

    def test_rcpt_before_mail(self) -> None:
        """RCPT without MAIL is a 503 error."""
        self.assertEqual(
            said(session().rcpt("TO:<b@example.org>")), [(503, "5.5.1 Send MAIL first", ERROR)]
        )

    def test_duplicate_and_too_many_recipients(self) -> None:
        """The same mailbox (domain case aside) is accepted once; past the cap, 452."""
        s = session(max_recipients=2)
        in_transaction(s, "b@example.org")
        self.assertEqual(
            said(s.recipient_allowed(RcptArguments("b@EXAMPLE.org"))),
            [(250, "2.1.5 Recipient OK (duplicate ignored)", None)],
        )
        self.assertEqual(
            effects(s.recipient_allowed(RcptArguments("B@example.org"))), [ValidateRecipient]
        )
        [validate] = s.recipient_allowed(RcptArguments("c@example.org"))
        assert isinstance(validate, ValidateRecipient)
        s.recipient_accepted(
            User(validate.address, None, None, s.tx.sender), _never_opened, validate.key
        )
        self.assertEqual(
            said(s.recipient_allowed(RcptArguments("d@example.org"))),
            [(452, "4.5.3 Too many recipients", None)],
        )

    def test_data_states(self) -> None:
        """DATA needs MAIL and a recipient, no argument, no BINARYMIME; then the body opens."""
        s = session()
        self.assertEqual(said(s.data("")), [(503, "5.5.1 Send MAIL first", ERROR)])
        in_transaction(s)
        self.assertEqual(said(s.data("")), [(554, "5.5.1 No valid recipients", ERROR)])
        s = session()
        in_transaction(s, "b@example.org")
        self.assertEqual(said(s.data("x"))[0][0], 501)
        self.assertEqual(s.data(""), [OpenData()])
        self.assertEqual(GO_AHEAD.code, 354)
        s.tx.binary = True
        self.assertEqual(said(s.data(""))[0][1], "5.5.1 BODY=BINARYMIME needs BDAT, not DATA")

    def test_rset_drops_bdat_chunks(self) -> None:
        """RSET after BDAT chunks asks the shell to release them; a new transaction starts."""
        s = session()
        in_transaction(s, "b@example.org")
        old = s.tx
        old.chunks = ChunkReader(100)
        self.assertEqual(
            said(s.data("")), [(503, "5.5.1 DATA after BDAT; send RSET to start over", ERROR)]
        )
        self.assertEqual(s.rset(""), [Abandon(old), Say(Reply(250, "2.0.0", "OK"))])
        self.assertIsNone(s.tx.sender)
        self.assertEqual(s.tx.recipients, [])


class BudgetTests(SynchronousTestCase):
    def test_budgets_are_separate(self) -> None:
        """Errors and refusals each have a budget; the last one allowed yields the 421."""
        budget = ReplyBudget(max_errors=2, max_refusals=3)
        self.assertIsNone(budget.charge(REFUSAL))
        self.assertIsNone(budget.charge(ERROR))
        self.assertEqual(
            budget.charge(ERROR), Reply(421, "4.7.0", "Too many errors, closing connection")
        )
        self.assertIsNone(budget.charge(REFUSAL))
        budget.delivered()
        self.assertIsNone(budget.charge(REFUSAL))
        self.assertIsNone(budget.charge(REFUSAL))
        self.assertEqual(
            budget.charge(REFUSAL),
            Reply(421, "4.7.0", "Too many refused commands, closing connection"),
        )


class StartTLSTests(SynchronousTestCase):
    def test_starttls_states(self) -> None:
        """STARTTLS takes no argument, is refused once active and unavailable without a context."""
        s = session()
        self.assertEqual(said(s.starttls("x"))[0][::2], (501, ERROR))
        self.assertEqual(said(s.starttls("")), [(454, "4.7.0 TLS not available", None)])
        s.tls_available = True
        self.assertEqual(s.starttls(""), [StartTLS()])
        s.tls_started()
        self.assertEqual(said(s.starttls("")), [(503, "5.5.1 TLS already active", ERROR)])

    def test_tls_forgets_the_plaintext_session(self) -> None:
        """RFC 3207 4.2: the greeting, the login and the transaction (its chunks too) go."""
        s = session()
        in_transaction(s, "b@example.org")
        s.authenticated = True
        old = s.tx
        old.chunks = ChunkReader(100)
        self.assertEqual(s.tls_started(), [Abandon(old)])
        self.assertFalse(s.greeted or s.authenticated)
        self.assertIsNone(s.tx.sender)

    def test_keywords_follow_the_state(self) -> None:
        """STARTTLS is offered until TLS is on; AUTH only inside TLS unless allowed."""
        s = session(auth_enabled=True)
        s.tls_available = True
        self.assertIn(b"STARTTLS", s.extensions())
        self.assertNotIn(b"AUTH", s.extensions())
        s.tls_started()
        self.assertNotIn(b"STARTTLS", s.extensions())
        self.assertEqual(s.extensions()[b"AUTH"], [b"PLAIN", b"LOGIN"])


class AuthTests(SynchronousTestCase):
    def authenticating(self) -> Session:
        s = session(auth_enabled=True)
        s.tls_started()
        s.helo("c", extended=True)
        return s

    def test_auth_states(self) -> None:
        """AUTH needs it enabled, TLS, EHLO, no login yet and no transaction; then the guard."""
        self.assertEqual(said(session().auth("PLAIN"))[0][0], 502)
        plain = session(auth_enabled=True)
        self.assertEqual(
            said(plain.auth("PLAIN"))[0][:2],
            (538, "5.7.11 Encryption required: send STARTTLS first"),
        )
        s = session(auth_enabled=True)
        s.tls_started()
        self.assertEqual(said(s.auth("PLAIN"))[0][1], "5.5.1 Send EHLO first")
        s.helo("c", extended=True)
        self.assertEqual(s.auth("PLAIN x"), [CheckAuthBlocked("PLAIN x")])
        s.authenticated = True
        self.assertEqual(said(s.auth("PLAIN"))[0][1], "5.5.1 Already authenticated")

    def test_plain_with_initial_response(self) -> None:
        """AUTH PLAIN with its response ends the exchange with a Login."""
        s = self.authenticating()
        [login] = s.auth_start("plain AHVzZXIAc2VjcmV0")
        assert isinstance(login, Login)
        self.assertEqual(
            (login.credentials.username, login.credentials.password), (b"user", b"secret")
        )
        self.assertIsNone(s.sasl)

    def test_login_dialogue(self) -> None:
        """AUTH LOGIN asks for the user name, then the password, then logs in."""
        s = self.authenticating()
        self.assertEqual(said(s.auth_start("LOGIN")), [(334, "VXNlcm5hbWU6", None)])
        self.assertEqual(said(s.auth_response(b"dXNlcg==")), [(334, "UGFzc3dvcmQ6", None)])
        [login] = s.auth_response(b"c2VjcmV0")
        assert isinstance(login, Login)
        self.assertEqual(login.credentials.username, b"user")

    def test_bad_exchanges_are_errors(self) -> None:
        """Unknown mechanisms, cancels and bad base64 are client errors that end the exchange."""
        s = self.authenticating()
        self.assertEqual(said(s.auth_start("CRAM-MD5"))[0][::2], (504, ERROR))
        self.assertEqual(said(s.auth_start(""))[0][::2], (501, ERROR))
        s.auth_start("LOGIN")
        self.assertEqual(
            said(s.auth_response(b"*")), [(501, "5.0.0 Authentication cancelled", ERROR)]
        )
        self.assertIsNone(s.sasl)
        s.auth_start("PLAIN")
        self.assertEqual(said(s.auth_response(b"!!"))[0][::2], (501, ERROR))
        self.assertIsNone(s.sasl)


class ChunkingTests(SynchronousTestCase):
    def test_unreadable_size_closes(self) -> None:
        """A BDAT whose size cannot be read is answered and the session closes (no resync)."""
        outcome = session().bdat("lots")
        self.assertEqual(said(outcome)[0][0], 501)
        self.assertEqual(effects(outcome), [Close])

    def test_refused_chunks_are_still_read(self) -> None:
        """Before MAIL or a recipient the chunk is read and refused as a client error."""
        s = session()
        [read] = s.bdat("3")
        assert isinstance(read, ReadChunk)
        self.assertEqual(read.chunk.size, 3)
        self.assertEqual(read.refusal, Say(Reply(503, "5.5.1", "Send MAIL first"), ERROR))
        in_transaction(s)
        [read] = s.bdat("3 LAST")
        assert isinstance(read, ReadChunk) and read.refusal is not None
        self.assertEqual(read.refusal.reply.code, 554)

    def test_accepted_chunk(self) -> None:
        """With a sender and a recipient the chunk joins the body."""
        s = session()
        in_transaction(s, "b@example.org")
        self.assertEqual(s.bdat("10 LAST"), [ReadChunk(Chunk(10, True), None)])

    def test_failed_chunk_poisons_the_rest(self) -> None:
        """After a refused chunk, later ones get the same reply (not counted) until LAST."""
        s = session()
        in_transaction(s, "b@example.org")
        old = s.tx
        old.chunks = ChunkReader(100)
        too_big = Reply(552, "5.3.4", "Message too big")
        self.assertEqual(s.chunk_refused(too_big, last=False), [Abandon(old)])
        [read] = s.bdat("5")
        assert isinstance(read, ReadChunk)
        self.assertEqual(read.refusal, Say(too_big))
        self.assertEqual(said(s.rcpt("TO:<c@example.org>"))[0][0], 503)
        old.chunks = None  # what the shell's Abandon does
        self.assertEqual(s.chunk_refused(too_big, last=True), [])
        self.assertIsNone(s.tx.sender)


class SettingsTests(SynchronousTestCase):
    def test_setting_reaches_the_session(self) -> None:
        """SMTP_DEFAULT_DOMAIN is a setting, validated as a host name, and sessions get it."""
        config = load({"SMTP_DEFAULT_DOMAIN": "corp.example"}, fqdn=lambda: "relay.test")
        self.assertEqual(session_settings(config).default_domain, "corp.example")
        graph = load(
            {
                "GRAPH_TENANT_ID": "t",
                "GRAPH_CLIENT_ID": "c",
                "GRAPH_CLIENT_SECRET": "s",
                "GRAPH_SENDER": "relay@contoso.example",
            },
            fqdn=lambda: "relay.test",
        )
        # The Graph provider's mailboxes reach the session through tap.
        senders = GraphSettings.from_config(graph).sender
        self.assertEqual(
            session_settings(graph, mailboxes=senders).default_domain, "contoso.example"
        )
        with self.assertRaises(ConfigError):
            load({"SMTP_DEFAULT_DOMAIN": "not a domain"}, fqdn=lambda: "relay.test")
