"""The two ways an identity check ends without a yes.

A wrong credential is Twisted's C{UnauthorizedLogin} (the client hears
C{535}).  A backend that cannot answer (down, slow, misconfigured, an
answer we cannot read) is L{BackendUnavailable}: the client hears C{454
4.7.0} and tries again later, and the failure never counts as a wrong
password, so an outage cannot get well-behaved clients banned.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin


class IdentityConfigError(ValueError):
    """The C{AUTH_CONFIG} file is unreadable or describes something impossible."""


class BackendUnavailable(Exception):  # noqa: N818 (a state, not a bug: reads as one)
    """An identity backend gave no usable answer; the client should retry.

    @ivar provider: the provider's name from C{AUTH_CONFIG}.
    @ivar reason: a short description for the log, never a credential.
    """

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


class NoSuchUser(UnauthorizedLogin):
    """A refusal that tested no secret: this backend holds no such user.

    To the client it is an ordinary no (C{535}, after the same bcrypt as a
    wrong password).  The router tells it apart only when another backend
    could not answer: a name no answering backend knows may belong to the
    one that is down, and nothing was guessed (L{RefusedWhileUnavailable}).
    """


class RefusedWhileUnavailable(BackendUnavailable):
    """A backend that holds the user refused the secret while another could not answer.

    The client hears C{454 4.7.0} (the backend that is down might have said
    yes), but the failure counts toward the brute-force limits like a
    C{535}: a secret was tested, so an outage of one backend must not
    allow unlimited guessing at another.
    """
