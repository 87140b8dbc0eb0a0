"""What every part of the SMTP shell shares: the session's state, and the parts' contract.

L{smtpproxy.smtp.protocol.RelayProtocol} is one class (Twisted's C{ESMTP}
subclass, one object per connection) assembled from parts, each a module
of its own so that a reader finds one concern in one place:

 - L{smtpproxy.smtp.inputloop}: the input loop and flow control;
 - L{smtpproxy.smtp.output}: every reply, and the batching of replies;
 - L{smtpproxy.smtp.idle}: the idle timer (a deadline, one DelayedCall);
 - L{smtpproxy.smtp.closing}: the close sequence and the shutdown steps;
 - L{smtpproxy.smtp.envelope}: the sender and recipient checks;
 - L{smtpproxy.smtp.intake}: DATA and BDAT bodies up to their delivery;
 - L{smtpproxy.smtp.logins}: the portal logins, the avatar and its logout;
 - L{smtpproxy.smtp.protocol}: the connection, command dispatch, STARTTLS.

They are mixins rather than separate objects because the hot path (a line
in, a reply out) must not pay for an extra object or call per step.  Every
attribute of a session is declared below, once, with its starting value;
the methods that one part calls in another are named in the C{TYPE_CHECKING}
block, which is what lets mypy check each part on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from smtpproxy.policy.pressure import IdleLimits
from smtpproxy.smtp.chunking import ChunkReader
from smtpproxy.smtp.session import (
    Budget,
    Message,
    Outcome,
    ReplyBudget,
    Say,
    Session,
    SessionSettings,
)
from smtpproxy.spool import MessageBody

if TYPE_CHECKING:
    from twisted.mail.interfaces import IMessageDelivery

    from smtpproxy.errors import Reply
    from smtpproxy.smtp.factory import RelayFactory
    from smtpproxy.smtp.session import Transaction

log = Logger(namespace="smtpproxy.smtp")

# What the input loop does with a line or a read: a command, DATA's body,
# an AUTH response, or the octets announced by a BDAT command (RFC 3030).
COMMAND, DATA, AUTH = "COMMAND", "DATA", "AUTH"
CHUNK = "CHUNK"

# Input waiting behind a slow command is capped; past this we stop reading
# from the socket until the command finishes (TCP pushes back on the client).
# Replies collected in one batch are handed to the transport at this size too.
PAUSE_INPUT_AT = 64 * 1024


def _not_connected(data: bytes) -> None:
    raise RuntimeError("reply before the connection was made")


class ShellBase(ESMTP):
    """The state of one SMTP session, shared by the parts of L{RelayProtocol}."""

    # Set in RelayProtocol.__init__.
    factory: RelayFactory
    settings: SessionSettings
    id: str
    _portal: Portal
    _clock: IReactorTime
    # Input not handled yet (see smtpproxy.smtp.inputloop).
    _input: bytearray
    # The dialogue's state and decisions (see smtpproxy.smtp.session).
    session: Session

    # Per-session state and its starting values.  Only the mutable state is
    # made in __init__; the rest starts as these class attributes (a session
    # is built per connection, so each assignment saved counts).
    mode = COMMAND
    user: str | None = None
    timeOut: float | None = None  # type: ignore[assignment]
    _deadline: float | None = None
    _timer: IDelayedCall | None = None
    _busy = False
    _paused = False
    _write_blocked = False
    _data_started = 0.0
    _closing = False
    _stopping = False
    _discarding_line = False
    # Implicit TLS before its handshake has completed: replies wait in
    # _early (the greeting, or a refusal) and no close can start.
    _handshaking = False
    # A finished body between its final dot and its delivery's answer.
    _delivering: tuple[MessageBody, list[Message]] | None = None
    # That delivery was given up (421 at shutdown, or the client left): its
    # answer, when it comes, is not sent.
    _gave_up = False
    # Forced closed at shutdown while the queue was committing its message:
    # waiting for that outcome to tell the client (see Closing.force_close).
    _awaiting_commit = False
    _early: list[bytes]
    # A command arrived since the greeting (or since STARTTLS): the idle
    # limit is then the command timeout, before it the greeting timeout.
    _commanded = False
    # Mistakes and refusals so far (see ReplyBudget), from the first one.
    _budget: ReplyBudget | None = None
    # BDAT (RFC 3030): the chunk being read now (the transaction's reader,
    # or one that only counts a refused chunk), with its LAST flag and the
    # refusal to send once it is read.
    _chunk: ChunkReader | None = None
    _chunk_last = False
    _chunk_refusal: Say | None = None
    _nodelay = False
    _peer = ""
    _admitted = False
    _auth_failures = 0
    # connectionLost ran: a login finishing now is logged out at once.
    _ended = False
    _write: Callable[[bytes], None] = staticmethod(_not_connected)
    # While a batch of input is handled, its replies are collected and sent
    # in one write: pipelined commands get one segment back.
    _corked = False
    _pending: list[bytes]
    _pending_size = 0

    @property
    def _tcp(self) -> Any:
        # The transport is several interfaces at once (ITCPTransport,
        # ITLSTransport, IPushProducer); no single type names that.
        return self.transport

    def _limits(self) -> IdleLimits:
        """The idle limits in force now (shorter while the session table is nearly full)."""
        return self.factory.idle_limits

    if TYPE_CHECKING:
        # The methods one part calls in another, with the part defining them.

        # smtpproxy.smtp.output
        def reply(
            self,
            reply: Say | Reply | int,
            status: str = "",
            text: str = "",
            *,
            counts_as: Budget | None = None,
        ) -> None: ...
        def _send(self, data: bytes) -> None: ...
        def _flush(self) -> None: ...
        def _uncork(self) -> None: ...

        # smtpproxy.smtp.idle
        def setTimeout(self, period: float | None) -> None: ...
        def resetTimeout(self) -> None: ...

        # smtpproxy.smtp.closing
        def _close(self, grace: float = ...) -> None: ...
        def _stop_if_shutting_down(self) -> bool: ...
        def _not_accepted(self) -> None: ...

        # smtpproxy.smtp.inputloop
        def _process(self) -> None: ...
        def _busy_with(
            self,
            d: defer.Deferred[Any],
            on_result: Callable[[Any], object] | None = None,
        ) -> None: ...
        def _unexpected(self, failure: Failure) -> None: ...

        # smtpproxy.smtp.intake
        def _feed_data(self, data: bytes) -> None: ...
        def _feed_chunk(self, data: bytes) -> None: ...
        def _give_up_delivery(self) -> None: ...
        def _abandon(self, tx: Transaction) -> None: ...

        # smtpproxy.smtp.logins
        def _auth_step(self, outcome: Outcome) -> None: ...
        def _end_auth(self) -> None: ...
        def _take_avatar(self, avatar: IMessageDelivery, logout: Callable[[], None]) -> None: ...
        def _drop_avatar(self) -> None: ...
        def _log_in_anonymously(self) -> object: ...

        # smtpproxy.smtp.protocol
        def _run(self, outcome: Outcome) -> None: ...
        def _command(self, line: bytes) -> None: ...
