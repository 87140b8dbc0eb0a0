"""Which Graph mailbox a restricted login may make its message go out as, judged by From.

An identity's C{allowed_senders} is checked against the envelope sender at
C{MAIL}.  With the Graph provider that is not the whole story: a login
without a bound C{mailbox} has its message sent as the C{GRAPH_SENDER}
mailbox its From header names (L{matching_mailbox}), so a login allowed
only C{scanner@contoso.example} could write C{From: ceo@contoso.example}
and have Graph send as the CEO's mailbox.  L{FromRule} closes that: the
mailbox From would choose must be one the login's C{allowed_senders}
allow, or the message is refused at the end of DATA with C{550 5.7.1}.

A From naming no configured mailbox is left to the provider's usual
handling (sent from a mailbox of its choosing with From rewritten,
docs/graph.md), as is every login with a bound C{mailbox} (From cannot
choose for it).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from smtpproxy.addresses import Mailbox
from smtpproxy.errors import PermanentDeliveryError
from smtpproxy.policy.identity import IdentityPolicy
from smtpproxy.policy.rules import AddressPatterns
from smtpproxy.providers.graph.payload import matching_mailbox

#: How much of a stored body is read for its header block (the parser reads no more).
HEAD_BYTES = 256 * 1024 + 4


@dataclass(frozen=True, slots=True)
class FromRule:
    """The Graph mailboxes (C{senders}) and the login's C{allowed} sender patterns."""

    senders: tuple[str, ...]
    allowed: AddressPatterns

    def refusal(self, from_: Sequence[Mailbox]) -> PermanentDeliveryError | None:
        """The refusal for a message whose From header holds C{from_}, or None to let it pass."""
        chosen = matching_mailbox(from_, self.senders)
        if chosen is None or self.allowed.allows(chosen):
            return None
        return PermanentDeliveryError(
            f"From names the mailbox {chosen}, which this login may not send as",
            "5.7.1",
            550,
        )


def from_rule(policy: IdentityPolicy, senders: Sequence[str] | None) -> FromRule | None:
    """The rule for a login with C{policy}, or None when From cannot widen what it may do.

    None when the provider has no mailboxes to choose from (C{senders} None:
    not Graph), the login is bound to a mailbox, or it has no
    C{allowed_senders} of its own.
    """
    if senders is None or policy.mailbox or policy.allowed_senders.empty:
        return None
    return FromRule(tuple(senders), policy.allowed_senders)


def head_of(chunks: Iterable[bytes]) -> bytes:
    """The start of a stored message up to its header block's end, at most L{HEAD_BYTES}.

    Enough for the From header as the parser reads it (it reads no header
    block past 256 KiB), without holding the rest of a large body.  Linear:
    each chunk is searched once (with two bytes of overlap for a blank line
    split between chunks).
    """
    head = bytearray()
    for chunk in chunks:
        searched = max(0, len(head) - 2)
        head += chunk[: HEAD_BYTES - len(head)]
        ends = [i for i in (head.find(b"\n\r\n", searched), head.find(b"\n\n", searched)) if i >= 0]
        if ends:
            end = min(ends)
            return bytes(head[: end + (3 if head[end + 1] == 13 else 2)])
        if len(head) >= HEAD_BYTES:
            break
    return bytes(head)
