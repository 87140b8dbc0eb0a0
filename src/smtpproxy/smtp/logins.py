"""The cred side of an SMTP session: AUTH's logins, the avatar, its logout.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred import error as cred_error
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess
from twisted.cred.credentials import Anonymous
from twisted.internet import defer, task
from twisted.logger import LogLevel
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure

from smtpproxy.identities.credentials import ClientCredentials, sni_of
from smtpproxy.identities.errors import BackendUnavailable, RefusedWhileUnavailable
from smtpproxy.smtp.base import AUTH, COMMAND, ShellBase, log
from smtpproxy.smtp.session import CheckAuthBlocked, Login, Outcome

# Only asked whether a checker's interface covers anonymous credentials.
_ANONYMOUS = Anonymous()


class Logins(ShellBase):
    """C{CheckAuthBlocked} and C{Login} carried out; the one avatar and its logout."""

    def _check_auth_blocked(self, action: CheckAuthBlocked) -> None:
        if self.factory.guard.auth_blocked(self._peer):
            self.reply(421, "4.7.0", "Too many failed logins from your address, try later")
            self._close()
            return
        self._auth_step(self.session.auth_start(action.argument))

    def _auth_step(self, outcome: Outcome) -> None:
        """Input goes to the SASL exchange while the session has one open."""
        self.mode = AUTH if self.session.sasl is not None else COMMAND
        self._run(outcome)

    def _end_auth(self) -> None:
        self.mode = COMMAND
        self.session.sasl = None

    def _log_in(self, action: Login) -> None:
        creds = action.credentials
        username = creds.username.decode("utf-8", "replace")

        def succeeded(result: tuple[object, IMessageDelivery, Callable[[], None]]) -> None:
            _, avatar, logout = result
            self._take_avatar(avatar, logout)
            self.deliveryFactory = None
            self.session.authenticated = True
            # An identity's avatar names it (provider/user); otherwise the
            # name the client gave.
            self.user = getattr(avatar, "user", None) or username
            log.info("authenticated", session=self.id, client=self._peer, username=self.user)
            self.reply(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> defer.Deferred[None] | None:
            if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
                return self._auth_failed(username)
            if failure.check(RefusedWhileUnavailable):
                # A secret was tested and refused: counted like a 535, but
                # answered 454 (the backend that is down might say yes).
                return self._auth_failed(username, temporary=True)
            if failure.check(BackendUnavailable):
                # Never counted as a wrong password (the client retries
                # later), so nothing else bounds how often a client can
                # cause it: summarised per address like refusals.
                unavailable = failure.value
                assert isinstance(unavailable, BackendUnavailable)
                self.factory.log_summary.emit(
                    LogLevel.warn,
                    "authentication deferred",
                    self._peer,
                    session=self.id,
                    provider=unavailable.provider,
                    reason=unavailable.reason,
                )
            else:
                log.failure("authentication error", failure, session=self.id)
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None

        # The names the client asked for choose identity providers
        # (unique_domain_auth): the TLS SNI name, and the EHLO name.
        ehlo = self._helo[0] if self._helo else None
        creds = ClientCredentials(
            creds.username,
            creds.password,
            sni_of(self._tcp) if self.session.tls_active else None,
            ehlo.decode("ascii", "replace") if ehlo else None,
            self._peer,
        )
        d = self._portal.login(creds, None, IMessageDelivery)
        d.addCallbacks(succeeded, failed)
        self._busy_with(d)

    def _log_in_anonymously(self) -> object:
        """Log in without credentials: the realm's answer, a L{Failure}, or a Deferred of either.

        For the first C{MAIL} of a session without AUTH.  C{Portal.login}
        would wrap the answer in four Deferred callbacks even when nothing
        waits; with Twisted's C{AllowAnonymousAccess} as the portal's
        checker (the avatar ID is always C{ANONYMOUS}) the realm is asked
        here directly, with what C{Portal.login} would pass it.  Every other
        checker, or none (refused with C{UnhandledCredentials}), goes
        through C{Portal.login} as before.  The avatar's logout is kept by
        L{_take_avatar} either way.
        """
        portal = self._portal
        found = None
        for interface, checker in portal.checkers.items():
            if interface.providedBy(_ANONYMOUS):
                found = checker
                break
        if type(found) is not AllowAnonymousAccess:
            return portal.login(Anonymous(), None, IMessageDelivery)
        try:
            return portal.realm.requestAvatar(ANONYMOUS, None, IMessageDelivery)
        except Exception:
            return Failure()

    # -- the logged-in avatar -------------------------------------------------

    def _take_avatar(self, avatar: IMessageDelivery, logout: Callable[[], None]) -> None:
        """Use a freshly logged-in avatar; the one it replaces is logged out first.

        A login that completes after the connection was lost is logged out
        at once: nothing else would ever release it.
        """
        self._drop_avatar()
        if self._ended:
            self._logout(logout)
            return
        self.delivery = avatar
        self._onLogout = logout

    def _drop_avatar(self) -> None:
        """Forget the avatar (STARTTLS, a new login, the end): its logout runs once."""
        logout, self._onLogout = self._onLogout, None
        self.delivery = None
        if logout is not None:
            self._logout(logout)

    def _logout(self, logout: Callable[[], None]) -> None:
        try:
            logout()
        except Exception:
            # An identity backend's bug must not stop the session's cleanup.
            log.failure("avatar logout failed", session=self.id)

    def _auth_failed(self, username: str, temporary: bool = False) -> defer.Deferred[None] | None:
        """Answer a wrong password slowly; after too many, close the session.

        @param temporary: answer C{454} rather than C{535} (another backend
            could not answer), though the failure counts all the same.
        """
        self._auth_failures += 1
        delay, blocked = self.factory.guard.auth_failed(self._peer, self._auth_failures)
        names = self.factory.login_names
        # Each failure is its own line: the guard's delays and address ban
        # already bound how many one address can cause.  The name appears
        # only when it is a configured user (a password typed into the user
        # name prompt must not reach the log), otherwise as a keyed hash.
        log.warn(
            "authentication failed",
            session=self.id,
            client=self._peer,
            **names.fields(username),
            failures=self._auth_failures,
            blocked=blocked,
            temporary=temporary,
        )

        def answer() -> None:
            if blocked or self._auth_failures >= self.settings.max_auth_failures:
                self.reply(421, "4.7.0", "Too many failed logins, closing connection")
                self._close()
            elif temporary:
                self.reply(454, "4.7.0", "Temporary authentication failure")
            else:
                self.reply(535, "5.7.8", "Authentication credentials invalid")

        if delay <= 0:
            answer()
            return None
        # The session stays busy (input held) until the answer goes out.
        return task.deferLater(self._clock, delay, answer)
