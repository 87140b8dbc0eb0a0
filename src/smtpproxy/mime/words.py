"""Adjacent RFC 2047 encoded words, joined before the standard library reads them.

RFC 2047 6.2: the blanks (and a folding line break) between two adjacent
encoded words are not part of the text, so C{=?UTF-8?Q?caf=C3?=
=?UTF-8?Q?=A9?=} reads "café": one character may even be cut across the
two words, and only the joined octets decode.  CPython's reader of
unstructured text (a Subject) follows the rule, but its reader of
structured fields (3.11) does not: a display name of several words reads
with a space between each two, and a character cut across words reads as
two lone surrogates ("caf\\udcc3 \\udca9").  The relay still lets the
standard library parse address fields (quotes, comments, groups and
routes are its business); L{join_adjacent_words} only rewrites each run
of two or more adjacent encoded words as one UTF-8 word carrying the
run's text, which every reader decodes the same way.

What is an encoded word is decided as RFC 2047 says: a whole blank-delimited
token of the form C{=?charset?encoding?text?=} (or such a token glued to the
C{<address>} after a display name).  Text that merely looks
like one in the middle of a word (C{x=?utf-8?q?a?=}), or words separated
by anything but blanks, are not joined, so their spacing is kept.  A run
whose octets do not decode in their charset (an unknown charset, damaged
base64, bytes that are not text) is left exactly as it was: the standard
library then reads it as it always has.

One pass over the value, and each word is decoded once by the standard
library's own primitives (C{email.header.decode_header} on that word
alone, then its codec): linear in the value's length, however many words
an attacker writes.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.errors
import re
from email.header import decode_header

__all__ = ["join_adjacent_words"]

# A whole encoded word (RFC 2047 2), printable ASCII only: a charset
# (optionally with RFC 2231's "*language"), Q or B, and text without
# blanks or "?".  Each part's class excludes the "?" that ends it, so the
# match is one linear scan.
_WORD = re.compile(r"=\?([!-)+->@-~]+)(?:\*[!->@-~]*)?\?([QqBb])\?([!->@-~]*)\?=")
# Blank runs (a folding line break included) and the tokens between them.
_TOKENS = re.compile(r"[ \t\r\n]+|[^ \t\r\n]+")


def join_adjacent_words(value: str) -> str:
    """C{value} with every run of adjacent encoded words rewritten as one word.

    Everything else is kept exactly, blanks included; a run that cannot be
    decoded is kept too.  Values without two encoded words come back as they are.
    """
    if value.count("?=") < 2:
        return value
    out: list[str] = []
    # The current run: its tokens as written (blanks between them included)
    # and each word's (charset, octets); the blanks after its last word wait
    # in C{pending} until the next token says whether the run goes on.
    run: list[str] = []
    octets: list[tuple[str, bytes]] = []
    pending = ""
    for token in _TOKENS.findall(value):
        if token[0] in " \t\r\n":
            if run:
                pending = token
            else:
                out.append(token)
            continue
        word = _word(token)
        tail = ""
        if word is None and "<" in token:
            # A display name's last word glued to its address, as many
            # mailers write it: the word still ends the run.
            head, angle, rest = token.partition("<")
            word = _word(head)
            token, tail = (head, angle + rest) if word is not None else (token, "")
        if word is None:
            out.append(_joined(run, octets))
            out.append(pending + token)
            run, octets, pending = [], [], ""
            continue
        if run:
            run.append(pending)
        run.append(token)
        octets.append(word)
        pending = ""
        if tail:
            out.append(_joined(run, octets))
            out.append(tail)
            run, octets = [], []
    out.append(_joined(run, octets))
    out.append(pending)
    return "".join(out)


def _word(token: str) -> tuple[str, bytes] | None:
    """The charset (codec name) and octets of an encoded word, or None if C{token} is not one."""
    match = _WORD.fullmatch(token)
    if match is None:
        return None
    try:
        [(data, charset)] = decode_header(token)
        name = codecs.lookup(match[1]).name
    except (email.errors.HeaderParseError, binascii.Error, LookupError, ValueError):
        return None
    # A lone encoded word always comes back as (bytes, its charset).
    if not isinstance(data, bytes) or charset is None:
        return None
    return name, data


def _joined(run: list[str], octets: list[tuple[str, bytes]]) -> str:
    """The run as one UTF-8 encoded word, or as written (one word, or undecodable)."""
    if len(octets) < 2:
        return "".join(run)
    text: list[str] = []
    start = 0
    # Octets of neighbouring words in the same charset are decoded together,
    # so a character (or a stateful ISO-2022 sequence) cut across them joins.
    for index in range(1, len(octets) + 1):
        if index == len(octets) or octets[index][0] != octets[start][0]:
            charset = octets[start][0]
            data = b"".join(piece for _, piece in octets[start:index])
            try:
                text.append(data.decode(charset))
            except (UnicodeError, LookupError):  # LookupError: a codec of bytes (zlib)
                return "".join(run)
            start = index
    try:
        utf8 = "".join(text).encode("utf-8")
    except UnicodeError:  # a lone surrogate, from a codec such as unicode_escape
        return "".join(run)
    return "=?utf-8?b?" + base64.b64encode(utf8).decode("ascii") + "?="
