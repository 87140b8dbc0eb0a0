"""A C{BytesGenerator} that writes a leaf part's body in one piece: the same bytes, fewer calls.

C{Message.as_bytes} hands the message to C{email.generator.BytesGenerator},
which writes a text body line by line: the body is split at every line end
and each line and each line end is a C{write} call of its own, about 190
calls for a 10 KB body, the largest single cost of serialising a message
the API built (a seventh of the request's CPU).  All that loop does to an
ASCII body is turn every CRLF, CR and LF into the policy's line end.

L{OnePieceGenerator} overrides the generator's public C{flatten} for a
part that is not a container (not C{multipart/*}, not C{message/*}) and
whose body is ASCII text: the headers are written as the generator writes
them (each C{(name, value)} of C{Message.raw_items}, the generator's own
interface to a message's headers, folded by the policy's C{fold_binary};
no header line is put together here), then the blank line, then the body
with its line ends replaced by the policy's in three C{str.replace} calls
(CRLF first, then CR, so a CR before a CRLF is a line of its own, as the
generator's C{\\r\\n|\\r|\\n} split makes it).  For a multipart message
C{flatten} is the generator's own: it writes each part through C{clone},
which makes another L{OnePieceGenerator}, so the parts take the short path
and the boundaries, the preamble and the epilogue are the package's.

Everything else goes the generator's way, unchanged: a body with
non-ASCII or surrogate-escaped bytes (8bit text; C{get_payload} would
give a decoded copy, not the bytes the generator writes), a part whose
charset is not UTF-8 or ASCII, C{mangle_from_}, C{unixfrom}, a
C{maxheaderlen}, a line separator other than the policy's, a payload that
is not text.  A property test (C{tests/web/api/test_flatten.py}) holds the
output equal to C{Message.as_bytes} byte for byte over generated messages.
"""

from __future__ import annotations

from email.generator import BytesGenerator
from email.message import Message
from email.policy import Policy
from io import BytesIO
from typing import IO

__all__ = ["KEPT", "OnePieceGenerator", "as_bytes"]

#: Charsets whose undecodable bytes read back as U+FFFD (never as ASCII), so
#: that an ASCII C{get_payload()} is the body exactly as stored (for a body
#: holding escaped 8-bit bytes it returns a decoded copy instead).
_PLAIN_CHARSETS = frozenset({"utf-8", "us-ascii"})
#: The most C{Content-Type} values L{_LEAF_TYPES} keeps.
KEPT = 256
#: C{Content-Type} value (as the message reads it back) -> may a part of this
#: type be written the short way (neither a container nor of another
#: charset)?  The message's C{get_content_maintype} and C{get_param} are
#: pure functions of that value, and parsing its parameters again for every
#: part cost more than writing the body; bounded, so values a client chooses
#: cannot grow it.
_LEAF_TYPES: dict[str, bool] = {}


class OnePieceGenerator(BytesGenerator):
    """C{BytesGenerator}, writing an ASCII leaf part's body with one C{write}."""

    def __init__(
        self,
        outfp: IO[bytes],
        mangle_from_: bool | None = None,
        maxheaderlen: int | None = None,
        *,
        policy: Policy | None = None,
    ) -> None:
        super().__init__(outfp, mangle_from_, maxheaderlen, policy=policy)
        # Kept under names of our own: the base class keeps them private.
        self.out = outfp
        self.mangles = (
            mangle_from_ if mangle_from_ is not None else (policy is None or policy.mangle_from_)
        )

    def flatten(self, msg: Message, unixfrom: bool = False, linesep: str | None = None) -> None:
        if (
            unixfrom
            or self.mangles
            or self.maxheaderlen is not None
            or not self._leaf(msg, linesep)
        ):
            super().flatten(msg, unixfrom, linesep)

    def _leaf(self, msg: Message, linesep: str | None) -> bool:
        """Write C{msg} the short way if it is an ASCII leaf; False (nothing written) if not."""
        policy = msg.policy if self.policy is None else self.policy
        if linesep is not None and linesep != policy.linesep:
            return False
        if msg.is_multipart():
            return False
        # The generator writes with its policy, and the message reads its
        # headers with it meanwhile; both are set back afterwards.
        own = msg.policy
        msg.policy = policy
        try:
            kind = msg.get("content-type")
            if kind is None:
                leaf = _leaf_type(msg)
            else:
                key = str(kind)
                known = _LEAF_TYPES.get(key)
                if known is None:
                    known = _leaf_type(msg)
                    if len(_LEAF_TYPES) < KEPT:
                        _LEAF_TYPES[key] = known
                leaf = known
            if not leaf:
                return False
            body = msg.get_payload()
            if body is not None and (type(body) is not str or not body.isascii()):
                return False
            fold = policy.fold_binary
            head = b"".join([fold(name, value) for name, value in msg.raw_items()])
        finally:
            msg.policy = own
        newline = policy.linesep
        if body:
            if "\r" in body:
                body = body.replace("\r\n", "\n").replace("\r", "\n")
            if newline != "\n":
                body = body.replace("\n", newline)
            self.out.write(b"".join((head, newline.encode("ascii"), body.encode("ascii"))))
        else:
            self.out.write(head + newline.encode("ascii"))
        return True


def _leaf_type(msg: Message) -> bool:
    """Is C{msg}'s content type one the short way writes: no container, a plain charset?"""
    if msg.get_content_maintype() in ("multipart", "message"):
        return False
    charset = msg.get_param("charset")
    return charset is None or (type(charset) is str and charset.lower() in _PLAIN_CHARSETS)


def as_bytes(msg: Message, policy: Policy) -> bytes:
    """What C{msg.as_bytes(policy=policy)} returns, written by L{OnePieceGenerator}."""
    out = BytesIO()
    OnePieceGenerator(out, mangle_from_=False, policy=policy).flatten(msg)
    return out.getvalue()
