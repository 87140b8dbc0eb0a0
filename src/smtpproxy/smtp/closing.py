"""How an SMTP session ends: the close sequence, time-outs and the shutdown steps.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from OpenSSL import SSL
from twisted.logger import LogLevel

from smtpproxy.smtp.base import CHUNK, DATA, ShellBase, log
from smtpproxy.smtp.session import Message

if TYPE_CHECKING:
    from smtpproxy.delivery import Heard

# A closed session whose peer does not take our last bytes (or never
# finishes a TLS handshake) is cut off after this many seconds.
CLOSE_GRACE = 10.0
# Forced closed while the queue commits the session's message, or while the
# provider that has it answers: the outcome is waited for the session's
# handover_grace (SMTP_SHUTDOWN_HANDOVER_GRACE; the factory's wait for the
# sessions to end is longer, see smtp.factory.force_wait, so the session ends
# itself).


class Closing(ShellBase):
    """Close after the last reply, with a grace timer; 421 at shutdown or time-out."""

    def timeoutConnection(self) -> None:
        if self._closing:
            # The grace period of _close ran out: the peer is not taking
            # our last bytes (or never finished a TLS handshake).
            self._tcp.abortConnection()
            return
        if self._awaiting_commit:
            # The queue's commit of the message (or, in direct mode, the
            # provider that has it) did not answer in time.  It may still
            # land, so "not accepted" would be a lie, and 250 may be one
            # too: the only honest answer is none (RFC 5321 6.1: the client
            # retries, the classic duplicate rather than a loss).
            pending = self._delivering
            queued = pending is not None and all(
                getattr(message, "queued", False) for message in pending[1]
            )
            self.factory.log_summary.emit(
                LogLevel.warn,
                "queue commit unanswered at shutdown, closing without a reply"
                if queued
                else "provider answer unanswered at shutdown, closing without a reply",
                self._peer,
                session=self.id,
            )
            self._closing = True
            self._release_slot()
            self._give_up_delivery()
            self._tcp.abortConnection()
            # Direct mode: the provider's send goes no further (its outcome
            # is logged as unknown, naming the message).
            _cancel_sends(pending, heard="nothing")
            return
        if self._handshaking:
            # Implicit TLS and no complete handshake within the greeting
            # limit: nothing can be said to this client, so it is cut off.
            self.factory.log_summary.emit(
                LogLevel.info, "TLS handshake timed out", self._peer, session=self.id
            )
            self._closing = True
            self._release_slot()
            self._tcp.abortConnection()
            return
        self.reply(421, "4.4.2", f"{self.settings.hostname} idle too long, closing connection")
        self._close(grace=1.0)

    def shutdown(self) -> None:
        """The service is stopping: close now unless a message is on its way.

        Only a session inside DATA or waiting on its delivery holds the
        shutdown up.  One that has merely named a sender or recipients has
        handed us nothing yet; 421 loses nothing and the client retries.
        """
        self._stopping = True
        if not self._in_transaction():
            self.reply(421, "4.3.2", f"{self.settings.hostname} shutting down, try later")
            self._close()

    def force_close(self) -> None:
        """Shutdown timed out: say so if we still can, abort after a short grace.

        A message the queue is storing is withdrawn first: only when the
        store confirms it will never commit does the client hear "not
        accepted".  If its commit is already under way, the client gets
        the real outcome (250 once committed) within the handover grace
        (C{SMTP_SHUTDOWN_HANDOVER_GRACE}, 1.5 s unless set: an upstream with
        slow content filtering may need longer).
        Direct mode likewise: once the provider has handed the message to
        its backend (the upstream has the final dot, Graph the send
        request), cancelling cannot take it back, so the provider's answer
        is waited for within the same grace; only a send not yet handed
        over is cancelled, and the client told "not accepted".
        """
        if not self._closing and self._commit_under_way():
            self._awaiting_commit = True
            self.setTimeout(self.settings.handover_grace)
            return
        if not self._closing:
            self._not_accepted()
            return
        pending = self._delivering
        self._close(grace=1.0)
        self._give_up_delivery()
        _cancel_sends(pending)

    def _not_accepted(self) -> None:
        """421 for a message given up at shutdown, then close; its send is cancelled.

        Direct mode: the provider may still be working on the message (a
        slow Graph, an upstream that has not yet had the end of DATA).
        Left alone, it would deliver what the client was just told to send
        again; so the send is cancelled once the client can no longer hear
        a 250 for it (see L{smtpproxy.delivery.RelayMessage.cancel}).
        """
        pending = self._delivering
        self.reply(421, "4.3.2", "Shutting down, message not accepted, try later")
        self._close(grace=1.0)
        self._give_up_delivery()
        _cancel_sends(pending)

    def _commit_under_way(self) -> bool:
        """Withdraw the queued message being stored; True if it is past withdrawing.

        Each message of ours says C{queued} and can C{withdraw}, or, in
        direct mode, whether its send is C{handed_over} (L{outcome_coming});
        one that says neither (another avatar's) is given up as before.
        A withdrawal may answer at once, the session then saying 421 from
        its answer (L{_not_accepted}).
        """
        pending = self._delivering
        if pending is None:
            return False
        committing = False
        for message in pending[1]:
            if outcome_coming(message):
                committing = True
        return committing and not self._closing

    def _in_transaction(self) -> bool:
        return self._busy or self.mode in (DATA, CHUNK) or self.session.tx.chunks is not None

    def _close(self, grace: float = CLOSE_GRACE) -> None:
        """Close after our last reply is sent, or cut off after C{grace} seconds.

        C{loseConnection} waits for pending output (and, inside TLS, for the
        handshake); a peer that never reads or never finishes the handshake
        would otherwise keep its session and connection slot for ever.

        A closing session no longer counts against the connection caps: a
        client that opens a new session as soon as it has read C{221} must
        not be refused because the old one is still being torn down.
        """
        already_closing = self._closing
        self._closing = True
        self._release_slot()
        if self._handshaking:
            # Refused (or shut down) before an implicit-TLS handshake: no cap
            # counts this connection any more, so a client that never sends
            # its ClientHello must not keep it for the whole grace.  A second
            # is enough to finish a handshake and read the refusal.
            grace = min(grace, 1.0)
        self._input.clear()
        self._flush()
        # Before an implicit-TLS handshake the reply waits for it and
        # handshakeCompleted closes; the timer below cuts off a client that
        # never completes it.
        if not already_closing and not self._handshaking:
            self._lose_connection()
        # Even with nothing left in Twisted's buffer the close can stall: the
        # kernel's send queue may be full of replies the peer never reads,
        # and the socket then never turns writable.  So there is always a
        # timer: the idle timer becomes the grace timer (timeoutConnection
        # aborts a closing session); a second close may only make it shorter.
        if not already_closing or self.timeOut is None or grace < self.timeOut:
            self.setTimeout(grace)

    def _lose_connection(self) -> None:
        """Start the transport's close once the last reply has been written.

        Twisted's TLS layer does not start its shutdown (close_notify, then
        the TCP close) while a producer is registered, so the session stops
        being one; and a session that had paused reading resumes it, since
        the peer's close_notify or FIN must be read.  Without this every TLS
        session waited out the close grace and was then aborted (issue 10).

        Twisted's TLS then closes TCP only once the peer has answered with
        its own close_notify, which many clients never send (they read EOF
        and wait for the server to close).  RFC 8446 6.1 lets the side that
        closes stop without waiting for the answer, as Postfix does; telling
        OpenSSL that the answer has come makes Twisted close TCP right
        behind our close_notify.  That is only done when all our output has
        gone into the TLS layer (nothing held back there, which would have
        paused us), so no reply is cut off.
        """
        held_back = self._write_blocked
        self._tcp.unregisterProducer()
        if self._paused:
            self._paused = False
            self._tcp.resumeProducing()
        if self.session.tls_active and not held_back:
            # ISystemHandle: the TLS transports give their OpenSSL connection.
            handle = getattr(self._tcp, "getHandle", lambda: None)()
            if isinstance(handle, SSL.Connection):
                handle.set_shutdown(handle.get_shutdown() | SSL.RECEIVED_SHUTDOWN)
        self._tcp.loseConnection()

    def _release_slot(self) -> None:
        """Stop counting this session against the connection caps (once).

        The stress state (L{RelayFactory.load_changed}) is re-derived when
        the session has ended, not here: idle sessions cut together in one
        storm must all be cut, not spared once the first few are closing.
        """
        if self._admitted:
            self._admitted = False
            self.factory.guard.disconnect(self._peer)

    def _stop_if_shutting_down(self) -> bool:
        """Between transactions during shutdown: say 421 and close. True if closed."""
        if self._stopping and not self._in_transaction():
            self.reply(421, "4.3.2", f"{self.settings.hostname} shutting down, try later")
            self._close()
            return True
        return False


def outcome_coming(message: object) -> bool:
    """At a forced stop: is C{message}'s real outcome on its way, so worth a grace?

    Queue mode: it is, when the store can no longer withdraw the message
    (its commit is under way; C{withdraw} has the side effect of stopping
    one that can).  Direct mode: it is, once the provider has handed the
    message over (C{handed_over}), since a cancel then only cuts off the
    answer.  Otherwise the message is given up: nothing is or will be
    stored or sent, and the client may be told so.
    """
    if getattr(message, "queued", False):
        withdraw = getattr(message, "withdraw", None)
        return withdraw is not None and not withdraw()
    return bool(getattr(message, "handed_over", False))


def cancel_for_gone_client(session: str, pending: tuple[object, list[Message]] | None) -> None:
    """The client disconnected while its message was with the provider (direct mode).

    It never heard 250, so it will send the message again: a send not yet
    handed over is cancelled (else the retry is a duplicate).  One the
    provider has already handed over cannot be taken back; it is left to
    finish (its outcome is logged as usual) and a warning names it, since
    the retry may arrive twice.  Queued messages are the store's business
    and are left alone (L{_give_up_delivery} has already abandoned them).
    """
    if pending is None:
        return
    for message in pending[1]:
        if getattr(message, "queued", False):
            continue
        if getattr(message, "handed_over", False):
            log.warn(
                "client disconnected after the provider had the message: "
                "it may be delivered, and the client will send it again",
                session=session,
                id=getattr(message, "id", None),
            )
            continue
        _cancel_sends((None, [message]), heard="gone")


def _cancel_sends(
    pending: tuple[object, list[Message]] | None, *, heard: Heard = "not accepted"
) -> None:
    """Cancel the provider sends of a delivery given up at shutdown (messages that can)."""
    if pending is None:
        return
    for message in pending[1]:
        cancel = getattr(message, "cancel", None)
        if callable(cancel):
            try:
                if heard == "not accepted":
                    cancel()
                else:
                    cancel(heard)
            except Exception:
                log.failure("cancelling a delivery failed")
