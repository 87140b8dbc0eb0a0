"""How the API writes a header value: RFC 2047 words where it must, folding only at blanks.

The header registry's own writer, which the policy used to hand every
value longer than a line, made three kinds of mistake with the values the
API builds (review 5):

- it re-parsed an address list and, splitting a quoted display name across
  lines, dropped the quotes: a name holding C{<evil@...>, } became a second
  mailbox (address injection);
- it rewrote a long ASCII value (a message id in C{In-Reply-To}, an
  unsubscribe URL) as encoded words, which mean nothing in those fields;
- it cut non-ASCII text into encoded words by re-encoding a shrinking word
  once per character, in time quadratic in the text's length.

So the API writes values itself, with the package's public encoders:

- L{fold} breaks a line only in front of a blank that is already in the
  value, so unfolding (removing the CRLFs) gives back exactly the value as
  set: a quoted string stays one quoted string, a URL one URL.  A run of
  characters longer than a line stays whole on a line of its own.
- L{encoded_words} writes text that cannot travel as it is (non-ASCII, or
  text a reader would take for an encoded word because it holds C{=?}) as
  UTF-8 encoded words of at most 45 octets each (72 columns, within RFC
  2047's 75), cut at character boundaries in one pass; C{Charset} chooses
  Q or base64 for each.
- L{mailbox} writes one address with its display name: quoted by
  C{formataddr} when it is ASCII (safe now that folding keeps quoted
  strings whole), as encoded words when it needs them.

A display name of more than one encoded word reads back exactly in
readers that follow RFC 2047 6.2 (blanks between adjacent encoded words
are not part of the text), the relay's own parser among them
(L{smtpproxy.mime.words}); CPython's header registry (3.11) instead keeps
a space between such words in a display name.  Nearly every name fits one
word (45 octets), which every reader reads back exactly.
"""

from __future__ import annotations

import re
from email.charset import Charset
from email.utils import formataddr

__all__ = [
    "MAX_LINE",
    "encoded_words",
    "fits",
    "fold",
    "mailbox",
    "needs_words",
    "unstructured",
]

#: RFC 5322 2.1.1: the longest line a message may carry, CRLF excluded.
MAX_LINE = 998
#: The line length folding aims for (RFC 5322's "SHOULD").
WIDTH = 78
#: UTF-8 octets per encoded word: base64 makes 60 characters of 45, and
#: C{=?utf-8?b?...?=} 72 (Q is chosen only when shorter still).
_WORD_OCTETS = 45
_UTF8 = Charset("utf-8")
#: A blank run and the word after it; the value's trailing blanks are cut off first.
_PIECE = re.compile(r"[ \t]*[^ \t]+")


def needs_words(text: str) -> bool:
    """Whether C{text} must be written as encoded words to read back as it is."""
    return not text.isascii() or "=?" in text


def encoded_words(text: str) -> str:
    """C{text} as UTF-8 encoded words of at most 45 octets, separated by blanks.

    Cut in one pass over the UTF-8 octets: after the last blank of each
    45-octet window when its second half has one, else at the last
    character boundary (at most three octets back).  Blanks between
    adjacent encoded words are not part of the text (RFC 2047 6.2), so the
    words decode to C{text} exactly, its own blanks included.  (CPython's
    reader of display names keeps a space between words instead; a cut
    after a blank then reads as two blanks rather than a word cut in two.)
    """
    data = text.encode("utf-8")
    words = []
    start = 0
    while start < len(data):
        end = start + _WORD_OCTETS
        if end < len(data):
            blank = data.rfind(b" ", start + _WORD_OCTETS // 2, end)
            if blank >= 0:
                end = blank + 1
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation octet
            end -= 1
        words.append(_UTF8.header_encode(data[start:end].decode("utf-8")))
        start = end
    return " ".join(words)


def mailbox(name: str, address: str) -> str:
    """One mailbox of an address header: C{address} with C{name} as it can travel."""
    if name and needs_words(name):
        return f"{encoded_words(name)} <{address}>"
    return formataddr((name, address))


def fold(name: str, value: str, width: int = WIDTH, linesep: str = "\r\n") -> str | None:
    """C{name: value} as header lines, broken only in front of the value's own blanks.

    Lines are filled up to C{width} columns; a piece (a blank run and the
    word after it) that does not fit goes on a line of its own, however
    long.  The first word stays on the first line unless that line would
    pass L{MAX_LINE}; then it goes on the next (after a blank).  Nothing
    else changes: removing the line ends gives back C{name: value}.

    @return: the lines, each ended by C{linesep}; None when a word is too
        long for any line (longer than L{MAX_LINE} with the blank in front).
    """
    body = value.rstrip(" \t")
    pieces = _PIECE.findall(body) or [""]
    pieces[-1] += value[len(body) :]  # trailing blanks never start a line
    lines = []
    line = f"{name}: {pieces[0]}"
    if len(line) > MAX_LINE:
        lines.append(name + ":")
        line = " " + pieces[0]
        if len(line) > MAX_LINE:
            return None
    for piece in pieces[1:]:
        if len(line) + len(piece) <= width:
            line += piece
        else:
            lines.append(line)
            line = piece
        if len(line) > MAX_LINE:
            return None
    if len(line) > MAX_LINE:
        return None
    lines.append(line)
    return linesep.join(lines) + linesep


def fits(name: str, value: str) -> bool:
    """Whether L{fold} can write C{value} under C{name} unencoded (cheap for short values)."""
    return len(name) + 2 + len(value) <= MAX_LINE or fold(name, value) is not None


def unstructured(name: str, value: str) -> str:
    """A text value (a subject, an C{X-} header) as it is set: encoded words when it needs them.

    Text is encoded when it is not ASCII, when it holds C{=?} (a reader
    would decode it), or when a word of it is too long for any line: then
    encoded words, each short, are the only way it fits RFC 5322 at all.
    """
    if needs_words(value) or not fits(name, value):
        return encoded_words(value)
    return value
