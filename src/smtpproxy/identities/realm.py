"""The avatar an identity gets: the relay's delivery, held to the identity's policy.

L{IdentityRealm} wraps the relay's realm.  An avatar ID that is an
L{Identity} with a policy gets a L{PolicedDelivery}: the relay's own
delivery for that user, whose C{validateFrom} and C{validateTo} first
apply the identity's C{allowed_senders}, C{allowed_recipients} and
C{rate_limit_per_min}.  Refusing in the avatar is Twisted's own way (a
delivery raises C{SMTPBadSender} or C{SMTPBadRcpt}), and the global checks
of the guard have already run before it is asked.  Every other avatar ID
(anonymous, the C{SMTP_USERNAME} user) goes to the wrapped realm as before.

An identity with C{allowed_senders} and no C{mailbox} gets a
L{smtpproxy.policy.fromsender.FromRule} on the relay's delivery: with
Graph, its From header must not choose a mailbox those senders do not
allow.  An identity whose policy names a C{mailbox} has it set on the relay's
delivery (L{smtpproxy.delivery.RelayDelivery.mailbox}), which puts it on
every message of the session, direct or queued; the Graph provider sends
as that mailbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from twisted.cred.portal import IRealm
from twisted.internet.interfaces import IReactorTime
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.smtp import Address, SMTPBadRcpt, SMTPBadSender, SMTPServerError, User
from zope.interface import Interface, implementer

from smtpproxy.delivery import RelayDelivery
from smtpproxy.identities.model import Identity
from smtpproxy.policy.fromsender import from_rule
from smtpproxy.policy.identity import UNRESTRICTED, IdentityPolicy, IdentityRates


@implementer(IMessageDelivery)
class PolicedDelivery:
    """An identity's delivery: its own rules first, then the relay's delivery."""

    def __init__(self, inner: IMessageDelivery, identity: Identity, rates: IdentityRates) -> None:
        self._inner = inner
        self.identity = identity
        self.user = identity.name
        self.mailbox = identity.policy.mailbox
        self._policy: IdentityPolicy = identity.policy
        self._rates = rates

    def receivedHeader(self, helo: object, origin: Address, recipients: list[User]) -> object:
        return self._inner.receivedHeader(helo, origin, recipients)

    def validateFrom(self, helo: object, origin: Address) -> object:
        sender = bytes(origin).decode("utf-8", "replace")
        if not self._policy.allowed_senders.allows(sender):
            raise SMTPBadSender(origin, 550, "Sender address not allowed for this login")
        if not self._rates.allow(self.user, self._policy):
            raise SMTPServerError(450, "Too many messages from this login, slow down")
        return self._inner.validateFrom(helo, origin)

    def validateTo(self, user: User) -> object:
        recipient = bytes(user.dest).decode("utf-8", "replace")
        if not self._policy.allowed_recipients.allows(recipient):
            raise SMTPBadRcpt(user, 550, "Recipient address not allowed for this login")
        return self._inner.validateTo(user)


class _Realm(Protocol):
    """The relay's realm (L{smtpproxy.delivery.RelayRealm}): answers at once."""

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: object
    ) -> tuple[type[Interface], IMessageDelivery, Callable[[], None]]: ...


@implementer(IRealm)
class IdentityRealm:
    """Wraps the relay's realm; identities with a policy get a L{PolicedDelivery}."""

    def __init__(
        self, inner: _Realm, clock: IReactorTime, senders: Sequence[str] | None = None
    ) -> None:
        """@param senders: the provider's sending mailboxes (Graph's C{GRAPH_SENDER}), if any."""
        self._inner = inner
        self.rates = IdentityRates(clock)
        self._senders = None if senders is None else tuple(senders)

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: object
    ) -> tuple[type[Interface], IMessageDelivery, Callable[[], None]]:
        if not isinstance(avatarId, Identity):
            return self._inner.requestAvatar(avatarId, mind, *interfaces)
        interface, delivery, logout = self._inner.requestAvatar(
            avatarId.name.encode("utf-8"), mind, *interfaces
        )
        if isinstance(delivery, RelayDelivery):
            if avatarId.policy.mailbox:
                delivery.mailbox = avatarId.policy.mailbox
            delivery.from_rule = from_rule(avatarId.policy, self._senders)
        if avatarId.policy == UNRESTRICTED:
            return interface, delivery, logout
        return interface, PolicedDelivery(delivery, avatarId, self.rates), logout
