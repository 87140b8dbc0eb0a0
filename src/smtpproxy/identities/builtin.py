"""C{SMTP_USERNAME} / C{SMTP_PASSWORD} as one more backend beside the file's.

The same constant-time comparison as the relay's own checker
(L{smtpproxy.smtp.sasl.StaticPasswordChecker}), answering with a
L{Verified} so the router can try it with the file's fallbacks.
"""

from __future__ import annotations

import hmac

from twisted.cred import credentials, error
from twisted.internet import defer
from twisted.python.failure import Failure

from smtpproxy.identities.errors import NoSuchUser
from smtpproxy.identities.model import Verified
from smtpproxy.smtp.sasl import StaticPasswordChecker


class BuiltinBackend:
    """The single configured user."""

    name = "SMTP_USERNAME"

    def __init__(self, username: str, password: str) -> None:
        self._checker = StaticPasswordChecker(username, password)
        self._username = username.encode("utf-8")

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        name = user.encode("utf-8")
        creds = credentials.UsernamePassword(name, secret.encode("utf-8"))
        checking = self._checker.requestAvatarId(creds)
        if not hmac.compare_digest(name, self._username):
            # Another name: nothing tested (the router must not count it
            # against a fallback's user while that fallback is down).
            checking.addErrback(_not_this_user)

        def verified(avatar_id: object) -> Verified:
            if not isinstance(avatar_id, bytes):
                raise error.UnauthorizedLogin("no user")
            return Verified(avatar_id.decode("utf-8"))

        return checking.addCallback(verified)


def _not_this_user(failure: Failure) -> bytes:
    raise NoSuchUser("not SMTP_USERNAME")
