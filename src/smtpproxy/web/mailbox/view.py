"""A message's HTML body made safe to show: its own document, sandboxed, behind a strict CSP.

A captured message is hostile input: it may carry scripts, forms, tracking
images and remote style sheets.  The page shows it in an C{<iframe
sandbox>} without C{allow-scripts}, C{allow-forms} or C{allow-same-origin},
loading C{/view/<id>.html}, whose reply carries its own
C{Content-Security-Policy} (with the C{sandbox} directive, so the document
is just as inert when opened directly).  Nothing leaves the browser unless
the user asks: images are limited to C{data:} URLs (inline C{cid:} parts are
turned into those) until "load remote content" asks for the C{remote}
variant, which allows images over http(s) and nothing else.  Resource hints
(C{<link rel=preconnect>} and the like), which Chromium acts on outside the
policy, are taken out of the document first (L{rewrite}), and every reply
says C{X-DNS-Prefetch-Control: off}.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote

from smtpproxy.providers.mailbox.store import Part, Stored
from smtpproxy.web.mailbox import download, rewrite

#: Inline parts that may be turned into C{data:} URLs (the first ones with a Content-ID).
MAX_INLINE_PARTS = 50
#: Characters the C{data:} URLs may add to one document, all references counted:
#: a part referenced twice is paid for twice.  Past it, references stay C{cid:}
#: (the policy loads nothing, so they show as missing images).
MAX_INLINE_BYTES = 10 * 1024 * 1024

#: A C{cid:} reference up to what ends a URL in an attribute or in CSS.  One
#: literal, then one run of a class the literal's end cannot re-enter: each
#: character is looked at once or twice, whatever the input.
_REFERENCE = re.compile(r"""cid:([^\s"'()<>]+)""", re.IGNORECASE)

#: The policy of every page of the mailbox's own (the list, the script, the API).
PAGE_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-src 'self'; form-action 'none'; base-uri 'none'; "
    b"frame-ancestors 'none'"
)


def body_policy(remote: bool) -> bytes:
    """The policy of a message's HTML document: no script, no form, no request out."""
    images = b"data: http: https:" if remote else b"data:"
    return (
        b"default-src 'none'; style-src 'unsafe-inline'; img-src " + images + b"; "
        b"font-src data:; form-action 'none'; base-uri 'none'; frame-ancestors 'self'; "
        b"sandbox allow-popups allow-popups-to-escape-sandbox"
    )


def html_document(stored: Stored) -> str | None:
    """The HTML body, rebuilt without resource hints, inline parts as C{data:} URLs; None without.

    One pass over the HTML: each C{cid:} reference is looked up whole, so
    C{cid:a} never rewrites part of C{cid:ab}, and each substitution is
    charged to L{MAX_INLINE_BYTES} at the length it adds, so the document
    is at most that much longer than the HTML however often a part is named.
    """
    if stored.email.html is None:
        return None
    html = rewrite.without_resource_hints(stored.email.html)
    inline: dict[str, Part] = {}
    for part in stored.parts:
        content_id = part.attachment.content_id
        if content_id and content_id not in inline:
            inline[content_id] = part
            if len(inline) == MAX_INLINE_PARTS:
                break
    if not inline:
        return html
    urls: dict[str, str] = {}
    budget = MAX_INLINE_BYTES
    pieces: list[str] = []
    done = 0
    for reference in _REFERENCE.finditer(html):
        named = inline.get(reference.group(1)) or inline.get(unquote(reference.group(1)))
        if named is None or _url_length(named) > budget:
            continue
        url = urls.get(named.part_id)
        if url is None:
            url = urls[named.part_id] = _data_url(named)
        budget -= len(url)
        pieces += (html[done : reference.start()], url)
        done = reference.end()
    pieces.append(html[done:])
    return "".join(pieces)


def _content_type(part: Part) -> str:
    return download.media_type(part.attachment.content_type)


def _url_length(part: Part) -> int:
    """The length of L{_data_url} without building it (base64: 4 characters per 3 bytes)."""
    return len("data:;base64,") + len(_content_type(part)) + 4 * -(-part.attachment.size // 3)


def _data_url(part: Part) -> str:
    encoded = base64.b64encode(part.attachment.data).decode("ascii")
    return f"data:{_content_type(part)};base64,{encoded}"
