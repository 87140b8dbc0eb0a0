"""A message's HTML rewritten so that showing it asks nothing of the network.

The body's Content-Security-Policy (L{smtpproxy.web.mailbox.view.body_policy})
governs fetches, but not everything that reaches the sender's host:
Chromium acts on resource hints (C{<link rel=preconnect>},
C{dns-prefetch}, C{prefetch}, C{preload}, C{prerender}, C{modulepreload})
outside it, and a connection to the sender's server as the message is shown
is a read receipt.  So the document is rebuilt from what the standard
library's C{html.parser} reads, without:

 - every C{<link>} element.  A mail body has no use for one here (style
   sheets are blocked by the policy anyway), and dropping the element
   whatever its C{rel} leaves no spelling of a hint to get past a list;
 - C{<meta http-equiv>}, through which a document can set headers of its
   own (the refresh it could ask for is already blocked by the sandbox);
 - C{srcdoc} attributes: a frame's whole document in an attribute value,
   which the rewrite would otherwise pass on as text;
 - scripts (they never run here: no C{script-src}, a sandbox without
   C{allow-scripts}; that includes C{speculationrules}), comments,
   processing instructions and CDATA sections.

Rebuilt, not cut out of the original: tag and attribute names are written
back only when they hold nothing but name characters, attribute values are
quoted and escaped, text is escaped.  So the browser reads exactly the
elements this parser read: where C{html.parser} and the browser would have
split the original differently (a comment or a C{</script foo>} that ends
earlier for one of them), the difference is gone from the served document
instead of hiding a C{<link>} from the rewrite.

C{html.parser} itself is not linear on hostile input (Python 3.11's
rescans an unclosed tag, comment or quoted value from every later C{<}:
20,000 C{"<a "} take half a minute), so L{_prepared} goes first, once over
the text: comments and bogus comments are cut out, and every C{<} that does
not begin a tag closed before the next C{<} (quotes respected) becomes
C{&lt;}, its text (what HTML makes of a C{<} it cannot read as a tag
anyway).  The parser then never looks past the end of a tag.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape
from html.parser import HTMLParser

#: Characters of HTML rebuilt; a longer body is shown as its source text.  The
#: rebuild runs in the reactor thread at about 2.5 MB a second on tag-dense
#: HTML (a shared 2-core machine), so this bounds a view to a second or two;
#: real mail is far smaller (Gmail clips a body past 102 KB).
MAX_REBUILT = 4 * 1024 * 1024

#: The characters that matter inside a tag, one class: each search is linear.
_IN_TAG = re.compile("[<>=\"']")

#: Elements left out with everything in them (their text is never shown).
_DROPPED_WITH_TEXT = frozenset({"script"})
#: Style sheet text: C{<} becomes a CSS escape, so no tag can begin inside it.
_STYLE = "style"


def _is_name(text: str) -> bool:
    """Letters, digits and C{-_.:} only: written back, it reads as the same one name."""
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "-_.:") for c in text)


def _dropped(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    if tag == "link" or tag in _DROPPED_WITH_TEXT:
        return True
    return tag == "meta" and any(name == "http-equiv" for name, _ in attrs)


class _Rebuild(HTMLParser):
    """Collects the rebuilt document in C{pieces} as the parser reports what it reads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        #: The element whose text is being skipped (a script), or None.
        self._skipping: str | None = None
        self._in_style = False

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]], close: str) -> None:
        if self._skipping or not _is_name(tag) or _dropped(tag, attrs):
            if tag in _DROPPED_WITH_TEXT and close == ">" and not self._skipping:
                self._skipping = tag
            return
        out = ["<", tag]
        for name, value in attrs:
            if not _is_name(name) or name == "srcdoc":
                continue
            out += (" ", name) if value is None else (" ", name, '="', escape(value), '"')
        out.append(close)
        self.pieces.append("".join(out))
        if tag == _STYLE and close == ">":
            self._in_style = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, ">")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, " />")

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping:
                self._skipping = None
            return
        if tag == _STYLE:
            self._in_style = False
        if _is_name(tag) and tag not in ("link", "meta"):
            self.pieces.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        if self._in_style:
            # CSS has no use for "<" outside strings and comments; its escape
            # keeps the meaning there and ends no style element.
            self.pieces.append(data.replace("<", "\\3c "))
        else:
            self.pieces.append(escape(data, quote=False))

    def handle_decl(self, decl: str) -> None:
        # The doctype decides standards or quirks mode: kept when it is plain.
        if decl[:7].lower() == "doctype" and all(c.isprintable() and c not in "<>" for c in decl):
            self.pieces.append(f"<!{decl}>")


