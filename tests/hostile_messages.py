"""Small messages with damaged or unusual header blocks, as clients really send them.

The project's own set for the recipient test in L{tests.providers.graph.test_recipients}
(next to the shared corpus, which may be absent).  Each one is written here
as bytes so that bare CRs and 8-bit bytes stay exactly as intended; none is
a copy of a corpus file.  Every message names its recipients in To/Cc so
that both envelope shapes of the test (header recipients plus one, and one
stranger) mean something.
"""

from __future__ import annotations

import base64

# A small binary attachment, so that "no attachment changed" is checked on
# messages whose header blocks are damaged too.
PAYLOAD = bytes(range(256)) * 3
_B64 = base64.encodebytes(PAYLOAD).replace(b"\n", b"\r\n")


def _with_attachment(head: bytes) -> bytes:
    """C{head} (a header block without its blank line) over a multipart/mixed body."""
    return (
        head + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="zz"\r\n'
        b"\r\n"
        b"--zz\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"Nightly report attached.\r\n"
        b"--zz\r\n"
        b'Content-Type: application/octet-stream; name="dump.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="dump.bin"\r\n'
        b"\r\n" + _B64 + b"--zz--\r\n"
    )


MESSAGES: dict[str, bytes] = {
    # A sentence pasted into the header block: a MIME parser starts the body
    # there, so whatever the relay appended after it would be body text.
    "line_without_colon": (
        b"From: Backup Job <backup@example.org>\r\n"
        b"To: ops@example.net\r\n"
        b"Subject: backup finished\r\n"
        b"this line has no colon and ends the header block for most parsers\r\n"
        b"X-Job: 42\r\n"
        b"\r\n"
        b"All volumes copied.\r\n"
    ),
    # A long Subject folded without the leading space on its second line.
    "broken_fold": _with_attachment(
        b"From: app@example.org\r\n"
        b"To: Alice <alice@example.net>, bob@example.net\r\n"
        b"Subject: a subject that was folded by a script\r\n"
        b"which forgot the leading white space\r\n"
    ),
    # A bare CR inside a field: the standard library ends the line there, so
    # the Bcc behind it is a field of its own (a stranger to the envelope).
    "bare_cr": (
        b"From: app@example.org\r\n"
        b"To: carol@example.net\r\n"
        b"Subject: looks harmless\rBcc: stranger@evil.example\r\n"
        b"\r\n"
        b"Hello.\r\n"
    ),
    # An mbox separator line left in front of the message by a local tool.
    "mbox_from_line": (
        b"From daemon@host.example Mon Jan  1 00:00:00 2024\r\n"
        b"From: daemon@host.example\r\n"
        b"To: dave@example.net\r\n"
        b"Subject: from a mailbox file\r\n"
        b"\r\n"
        b"Body.\r\n"
    ),
    # Raw UTF-8 in the Subject and a display name (RFC 6532 style), no MIME.
    "eight_bit_headers": _with_attachment(
        "From: Jörg Müller <joerg@example.org>\r\n"
        "To: Zoë <zoe@example.net>\r\n"
        "Subject: Überweisung für März\r\n".encode()
    ),
    # An encoded word whose decoded display name holds a comma.
    "encoded_word_to": (
        b"From: app@example.org\r\n"
        b"To: =?utf-8?q?Smith=2C_John?= <js@example.net>, erin@example.net\r\n"
        b"Subject: =?utf-8?b?w4RyZ2VyIG1pdCBkZXIgUmVjaG51bmc=?=\r\n"
        b"\r\n"
        b"Text.\r\n"
    ),
    # Group syntax in To, and an empty group in Cc.
    "group_to": (
        b"From: app@example.org\r\n"
        b"To: Team: frank@example.net, Grace <grace@example.net>;\r\n"
        b"Cc: undisclosed-recipients:;\r\n"
        b"Subject: to the team\r\n"
        b"\r\n"
        b"Text.\r\n"
    ),
    # Two Bcc fields, one of them folded over two lines.
    "duplicate_bcc": (
        b"From: app@example.org\r\n"
        b"To: heidi@example.net\r\n"
        b"Bcc: ivan@example.net\r\n"
        b"Subject: twice hidden\r\n"
        b"Bcc: judy@example.net,\r\n"
        b"  mallory@example.net\r\n"
        b"\r\n"
        b"Text.\r\n"
    ),
    # No header block at all: the client sent only body text.
    "no_header_block": (b"just a line of text from a script\r\nand another one\r\n"),
    # An unqualified From, as cron sends it, with an attachment.
    "from_root": _with_attachment(
        b"From: root\r\nTo: ops@example.net\r\nSubject: Cron <root@host> run-parts\r\n"
    ),
    # The first line is a continuation of nothing, then LF-only lines and a
    # stray line between the fields.
    "leading_continuation_lf": (
        b"  folded remains of a field\n"
        b"From: app@example.org\n"
        b"To: kim@example.net\n"
        b"stray words\n"
        b"Cc: lee@example.net\n"
        b"\n"
        b"Text.\n"
    ),
}
