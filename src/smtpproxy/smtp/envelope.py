"""The sender and recipient checks of an SMTP session: the guard, then the avatar.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import error as cred_error
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.mail.smtp import SMTPServerError, User
from twisted.python.failure import Failure

from smtpproxy.errors import DeliveryError, Reply, reply_for_failure
from smtpproxy.logsafe import clip
from smtpproxy.smtp.base import ShellBase, log
from smtpproxy.smtp.session import (
    REFUSAL,
    CheckRecipient,
    CheckSender,
    Message,
    ParsedAddress,
    ValidateRecipient,
)


class Envelope(ShellBase):
    """C{CheckSender}, C{CheckRecipient} and C{ValidateRecipient}, carried out."""

    def _check_sender(self, action: CheckSender) -> None:
        """The guard, then the delivery avatar (logged in anonymously if need be)."""
        parsed = action.arguments
        guard = self.factory.guard
        refusal = guard.sender(parsed.sender) or guard.message(self._peer, self.user)
        if refusal is not None:
            self.factory.log_summary.emit(
                LogLevel.info,
                "sender refused",
                self._peer,
                session=self.id,
                user=self.user,
                sender=clip(parsed.sender),
                reply=f"{refusal.code} {refusal.status}",
            )
            self.reply(refusal, counts_as=REFUSAL)
            return
        origin = ParsedAddress(parsed.sender, parsed)

        def accepted(result: object) -> None:
            self._run(self.session.sender_accepted(origin))

        if self.delivery is None:
            # First MAIL of a session without AUTH: log in anonymously (what
            # stock validateFrom does through the portal, minus a second pass).
            def logged_in(result: object) -> object:
                if isinstance(result, Failure):
                    self._refused(result, "sender")
                    return None
                login: tuple[Any, Any, Callable[[], None]] = result  # type: ignore[assignment]
                _, delivery, logout = login
                self._take_avatar(delivery, logout)
                try:
                    checked = delivery.validateFrom(self._helo, origin)
                except Exception:
                    # Raising (SMTPBadSender, say) is how a delivery refuses.
                    self._refused(Failure(), "sender")
                    return None
                if isinstance(checked, defer.Deferred):
                    return checked.addCallbacks(accepted, self._refused, errbackArgs=("sender",))
                accepted(checked)
                return None

            answer = self._log_in_anonymously()
            if isinstance(answer, defer.Deferred):
                self._busy_with(answer.addBoth(logged_in))
                return
            waiting = logged_in(answer)
            if isinstance(waiting, defer.Deferred):
                self._busy_with(waiting)
        else:
            self._validate(self.delivery.validateFrom, (self._helo, origin), accepted, "sender")

    def _validate(
        self,
        check: Callable[..., object],
        args: tuple[object, ...],
        accepted: Callable[[Any], None],
        what: str,
    ) -> None:
        """Run a delivery avatar's check; wait (holding input) only if it returns a Deferred.

        Avatars answer at once nearly always; going through Deferreds for
        those would be a sizeable share of the cost of a message.
        """
        try:
            result = check(*args)
        except Exception:
            self._refused(Failure(), what)
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(accepted, self._refused, errbackArgs=(what,))
            self._busy_with(result)
        else:
            accepted(result)

    def _refused(self, failure: Failure, what: str) -> None:
        """A delivery avatar turned a sender or recipient down (or broke)."""
        error = failure.value
        if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            self.reply(530, "5.7.0", "Authentication required")
        elif isinstance(error, SMTPServerError):
            # The class follows the code: a 450 from an identity's rate
            # limit (smtpproxy.identities.realm) is 4.7.1, not 5.7.1.
            self.reply(Reply(error.code, f"{error.code // 100}.7.1", str(error.resp)))
        elif isinstance(error, DeliveryError):
            # A provider's refusal at MAIL or RCPT (providers.envelope_refusal).
            self.reply(reply_for_failure(error))
        else:
            log.failure(f"{what} validation failed", failure, session=self.id)
            self.reply(451, "4.3.0", "Local error in processing")

    def _check_recipient(self, action: CheckRecipient) -> None:
        parsed = action.arguments
        refusal = self.factory.guard.recipient(parsed.recipient)
        if refusal is not None:
            self.factory.log_summary.emit(
                LogLevel.info,
                "recipient refused",
                self._peer,
                session=self.id,
                recipient=clip(parsed.recipient),
            )
            self.reply(refusal, counts_as=REFUSAL)
            return
        self._run(self.session.recipient_allowed(parsed))

    def _validate_recipient(self, action: ValidateRecipient) -> None:
        user = User(action.address, self._helo, self, self.session.tx.sender)

        def accepted(factory: Callable[[], Message]) -> None:
            self._run(self.session.recipient_accepted(user, factory, action.key))

        self._validate(self.validateTo, (user,), accepted, "recipient")
