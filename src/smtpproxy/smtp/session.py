"""The SMTP dialogue's state, without I/O.

L{Transaction} is everything one mail transaction (MAIL to the end of DATA
or BDAT LAST, or to RSET) has gathered: the sender, the recipients, what
MAIL declared, and, once the body is being read, the messages it goes to
and the body itself.  The protocol shell (L{smtpproxy.smtp.protocol}) holds
exactly one; starting over is making a new one, so nothing of an old
transaction can leak into the next.

L{ReplyBudget} counts the replies that count against the client (its
mistakes, and policy refusals) in one place; the shell's one reply method
consults it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from twisted.mail.smtp import Address, User

from smtpproxy.errors import Reply
from smtpproxy.smtp.chunking import ChunkReader
from smtpproxy.smtp.commands import MailArguments, RcptArguments
from smtpproxy.smtp.dotreader import DataReader
from smtpproxy.spool import MessageBody


class ParsedAddress(Address):
    """An address we already validated with L{smtpproxy.smtp.commands}.

    Twisted's C{Address} tokenizer rejects valid addresses (address literals,
    escaped quotes), so we bypass it and fill in the same attributes.

    @ivar parameters: the whole parsed MAIL or RCPT command, so that the
        delivery avatar (which Twisted hands only the address) sees its
        parameters too (DSN's RET, ENVID, NOTIFY, ORCPT).
    """

    def __init__(
        self, address: str, parameters: MailArguments | RcptArguments | None = None
    ) -> None:
        self.parameters = parameters
        # UTF-8: an SMTPUTF8 transaction's addresses (RFC 6531) are not ASCII.
        local, _, domain = address.rpartition("@")
        self.addrstr = address.encode("utf-8")
        self.local = local.encode("utf-8")
        self.domain = domain.encode("utf-8")


def address_key(address: str) -> str:
    """What makes two recipients the same mailbox: the domain is case-blind, the local part not."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


@dataclass(slots=True, eq=False)
class Transaction:
    """One mail transaction, from MAIL on; a new one replaces it when it ends.

    @ivar sender: the MAIL address with its parameters (DSN's RET and ENVID
        travel in C{sender.parameters}); None before MAIL.
    @ivar recipients: each accepted RCPT's C{User} and the message factory
        the delivery avatar gave for it, in order.
    @ivar keys: L{address_key} of each recipient, so that a duplicate is
        found without rescanning the list.
    @ivar smtputf8: MAIL declared SMTPUTF8 (RFC 6531): UTF-8 addresses pass.
    @ivar binary: MAIL declared BODY=BINARYMIME (RFC 3030): only BDAT may follow.
    @ivar messages: the avatar's messages the body goes to, once DATA or the
        first BDAT opened them.
    @ivar body: where the body is written, once opened.
    @ivar reader: the DATA reader while the body arrives by DATA.
    @ivar chunks: the reader of the transaction's BDAT chunks so far.
    @ivar chunk_failed: a BDAT chunk was refused; every further chunk gets
        this reply until LAST or RSET (RFC 3030 2).
    """

    sender: ParsedAddress | None = None
    recipients: list[tuple[User, Callable[[], Any]]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    smtputf8: bool = False
    binary: bool = False
    messages: list[Any] = field(default_factory=list)
    body: MessageBody | None = None
    reader: DataReader | None = None
    chunks: ChunkReader | None = None
    chunk_failed: Reply | None = None

    @property
    def bdat_started(self) -> bool:
        """BDAT was used in this transaction (RFC 3030 2: DATA and RCPT may no longer follow)."""
        return self.chunks is not None or self.chunk_failed is not None


# What a reply counts against: a client's mistake, or a policy refusal.
Budget = Literal["error", "refusal"]
ERROR: Final = "error"
REFUSAL: Final = "refusal"


@dataclass(slots=True)
class ReplyBudget:
    """How many mistakes and refusals a session may still make before it is closed.

    Each kind has its own budget: a client sending to many recipients that
    the allow-list refuses makes no mistake and must not be cut off after
    C{max_errors}; one that goes on being refused without delivering
    anything is, after C{max_refusals}.  A delivered message renews the
    refusal budget (Postfix's smtpd_hard_error_limit idea).
    """

    max_errors: int
    max_refusals: int
    errors: int = 0
    refusals: int = 0

    def charge(self, kind: Budget) -> Reply | None:
        """Count one reply of C{kind}; once the budget is spent, the 421 to send instead."""
        if kind == REFUSAL:
            self.refusals += 1
            if self.refusals >= self.max_refusals:
                return Reply(421, "4.7.0", "Too many refused commands, closing connection")
            return None
        self.errors += 1
        if self.errors >= self.max_errors:
            return Reply(421, "4.7.0", "Too many errors, closing connection")
        return None

    def delivered(self) -> None:
        """A message went through: the client is not just probing the policy."""
        self.refusals = 0
