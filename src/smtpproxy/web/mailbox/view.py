"""A message's HTML body made safe to show: its own document, sandboxed, behind a strict CSP.

A captured message is hostile input: it may carry scripts, forms, tracking
images and remote style sheets.  The page shows it in an C{<iframe
sandbox>} without C{allow-scripts}, C{allow-forms} or C{allow-same-origin},
loading C{/view/<id>.html}, whose reply carries its own
C{Content-Security-Policy} (with the C{sandbox} directive, so the document
is just as inert when opened directly).  Nothing leaves the browser unless
the user asks: images are limited to C{data:} URLs (inline C{cid:} parts are
turned into those) until "load remote content" asks for the C{remote}
variant, which allows images over http(s) and nothing else.
"""

from __future__ import annotations

import base64

from smtpproxy.providers.mailbox.store import Stored

#: Inline parts turned into C{data:} URLs, and the bytes they may add.
MAX_INLINE_PARTS = 50
MAX_INLINE_BYTES = 10 * 1024 * 1024

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
    """The HTML body with inline parts as C{data:} URLs; None when there is no HTML."""
    html = stored.email.html
    if html is None:
        return None
    budget = MAX_INLINE_BYTES
    inline = [p for p in stored.parts if p.attachment.content_id][:MAX_INLINE_PARTS]
    for part in inline:
        reference = f"cid:{part.attachment.content_id}"
        if reference not in html or part.attachment.size > budget:
            continue
        budget -= part.attachment.size
        encoded = base64.b64encode(part.attachment.data).decode("ascii")
        kind = part.attachment.content_type
        content_type = "".join(c for c in kind if c.isalnum() or c in "/.+-")
        html = html.replace(reference, f"data:{content_type};base64,{encoded}")
    return html
