"""Values from clients made safe to log: short, bounded, and free of secrets.

A log line is written for things a client chooses (its envelope, its
headers, the user name it tries), so a client also chooses how long the line
is, unless every such value is cut to a known size first.  The limits below
make a message's log lines add up to a few kilobytes whatever it contains:

 - L{MAX_TEXT}: a value the client wrote (a parser warning, a Message-ID, a
   sender, one recipient) takes at most this many bytes of JSON, escapes
   included, so a string of control characters cannot grow six-fold on the
   way out;
 - L{MAX_REASON}: the same for a provider's error text, which is longer
   when it is useful (Graph's explanations) but still not the client's to
   stretch;
 - L{MAX_RECIPIENTS}: a per-message line lists this many recipients and
   gives the total beside them;
 - L{MAX_WARNING_LINES}: a message logs this many parser warnings, then one
   line with the count of the rest.

User names are a different problem: a user who types the password into the
user name prompt sends it as the user name, so a failed login must not log
the name as typed.  L{LoginNames} logs a configured user's name, and anything
else as a short keyed hash that is the same within one process (repeated
attempts can be told apart and counted) and useless outside it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_REASON",
    "MAX_RECIPIENTS",
    "MAX_TEXT",
    "MAX_WARNING_LINES",
    "LoginNames",
    "clip",
    "clip_list",
]

MAX_TEXT = 200
MAX_REASON = 500
MAX_RECIPIENTS = 20
MAX_WARNING_LINES = 10

#: Appended to a clipped value; the count says how much was left out.
_CUT = "...[{} more characters]"
#: Length of the hash logged for a user name that is not a configured user.
HASH_CHARS = 12


def _json_size(char: str) -> int:
    """Bytes C{char} takes inside a JSON string written with C{ensure_ascii}."""
    code = ord(char)
    if char in '"\\\b\f\n\r\t':
        return 2
    if code < 0x20 or 0x7F <= code <= 0xFFFF:  # DEL is escaped too
        return 6
    if code > 0xFFFF:
        return 12  # a surrogate pair of \\uXXXX escapes
    return 1


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """C{text}, cut so that its JSON form (without quotes) is at most C{limit} bytes.

    A cut value ends with a note of how many characters were left out, so a
    reader knows the log shows a prefix.  At most C{limit} characters are
    looked at: the cost does not grow with the input.
    """
    # The common case, found by C loops (the length test first keeps them short):
    # one byte per character.  Two substring tests rather than a set of the
    # characters: no allocation, and most values are short.
    if (
        len(text) <= limit
        and text.isascii()
        and text.isprintable()
        and '"' not in text
        and "\\" not in text
    ):
        return text
    head = text[: limit + 1]
    if len(head) <= limit and sum(_json_size(char) for char in head) <= limit:
        return text
    # The longest note (nothing kept) bounds the room the note needs.
    budget = limit - len(_CUT.format(len(text)))
    used = end = 0
    for char in head:
        used += _json_size(char)
        if used > budget:
            break
        end += 1
    return text[:end] + _CUT.format(len(text) - end)


def clip_list(items: Sequence[str], count: int = MAX_RECIPIENTS) -> list[str]:
    """The first C{count} items, each clipped: a list a log line can carry."""
    return [clip(item) for item in items[:count]]


@functools.cache
def _process_key() -> bytes:
    """The key of this process's user-name hashes, made on first use, never logged."""
    return secrets.token_bytes(32)


class LoginNames:
    """Decides how a failed login's user name appears in the log.

    @param known: the configured user names; only these are logged as typed.
    @param key: the hash key; by default one random key per process, so
        hashes can be compared within one process's log but not across
        restarts or matched against a list of guesses.
    """

    def __init__(self, known: Iterable[str], key: bytes | None = None) -> None:
        self._key = _process_key() if key is None else key
        # Digests of the known names, so checking a name compares two values
        # of one fixed length whatever was typed (no timing clue to the
        # configured name's length or prefix).
        self._known = tuple(self._digest(name) for name in known)

    def _digest(self, name: str) -> bytes:
        data = name.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def fields(self, attempted: str) -> dict[str, str]:
        """The log field for C{attempted}: C{username} if configured, else C{username_hash}."""
        digest = self._digest(attempted)
        known = False
        for candidate in self._known:
            # Every candidate is compared: no early exit.
            known |= hmac.compare_digest(digest, candidate)
        if known:
            return {"username": attempted}
        return {"username_hash": digest.hex()[:HASH_CHARS]}
