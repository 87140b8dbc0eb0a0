"""The SMTP dialogue's state, without I/O.

L{Transaction} is everything one mail transaction (MAIL to the end of DATA
or BDAT LAST, or to RSET) has gathered: the sender, the recipients, what
MAIL declared, and, once the body is being read, the messages it goes to
and the body itself.  The protocol shell (L{smtpproxy.smtp.protocol}) holds
exactly one; starting over is making a new one, so nothing of an old
transaction can leak into the next.

L{ReplyBudget} counts the replies that count against the client (its
mistakes, and policy refusals) in one place; the shell's one reply method
consults it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.mail.smtp import Address, User

from smtpproxy.addresses import default_domain, envelope_key, split
from smtpproxy.config import Config
from smtpproxy.errors import Reply
from smtpproxy.smtp import sasl
from smtpproxy.smtp.chunking import Chunk, ChunkReader, ChunkSizeError, parse_bdat
from smtpproxy.smtp.commands import (
    CommandError,
    MailArguments,
    RcptArguments,
    check_line,
    parse_mail,
    parse_rcpt,
)
from smtpproxy.smtp.dotreader import DataReader
from smtpproxy.spool import MessageBody


class Message(Protocol):
    """What a recipient's factory makes (the avatar's IMessage, with the body handed over whole).

    A Protocol rather than twisted.mail's IMessage: the relay's own message
    takes the spooled body in one call instead of line by line.
    """

    def bodyReceived(self, body: MessageBody) -> None:
        """The whole body, spooled."""

    def eomReceived(self) -> object:
        """Deliver: a Deferred of the message id, or the id itself."""

    def connectionLost(self) -> None:
        """The transaction ended without a delivery."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What every session needs to know, derived once from the configuration.

    No field has a default: every default is declared once, in
    L{smtpproxy.config}, and L{session_settings} is how these are built.
    """

    hostname: str
    max_message_size: int
    # Bodies past spool_threshold go to an unlinked file in spool_dir ("":
    # the system's temp dir); past max_inflight_bytes held in memory by all
    # sessions together, new bodies go there at once.
    spool_threshold: int
    spool_dir: str
    max_inflight_bytes: int
    max_recipients: int
    command_timeout: float
    # Before the first command, and again after STARTTLS (never longer
    # than the command timeout).
    greeting_timeout: float
    data_timeout: float
    auth_enabled: bool
    allow_insecure_auth: bool
    max_errors: int
    # Policy refusals (sender or recipient not allowed, rate limit, AUTH
    # needed) are not client mistakes and have their own, larger budget,
    # renewed by each delivered message (Postfix's smtpd_hard_error_limit
    # counts "errors without delivering mail" the same way).
    max_refusals: int
    max_auth_failures: int
    # What a bare MAIL FROM local part is qualified with (empty: the host
    # name, as Postfix's myorigin defaults to myhostname).
    default_domain: str
    # The configured AUTH user names: a failed login logs one of these as
    # typed and anything else only as a hash (it may be a mistyped password).
    auth_users: tuple[str, ...]
    # Per-connection debug lines cost a log event each even when filtered
    # out; they are only built when the log level asks for them.
    log_sessions: bool
    # BINARYMIME is offered (RFC 3030): the provider carries binary content.
    binarymime: bool
    # At a forced stop: how long the answer of a message already past
    # withdrawing (handed to the backend, or its queue commit under way) is
    # waited for (SMTP_SHUTDOWN_HANDOVER_GRACE).
    handover_grace: float


def session_settings(
    config: Config, binarymime: bool = False, mailboxes: Sequence[str] = ()
) -> SessionSettings:
    """The per-session view of the configuration.

    @param binarymime: offer BINARYMIME (see the provider's C{binary_mime}).
    @param mailboxes: the mailboxes the provider sends as (the default domain).
    """
    return SessionSettings(
        hostname=config.smtp_hostname,
        max_message_size=config.smtp_max_message_size,
        spool_threshold=config.smtp_spool_threshold,
        spool_dir=config.smtp_spool_dir,
        max_inflight_bytes=config.smtp_max_inflight_bytes,
        max_recipients=config.smtp_max_recipients,
        command_timeout=config.smtp_command_timeout,
        greeting_timeout=config.smtp_greeting_timeout,
        data_timeout=config.smtp_data_timeout,
        auth_enabled=config.auth_enabled,
        allow_insecure_auth=config.smtp_allow_insecure_auth,
        max_errors=config.smtp_max_errors,
        max_refusals=config.smtp_max_refusals,
        max_auth_failures=config.smtp_auth_max_failures,
        default_domain=default_domain(config.smtp_default_domain, mailboxes),
        auth_users=(config.smtp_username,) if config.smtp_username else (),
        log_sessions=config.log_level == "debug",
        binarymime=binarymime,
        handover_grace=config.smtp_shutdown_handover_grace,
    )


class ParsedAddress(Address):
    """An address we already validated with L{smtpproxy.smtp.commands}.

    Twisted's C{Address} tokenizer rejects valid addresses (address literals,
    escaped quotes), so we bypass it and fill in the same attributes.

    @ivar parameters: the whole parsed MAIL or RCPT command, so that the
        delivery avatar (which Twisted hands only the address) sees its
        parameters too (DSN's RET, ENVID, NOTIFY, ORCPT).
    """

    def __init__(
        self, address: str, parameters: MailArguments | RcptArguments | None = None
    ) -> None:
        self.parameters = parameters
        # UTF-8: an SMTPUTF8 transaction's addresses (RFC 6531) are not ASCII.
        local, domain = split(address)
        self.addrstr = address.encode("utf-8")
        self.local = local.encode("utf-8")
        self.domain = domain.encode("utf-8")


@dataclass(slots=True, eq=False)
class Transaction:
    """One mail transaction, from MAIL on; a new one replaces it when it ends.

    @ivar sender: the MAIL address with its parameters (DSN's RET and ENVID
        travel in C{sender.parameters}); None before MAIL.
    @ivar recipients: each accepted RCPT's C{User} and the message factory
        the delivery avatar gave for it, in order.
    @ivar keys: L{envelope_key} of each recipient, so that a duplicate is
        found without rescanning the list.
    @ivar smtputf8: MAIL declared SMTPUTF8 (RFC 6531): UTF-8 addresses pass.
    @ivar binary: MAIL declared BODY=BINARYMIME (RFC 3030): only BDAT may follow.
    @ivar messages: the avatar's messages the body goes to, once DATA or the
        first BDAT opened them.
    @ivar body: where the body is written, once opened.
    @ivar reader: the DATA reader while the body arrives by DATA.
    @ivar chunks: the reader of the transaction's BDAT chunks so far.
    @ivar chunk_failed: a BDAT chunk was refused; every further chunk gets
        this reply until LAST or RSET (RFC 3030 2).
    """

    sender: ParsedAddress | None = None
    recipients: list[tuple[User, Callable[[], Message]]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    smtputf8: bool = False
    binary: bool = False
    messages: list[Message] = field(default_factory=list)
    body: MessageBody | None = None
    reader: DataReader | None = None
    chunks: ChunkReader | None = None
    chunk_failed: Reply | None = None

    @property
    def bdat_started(self) -> bool:
        """BDAT was used in this transaction (RFC 3030 2: DATA and RCPT may no longer follow)."""
        return self.chunks is not None or self.chunk_failed is not None


# What a reply counts against: a client's mistake, or a policy refusal.
Budget = Literal["error", "refusal"]
ERROR: Final = "error"
REFUSAL: Final = "refusal"


@dataclass(slots=True)
class ReplyBudget:
    """How many mistakes and refusals a session may still make before it is closed.

    Each kind has its own budget: a client sending to many recipients that
    the allow-list refuses makes no mistake and must not be cut off after
    C{max_errors}; one that goes on being refused without delivering
    anything is, after C{max_refusals}.  A delivered message renews the
    refusal budget (Postfix's smtpd_hard_error_limit idea).
    """

    max_errors: int
    max_refusals: int
    errors: int = 0
    refusals: int = 0

    def charge(self, kind: Budget) -> Reply | None:
        """Count one reply of C{kind}; once the budget is spent, the 421 to send instead."""
        if kind == REFUSAL:
            self.refusals += 1
            if self.refusals >= self.max_refusals:
                return Reply(421, "4.7.0", "Too many refused commands, closing connection")
            return None
        self.errors += 1
        if self.errors >= self.max_errors:
            return Reply(421, "4.7.0", "Too many errors, closing connection")
        return None

    def delivered(self) -> None:
        """A message went through: the client is not just probing the policy."""
        self.refusals = 0


# -- the dialogue ------------------------------------------------------------

# The actions a Session returns are values, never changed once made (most
# replies are module constants); they are not frozen only because a frozen
# dataclass costs three times as much to build, on every command.


@dataclass(slots=True)
class Say:
    """Send C{reply}; C{counts_as} charges it to a L{ReplyBudget}.

    @ivar keywords: the EHLO reply: the extension keyword lines follow
        (the shell formats and caches them per listener).
    @ivar wire: the reply's line as sent, formatted once: most replies are
        module constants, so a session never formats them again.
    """

    reply: Reply
    counts_as: Budget | None = None
    keywords: bool = False
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.wire = wire(self.reply)


def wire(reply: Reply) -> bytes:
    """A one-line reply as sent."""
    return b"%d %s\r\n" % (reply.code, reply.render())


@dataclass(slots=True)
class Close:
    """Close the session once the replies before it have been sent."""


@dataclass(slots=True)
class Abandon:
    """Release what a dropped transaction holds (its avatar messages, its body)."""

    transaction: Transaction


@dataclass(slots=True)
class Greeted:
    """HELO or EHLO named the client: C{name} goes into what the avatar sees."""

    name: str


@dataclass(slots=True)
class CheckSender:
    """Ask the guard and the delivery avatar about this sender, then call
    L{Session.sender_accepted} (or say their refusal)."""

    arguments: MailArguments


@dataclass(slots=True)
class CheckRecipient:
    """Ask the guard about this recipient, then call L{Session.recipient_allowed}."""

    arguments: RcptArguments


@dataclass(slots=True)
class ValidateRecipient:
    """Ask the delivery avatar about this recipient; on success call
    L{Session.recipient_accepted} with the message factory it gives."""

    address: ParsedAddress
    key: str


@dataclass(slots=True)
class OpenData:
    """Open the transaction's messages and body, then say L{GO_AHEAD} and read DATA."""


@dataclass(slots=True)
class ReadChunk:
    """Read the BDAT chunk's octets, then answer it.

    @ivar refusal: the chunk is read and dropped, and this is the answer;
        None: it joins the transaction's body (opened first if need be).
    """

    chunk: Chunk
    refusal: Say | None


@dataclass(slots=True)
class StartTLS:
    """Say 220 and start TLS, dropping pipelined plaintext; then call L{Session.tls_started}."""


@dataclass(slots=True)
class CheckAuthBlocked:
    """Ask the guard whether this client may try a login; if so call L{Session.auth_start}."""

    argument: str


@dataclass(slots=True)
class Login:
    """Log in with these credentials through the portal (the SASL exchange is over)."""

    credentials: IUsernamePassword


Action = (
    Say
    | Close
    | Abandon
    | Greeted
    | CheckSender
    | CheckRecipient
    | ValidateRecipient
    | OpenData
    | ReadChunk
    | StartTLS
    | CheckAuthBlocked
    | Login
)
Outcome = list[Action]

OK = Say(Reply(250, "2.0.0", "OK"))
CLOSE = Close()
OPEN_DATA = OpenData()
GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
_CANNOT_VRFY = Say(Reply(252, "2.5.0", "Cannot verify the user, but will accept the message"))
_NO_EXPN = Say(Reply(502, "5.5.1", "EXPN is not supported"))
_HELP = Say(
    Reply(
        214,
        "2.0.0",
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT STARTTLS AUTH",
    )
)
_MAIL_FIRST = Say(Reply(503, "5.5.1", "Send MAIL first"), ERROR)
_NO_RECIPIENTS = Say(Reply(554, "5.5.1", "No valid recipients"), ERROR)
_SENDER_OK = Say(Reply(250, "2.1.0", "Sender OK"))
_RECIPIENT_OK = Say(Reply(250, "2.1.5", "Recipient OK"))
_DUPLICATE = Say(Reply(250, "2.1.5", "Recipient OK (duplicate ignored)"))
_TOO_MANY = Say(Reply(452, "4.5.3", "Too many recipients"))
_PLAIN_CHALLENGE = Say(Reply(334, "", ""))
_USERNAME_CHALLENGE = Say(Reply(334, "", "VXNlcm5hbWU6"))  # "Username:"
_PASSWORD_CHALLENGE = Say(Reply(334, "", "UGFzc3dvcmQ6"))  # "Password:"


@functools.lru_cache(maxsize=8)
def _closing(hostname: str) -> Say:
    """QUIT's answer, made once per host name rather than once per session."""
    return Say(Reply(221, "2.0.0", f"{hostname} closing connection"))


class Session:
    """The SMTP dialogue of one connection as a state machine without I/O.

    Each command method takes the command's argument and returns what to
    do, in order: replies to send (L{Say}) and effects for the protocol
    shell to carry out (L{Close}, L{CheckSender}, L{OpenData}, ...).  The
    shell owns the transport, the timers, the guard, the portal and the
    delivery avatar; when an effect's answer comes back, it calls the
    matching method here (L{sender_accepted}, L{recipient_allowed},
    L{recipient_accepted}).  Nothing here reads a clock, logs or writes.

    @ivar greeted: HELO or EHLO was accepted (forgotten by STARTTLS).
    @ivar tx: the mail transaction; a new one when it ends.
    @ivar authenticated: AUTH succeeded (the shell says so).
    @ivar needs_auth: MAIL needs AUTH first (the guard decides per client).
    """

    def __init__(self, settings: SessionSettings, peer: str) -> None:
        self.settings = settings
        self.peer = peer
        self.tx = Transaction()
        self.needs_auth = settings.auth_enabled

    greeted = False
    authenticated = False
    # The session runs inside TLS (after STARTTLS, or implicit TLS); TLS
    # could be started (a TLS-capable transport and a server context).
    tls_active = False
    tls_available = False
    # An AUTH exchange in progress: the mechanism, and LOGIN's user name
    # once given.
    sasl: tuple[str, bytes | None] | None = None

    def auth_offered(self) -> bool:
        """AUTH is advertised and accepted: enabled, and inside TLS unless allowed without."""
        settings = self.settings
        return settings.auth_enabled and (self.tls_active or settings.allow_insecure_auth)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """The EHLO keywords in the session's present state."""
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.settings.max_message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"CHUNKING": None,
            b"DSN": None,
            b"SMTPUTF8": None,
        }
        if self.settings.binarymime:
            ext[b"BINARYMIME"] = None
        if self.tls_available and not self.tls_active:
            ext[b"STARTTLS"] = None
        if self.auth_offered():
            ext[b"AUTH"] = list(sasl.MECHANISMS)
        return ext

    def reset(self, new: Transaction | None = None) -> Outcome:
        """End the transaction (C{new} starts the next); a BDAT one's chunks are dropped."""
        old = self.tx
        if new is None:
            if old.sender is None:
                # Nothing was started (a sender comes first): keep the empty one.
                return []
            new = Transaction()
        self.tx = new
        return [Abandon(old)] if old.chunks is not None else []

    # -- commands without a transaction --------------------------------------

    def helo(self, argument: str, extended: bool) -> Outcome:
        """HELO or EHLO: greet (EHLO lists the extensions) and start over."""
        if not argument:
            verb = "EHLO" if extended else "HELO"
            return [Say(Reply(501, "5.5.4", f"{verb} needs your domain name or address"), ERROR)]
        self.greeted = True
        outcome = self.reset()
        outcome.append(Greeted(argument))
        # check_line refused CR and LF in the argument: the text is one line.
        text = f"{self.settings.hostname} greets {argument} [{self.peer}]"
        outcome.append(Say(Reply(250, "", text), keywords=extended))
        return outcome

    def noop(self, argument: str) -> Outcome:
        return [OK]

    def vrfy(self, argument: str) -> Outcome:
        return [_CANNOT_VRFY]

    def expn(self, argument: str) -> Outcome:
        return [_NO_EXPN]

    def help(self, argument: str) -> Outcome:
        return [_HELP]

    def rset(self, argument: str) -> Outcome:
        outcome = self.reset()
        outcome.append(OK)
        return outcome

    def quit(self, argument: str) -> Outcome:
        return [_closing(self.settings.hostname), CLOSE]

    # -- the transaction --------------------------------------------------------

    def mail(self, argument: str) -> Outcome:
        """MAIL: the state checks and the syntax; the policy and the avatar come next."""
        if not self.greeted:
            return [Say(Reply(503, "5.5.1", "Send HELO or EHLO first"), ERROR)]
        if self.tx.sender is not None:
            return [
                Say(Reply(503, "5.5.1", "Sender already given; send RSET to start over"), ERROR)
            ]
        if self.needs_auth and not self.authenticated:
            return [Say(Reply(530, "5.7.0", "Authentication required"), REFUSAL)]
        settings = self.settings
        try:
            parsed = parse_mail(
                argument,
                settings.max_message_size,
                settings.default_domain or settings.hostname,
                settings.binarymime,
            )
        except CommandError as e:
            return [Say(e.reply, ERROR)]
        return [CheckSender(parsed)]

    def sender_accepted(self, origin: ParsedAddress) -> Outcome:
        """The guard and the avatar took the sender: a new transaction starts."""
        parsed = origin.parameters
        assert isinstance(parsed, MailArguments)
        binary = parsed.body == "BINARYMIME"
        outcome = self.reset(Transaction(origin, smtputf8=parsed.smtputf8, binary=binary))
        outcome.append(_SENDER_OK)
        return outcome

    def rcpt(self, argument: str) -> Outcome:
        """RCPT: the state checks and the syntax; the guard comes next."""
        tx = self.tx
        if tx.sender is None:
            return [_MAIL_FIRST]
        if tx.bdat_started:
            return [Say(Reply(503, "5.5.1", "RCPT after BDAT; send RSET to start over"), ERROR)]
        try:
            parsed = parse_rcpt(argument, tx.smtputf8)
        except CommandError as e:
            return [Say(e.reply, ERROR)]
        return [CheckRecipient(parsed)]

    def recipient_allowed(self, parsed: RcptArguments) -> Outcome:
        """The guard allows the recipient: a duplicate, one too many, or one for the avatar."""
        tx = self.tx
        key = envelope_key(parsed.recipient)
        if key in tx.keys:
            # The same mailbox twice must still receive the message once.
            return [_DUPLICATE]
        if len(tx.recipients) >= self.settings.max_recipients:
            return [_TOO_MANY]
        return [ValidateRecipient(ParsedAddress(parsed.recipient, parsed), key)]

    def recipient_accepted(self, user: User, factory: Callable[[], Message], key: str) -> Outcome:
        """The avatar takes the recipient: it joins the transaction."""
        self.tx.recipients.append((user, factory))
        self.tx.keys.add(key)
        return [_RECIPIENT_OK]

    def data(self, argument: str) -> Outcome:
        """DATA: allowed only after MAIL and a recipient, not after BDAT or BINARYMIME."""
        tx = self.tx
        if tx.sender is None:
            return [_MAIL_FIRST]
        if tx.bdat_started:
            # RFC 3030 2: one transaction is sent with DATA or with BDAT.
            return [Say(Reply(503, "5.5.1", "DATA after BDAT; send RSET to start over"), ERROR)]
        if tx.binary:
            return [Say(Reply(503, "5.5.1", "BODY=BINARYMIME needs BDAT, not DATA"), ERROR)]
        if not tx.recipients:
            return [_NO_RECIPIENTS]
        if argument:
            return [Say(Reply(501, "5.5.4", "DATA takes no arguments"), ERROR)]
        return [OPEN_DATA]

    # -- BDAT (RFC 3030) -----------------------------------------------------------

    def bdat(self, argument: str) -> Outcome:
        """BDAT: every chunk whose size can be read is read, accepted or not."""
        try:
            chunk = parse_bdat(argument)
        except ChunkSizeError as e:
            # Where the chunk ends, and so where the next command starts,
            # cannot be known: whatever follows may be content, and running
            # it as commands is how smuggling works.  RFC 3030 offers no way
            # back into step, so the reply is the last thing we send.
            return [Say(e.reply), CLOSE]
        tx = self.tx
        refusal: Say | None = None
        if tx.chunk_failed is not None:
            refusal = Say(tx.chunk_failed)
        elif tx.sender is None:
            refusal = _MAIL_FIRST
        elif not tx.recipients:
            refusal = _NO_RECIPIENTS
        elif chunk.problem is not None:
            refusal = Say(chunk.problem, ERROR)
        return [ReadChunk(chunk, refusal)]

    def chunk_refused(self, reply: Reply, last: bool) -> Outcome:
        """A chunk was refused, so the transaction has failed (RFC 3030 2).

        Its chunks so far are dropped.  Chunks the client pipelined behind
        the refused one must not make a message with a hole in it: each gets
        the same reply, until LAST (which ends the transaction) or RSET.
        """
        tx = self.tx
        if tx.sender is None:
            return []
        outcome: Outcome = [Abandon(tx)] if tx.chunks is not None else []
        if last:
            self.tx = Transaction()
        else:
            tx.chunk_failed = reply
        return outcome

    # -- STARTTLS ----------------------------------------------------------------

    def starttls(self, argument: str) -> Outcome:
        if argument:
            return [Say(Reply(501, "5.5.4", "STARTTLS takes no arguments"), ERROR)]
        if self.tls_active:
            return [Say(Reply(503, "5.5.1", "TLS already active"), ERROR)]
        if not self.tls_available:
            return [Say(Reply(454, "4.7.0", "TLS not available"))]
        return [StartTLS()]

    def tls_started(self) -> Outcome:
        """RFC 3207 4.2: inside TLS, forget everything learned before it."""
        self.tls_active = True
        self.greeted = False
        self.authenticated = False
        return self.reset()

    # -- AUTH (RFC 4954) ------------------------------------------------------------

    def auth(self, argument: str) -> Outcome:
        """AUTH: the state checks; the guard's verdict on this client comes next."""
        if not self.settings.auth_enabled:
            return [Say(Reply(502, "5.5.1", "AUTH is not enabled on this server"), ERROR)]
        if not self.auth_offered():
            return [Say(Reply(538, "5.7.11", "Encryption required: send STARTTLS first"), ERROR)]
        if not self.greeted:
            return [Say(Reply(503, "5.5.1", "Send EHLO first"), ERROR)]
        if self.authenticated:
            return [Say(Reply(503, "5.5.1", "Already authenticated"), ERROR)]
        if self.tx.sender is not None:
            during = "AUTH is not allowed during a mail transaction"
            return [Say(Reply(503, "5.5.1", during), ERROR)]
        return [CheckAuthBlocked(argument)]

    def auth_start(self, argument: str) -> Outcome:
        """The mechanism and its initial response, if any; then the first challenge."""
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if not mechanism:
            return [Say(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"), ERROR)]
        if mechanism.encode() not in sasl.MECHANISMS:
            return [Say(Reply(504, "5.5.4", "Unrecognized authentication mechanism"), ERROR)]
        self.sasl = (mechanism, None)
        if initial:
            # split_command let only ASCII through outside MAIL and RCPT.
            return self.auth_response(initial.encode("ascii"))
        return [_PLAIN_CHALLENGE if mechanism == "PLAIN" else _USERNAME_CHALLENGE]

    def auth_response(self, line: bytes) -> Outcome:
        """One line of the SASL exchange: the next challenge, an error, or a L{Login}."""
        assert self.sasl is not None
        mechanism, username = self.sasl
        try:
            check_line(line)
        except CommandError as e:
            self.sasl = None
            return [Say(e.reply, ERROR)]
        if line.strip() == b"*":
            self.sasl = None
            return [Say(Reply(501, "5.0.0", "Authentication cancelled"), ERROR)]
        try:
            decoded = sasl.decode_base64(line)
            if mechanism == "PLAIN":
                creds: IUsernamePassword = sasl.decode_plain(decoded)
            elif username is None:
                self.sasl = (mechanism, sasl.decode_login_field(decoded, "user name"))
                return [_PASSWORD_CHALLENGE]
            else:
                creds = UsernamePassword(username, sasl.decode_login_field(decoded, "password"))
        except sasl.SASLError as e:
            self.sasl = None
            return [Say(Reply(501, "5.5.2", f"Malformed AUTH response: {e}"), ERROR)]
        self.sasl = None
        return [Login(creds)]
