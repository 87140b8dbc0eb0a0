"""The SMTP listener's factory: builds sessions, knows them all, shuts them down.

One L{RelayFactory} serves every SMTP listener of the relay; it holds what
the sessions share (the guard, the spool, the per-listener replies, the
idle limits under load) and the session table that shutdown drains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import ServerFactory

from smtpproxy.errors import Reply
from smtpproxy.logsafe import LoginNames
from smtpproxy.logsummary import LogSummary
from smtpproxy.policy.guard import Guard
from smtpproxy.policy.pressure import ENTER, idle_limits, stressed
from smtpproxy.smtp.base import log
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.smtp.session import Say, SessionSettings
from smtpproxy.spool import InflightBudget, Spool

# At shutdown, sessions forced closed get at least this long to report their
# end; after that the stop goes ahead without them (see RelayFactory._give_up).
FORCE_GRACE = 2.0
# A session waiting out the handover grace (SMTP_SHUTDOWN_HANDOVER_GRACE)
# ends by itself at its end; it gets this much longer to report it.
FORCE_MARGIN = 0.5


def force_wait(handover_grace: float) -> float:
    """How long the stop waits for the sessions it forced closed to end."""
    return max(FORCE_GRACE, handover_grace + FORCE_MARGIN)


class RelayFactory(ServerFactory):
    """Builds sessions and knows every live one, for graceful shutdown."""

    def __init__(
        self,
        settings: SessionSettings,
        portal: Portal,
        tls_options: Any,
        reactor: IReactorTime,
        guard: Guard,
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.portal = portal
        self.tls_options = tls_options
        self.reactor = reactor
        self.sessions: set[RelayProtocol] = set()
        # One budget for the body bytes held in memory by all sessions.
        self.spool = Spool(
            settings.spool_threshold,
            settings.spool_dir or None,
            InflightBudget(settings.max_inflight_bytes),
        )
        # The 220 greeting, the same for every session of this listener.
        self.greeting = Say(Reply(220, "", f"{settings.hostname} ESMTP smtpproxy ready"))
        # EHLO's keyword lines by (STARTTLS offered, AUTH offered).
        self.ehlo_cache: dict[tuple[bool, bool], bytes] = {}
        self.stopping = False
        self._drained: list[defer.Deferred[None]] = []
        self._give_up_call: IDelayedCall | None = None
        # Connection storms: see smtpproxy.pressure for the rule.
        self.stressed = False
        self.idle_limits = idle_limits(settings.greeting_timeout, settings.command_timeout, False)
        # Events a client can repeat at will are logged once per address
        # and interval, with a count (see smtpproxy.logsummary).
        self.log_summary = LogSummary(log, reactor)
        self.login_names = LoginNames(settings.auth_users)

    def stopFactory(self) -> None:
        """The last listener closed: write the refusals counted so far, stop the timer."""
        self.log_summary.stop()

    def buildProtocol(self, addr: IAddress | None) -> RelayProtocol:  # type: ignore[override]
        return RelayProtocol(self)

    def session_ended(self, session: RelayProtocol) -> None:
        self.sessions.discard(session)
        # Nothing to finish unless a drain is under way (most sessions end
        # with none).
        if not self.sessions and (self._drained or self._give_up_call is not None):
            self._finish_drain()

    def _finish_drain(self) -> None:
        if self._give_up_call is not None and self._give_up_call.active():
            self._give_up_call.cancel()
        self._give_up_call = None
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def load_changed(self) -> None:
        """A session was admitted or released: enter or leave the stressed state.

        On a change every open session re-derives its idle limit once; the
        gap between entering and leaving (L{smtpproxy.policy.pressure}) keeps that
        from happening on every connection at the threshold.
        """
        counter = self.guard.connections
        if not self.stressed and counter.total < ENTER * counter.max_total:
            # Calm and below the threshold, as nearly always: no change.
            return
        now = stressed(counter.total, counter.max_total, self.stressed)
        if now == self.stressed:
            return
        self.stressed = now
        s = self.settings
        self.idle_limits = idle_limits(s.greeting_timeout, s.command_timeout, now)
        log.warn(
            "session table nearly full: idle limits shortened"
            if now
            else "session table has room again: idle limits restored",
            sessions=counter.total,
            max_sessions=counter.max_total,
            greeting_timeout=self.idle_limits.greeting,
            command_timeout=self.idle_limits.command,
        )
        for session in list(self.sessions):
            session.apply_idle_limits()

    def shutdown(self, timeout: float) -> defer.Deferred[None]:
        """Close idle sessions now, the rest after their transaction; force after C{timeout}.

        The result fires at most C{timeout} + L{force_wait} seconds later,
        whatever state the sessions are in (see L{_give_up}).
        """
        self.stopping = True
        for session in list(self.sessions):
            _guarded(session, session.shutdown)
        if not self.sessions:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        timer = self.reactor.callLater(timeout, self._force_close)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        d.addCallback(cancel_timer)
        return d

    def _force_close(self) -> None:
        wait = force_wait(self.settings.handover_grace)
        self._give_up_call = self.reactor.callLater(wait, self._give_up)
        for session in list(self.sessions):
            log.warn("closing session still busy at shutdown", session=session.id)
            _guarded(session, session.force_close)

    def _give_up(self) -> None:
        """Stop waiting for sessions that were aborted but never reported their end.

        An aborted TCP connection reports its end on the next reactor turn,
        so this only happens when a transport is broken (as a TLS layer that
        failed to start once was); waiting for it would keep the process
        from ever exiting.
        """
        if not self.sessions:
            return
        log.warn("stopping without sessions that did not end", sessions=len(self.sessions))
        for session in list(self.sessions):
            _guarded(session, session._tcp.abortConnection)
        self.sessions.clear()
        self._finish_drain()


def _guarded(session: RelayProtocol, action: Callable[[], object]) -> None:
    """Run a shutdown step for one session; its failure must not stop the others."""
    try:
        action()
    except Exception as e:
        log.warn("session shutdown step failed", session=session.id, error=repr(e))
