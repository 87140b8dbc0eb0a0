"""The C{Content-Disposition} of a part the mailbox offers as a download.

The name comes from the message, so from its sender: it may hold control
characters (an RFC 2231 C{filename*} decodes to anything, NUL included),
quotes, or letters from any script.  RFC 9110 section 5.5 forbids controls
in a field value (Chromium refuses such a reply outright), and a plain
C{filename=} can only carry ASCII.  So the header follows RFC 6266 section
4.3: an ASCII fallback in C{filename=} for old clients, and the real name,
UTF-8 and percent-encoded per RFC 8187, in C{filename*=}, which every
current browser prefers.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

#: Characters of the name kept (after dropping invisible ones); the header stays short.
MAX_NAME = 200

#: RFC 8187 attr-char besides letters and digits: left as they are in C{filename*}.
_ATTR_MARKS = "!#$&+-.^_`|~"

#: Replaced in the fallback: the quoted-string's own delimiters, C{%} (some
#: clients percent-decode C{filename=}) and C{;} (cut there by naive parsers).
_FALLBACK_UNSAFE = frozenset('"\\%;')


def visible_name(name: str) -> str:
    """The name without control, format and separator characters, cut to L{MAX_NAME}.

    C{str.isprintable} is false for controls (C0, DEL, C1), for format
    characters such as U+202E (which reverses the text after it, so that
    C{"invoice\\u202efdp.exe"} shows as C{invoice exe.pdf}) and for line
    and paragraph separators; the plain space stays.
    """
    return "".join(c for c in name if c.isprintable())[:MAX_NAME].strip()


def ascii_fallback(name: str) -> str:
    """An ASCII stand-in for L{visible_name}'s result: accents dropped, other letters C{_}.

    NFKD splits C{ä} into C{a} and a combining mark, which is dropped, so
    C{"Rechnung März.pdf"} falls back to C{"Rechnung Marz.pdf"}.
    """
    kept = []
    for c in unicodedata.normalize("NFKD", name):
        if c.isascii():
            kept.append("_" if c in _FALLBACK_UNSAFE or not c.isprintable() else c)
        elif not unicodedata.combining(c):
            kept.append("_")
    return "".join(kept)


def content_disposition(name: str, default: str) -> bytes:
    """C{attachment; filename="fallback"; filename*=UTF-8''encoded}, ASCII and control-free.

    C{default} is used when the name has nothing visible left; C{filename*}
    is left out when the fallback already is the name.
    """
    shown = visible_name(name) or visible_name(default) or "part"
    fallback = ascii_fallback(shown)
    header = f'attachment; filename="{fallback}"'
    if fallback != shown:
        header += "; filename*=UTF-8''" + quote(shown.encode("utf-8"), safe=_ATTR_MARKS)
    return header.encode("ascii")


def media_type(content_type: str) -> str:
    """The part's C{type/subtype} reduced to the characters a media type is made of.

    The parser keeps whatever the sender wrote between the delimiters, control
    characters included; C{application/octet-stream} when nothing is left.
    """
    kept = "".join(c for c in content_type if c.isascii() and (c.isalnum() or c in "/.+-"))
    return kept if "/" in kept.strip("/") else "application/octet-stream"