def without_resource_hints(html: str) -> str:
    """C{html} rebuilt without C{<link>}, C{<meta http-equiv>}, scripts and comments.

    See the module's docstring for why each goes and why the document is
    rebuilt rather than edited.  Past L{MAX_REBUILT}, or should the parser
    fail on some input, the document is shown as its source text, escaped,
    rather than not at all.
    """
    if len(html) > MAX_REBUILT:
        return _as_source(html)
    parser = _Rebuild()
    try:
        parser.feed(_prepared(html))
        parser.close()
    except Exception:  # the parser's own AssertionError on odd declarations, among others
        return _as_source(html)
    return "".join(parser.pieces)


def _as_source(html: str) -> str:
    """The HTML shown as its source text: inert whatever it holds, and fast."""
    return "<pre>" + escape(html, quote=False) + "</pre>"


def _prepared(html: str) -> str:
    """C{html} with every C{<} either beginning a closed tag or turned into C{&lt;}.

    One pass: each character is looked at by at most one of the searches
    below (a failed search for a quote or terminator is remembered, since
    every later one would fail too; text a tag failed in is escaped whole
    and not scanned again).
    """
    out: list[str] = []
    done = 0
    absent: set[str] = set()

    def find(token: str, start: int) -> int:
        found = -1 if token in absent else html.find(token, start)
        if found < 0:
            absent.add(token)
        return found

    def closer(start: int) -> int:
        """The first C{>} after C{start} if it comes before the next C{<}, else -1."""
        following = find("<", start + 1)
        return html.find(">", start, following if following >= 0 else len(html))

    def as_text(start: int, end: int) -> None:
        nonlocal done
        out.append(html[done:start])
        out.append(html[start:end].replace("<", "&lt;"))
        done = end

    i = find("<", 0)
    while i >= 0:
        # end: just past the construct, or -(where reading it failed); keep: copy it or cut it.
        after = html[i + 1 : i + 2]
        if html.startswith("<!--", i):
            close = find("-->", i + 4)
            end, keep = (close + 3 if close >= 0 else -(i + 1)), False
        elif html[i + 1 : i + 9].lower() == "!doctype" or (
            after == "/" and html[i + 2 : i + 3].isascii() and html[i + 2 : i + 3].isalpha()
        ):
            close = closer(i)
            end, keep = (close + 1 if close >= 0 else -(i + 1)), True
        elif after in ("!", "?"):
            close = closer(i)  # a bogus comment, as HTML reads it: up to the next ">"
            end, keep = (close + 1 if close >= 0 else -(i + 1)), False
        elif after.isascii() and after.isalpha():
            end, keep = _tag_end(html, i, find), True
        else:
            end, keep = -(i + 1), True
        if end < 0:
            as_text(i, -end)
        else:
            out.append(html[done:end] if keep else html[done:i])
            done = end
        i = find("<", done)
    out.append(html[done:])
    return "".join(out)


def _tag_end(html: str, start: int, find: Callable[[str, int], int]) -> int:
    """Just past the C{>} closing the tag at C{start}; C{-position} where reading it failed.

    A quote opens a value only right after C{=} (and spaces), as in HTML; a
    C{<} outside quotes, a quote never closed or the end of the text is a
    failure, at the position reached (so the caller escapes that stretch).
    """
    position = start + 1
    while True:
        found = _IN_TAG.search(html, position)
        if found is None:
            return -len(html)
        position = found.start()
        char = html[position]
        if char == ">":
            return position + 1
        if char == "<":
            return -position
        if char == "=":
            position += 1
            while position < len(html) and html[position].isspace():
                position += 1
            quote = html[position : position + 1]
            if quote in ("'", '"'):
                close = find(quote, position + 1)
                if close < 0:
                    return -(position + 1)
                position = close
        position += 1
