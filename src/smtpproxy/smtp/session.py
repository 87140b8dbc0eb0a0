"""The SMTP dialogue's state, without I/O.

L{Transaction} is everything one mail transaction (MAIL to the end of DATA
or BDAT LAST, or to RSET) has gathered: the sender, the recipients, what
MAIL declared, and, once the body is being read, the messages it goes to
and the body itself.  The protocol shell (L{smtpproxy.smtp.protocol}) holds
exactly one; starting over is making a new one, so nothing of an old
transaction can leak into the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
