"""The two ways an identity check ends without a yes.

A wrong credential is Twisted's C{UnauthorizedLogin} (the client hears
C{535}).  A backend that cannot answer (down, slow, misconfigured, an
answer we cannot read) is L{BackendUnavailable}: the client hears C{454
4.7.0} and tries again later, and the failure never counts as a wrong
password, so an outage cannot get well-behaved clients banned.
"""

from __future__ import annotations


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
