"""A Message-ID of our own for a MIME draft made from a message that has none.

Graph knows a MIME draft by its C{internetMessageId}, which it takes from
the message's Message-ID field.  The relay relies on that twice: to find
and delete a draft created by an attempt whose answer was lost, and to let
sends of one message take turns on the draft path
(L{smtpproxy.providers.graph.draftturns}).  A message without the field
would leave both without a handle (Exchange would make up an id we cannot
know in advance), so on the draft path it gets one of ours, written as the
first header field of the MIME posted.  The C{sendMail} path never needs
one: nothing is looked up there, and Exchange adds its own id.

Pure functions; the caller supplies the random token.
"""

from __future__ import annotations

from smtpproxy.addresses import ascii_domain, default_domain


def draft_message_id(token: str, configured_domain: str, mailbox: str) -> str:
    """C{<token@domain>}: the relay's default domain (C{SMTP_DEFAULT_DOMAIN}),
    else the sending mailbox's, as an A-label (a header field must be ASCII).

    @param token: unique per message (a random hex string): ASCII letters
        and digits only, so the id is a valid C{dot-atom} on both sides.
    """
    domain = default_domain(configured_domain, (mailbox,))
    written = ascii_domain(domain) or "smtpproxy.invalid"
    return f"<{token}@{written}>"


def with_message_id(mime: bytes, message_id: str) -> bytes:
    """C{mime} with C{Message-ID: message_id} as its first header field.

    Written with the line ending the message's first line uses, so a
    message in LF form stays consistent; everything else is unchanged.
    """
    first = mime.find(b"\n")
    ending = b"\r\n" if first > 0 and mime[first - 1 : first] == b"\r" else b"\n"
    return b"Message-ID: " + message_id.encode("ascii") + ending + mime
