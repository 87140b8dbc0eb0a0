"""Taking attachments out of a raw MIME message, leaving every other byte as it was.

A message too large for one MIME request still goes to Graph as MIME: the
relay creates the draft from the message itself with its biggest
attachments cut out, then adds those through Graph's attachment calls.
Cutting is done on the raw bytes, never by re-serialising a parsed
message, so the header block (Message-ID, References, List-Unsubscribe,
...), the text/plain alternative, calendar parts and every remaining part
reach Graph exactly as the client sent them.

L{walk} finds the leaf parts and their byte spans (linear in the message:
each part's boundary lines are found by one forward search); L{take_out}
chooses which leaves to cut and returns the smaller message and the cut
parts, decoded.  A signed or encrypted message (C{multipart/signed},
C{multipart/encrypted}, C{application/pkcs7-mime}) cannot lose a part
without breaking it, nor can one that holds such a part at any depth (a
signed message wrapped in a C{multipart/mixed} by a list's footer):
L{is_signed} tells the planner so, and nothing is ever cut from inside a
signed part.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser

from smtpproxy.mime.message import MAX_DEPTH, MAX_PARTS, Attachment, _boundary_lines

# One line and its ending, as the standard library's parser splits them.
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")
_HEADERS = BytesHeaderParser(policy=policy.default)
# The body parts a reader shows as the message itself: never taken out.
_BODY_TYPES = frozenset({"text/plain", "text/html", "text/calendar", "text/enriched"})
# S/MIME (RFC 8551) and PGP/MIME (RFC 3156: multipart/signed and
# multipart/encrypted).  The parts inside them (application/pkcs7-signature,
# application/pgp-signature, application/pgp-encrypted) mean something only
# there, and their parent is found first; alone in a message (a detached
# signature of an attached file) they are files like any other, which the
# JSON form carries byte for byte.
_SIGNED_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
    }
)
# How each of those types must be spelt for a Content-Type field to read as
# it: the subtype follows the slash directly (the standard library's parser
# keeps "multipart / signed" as it stands, which is no signed type), in any
# case.  A message without any of these bytes holds no signed part, and is
# not walked.  The slash is matched case-sensitively on purpose: sre then
# skips ahead to each "/" in C, where a pattern that ignores case as a whole
# is tried at every byte (10 times slower on a 10 KB message, about a tenth
# of the Graph path's CPU per message).
_SIGNED_MARK = re.compile(rb"/(?i:signed|encrypted|(?:x-)?pkcs7-mime)")


@dataclass(frozen=True, slots=True)
class Leaf:
    """A part that is not a multipart, where it sits in the raw bytes.

    @ivar cut_start: where the boundary line that opens the part starts.
    @ivar cut_end: where the next boundary line starts (the part, its
        header block and the line break before that boundary lie between).
    @ivar body_start: where the part's body starts.
    @ivar body_end: where it ends (the line break before the next boundary
        belongs to that boundary, RFC 2046 5.1.1).
    @ivar parent: the index of its multipart in L{Tree.parents}.
    @ivar removable: whether it may be taken out (not the message's text, not
        an alternative, not inside a signed part).
    """

    cut_start: int
    cut_end: int
    body_start: int
    body_end: int
    headers: EmailMessage = field(repr=False)
    parent: int
    removable: bool


@dataclass(slots=True)
class Tree:
    """The leaves of a message and, per multipart, how many parts it has."""

    leaves: list[Leaf] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    signed: bool = False
    """A part of a signed or encrypted type was seen (a multipart or a leaf)."""
    complete: bool = True
    """False when the walk stopped at L{MAX_DEPTH} or L{MAX_PARTS}: parts
    beyond were not looked at."""


def header_end(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """Where the header block starting at C{start} ends, and where the body starts.

    The block ends at the first empty line (the body starts after it), or at
    C{end} when there is none.
    """
    position = start
    while position < end:
        found = _LINE.match(raw, position, end)
        line_end = found.end() if found is not None else end
        if line_end == position:
            break
        if raw[position:line_end] in (b"\r\n", b"\n", b"\r"):
            return position, line_end
        position = line_end
    return end, end


def is_signed(raw: bytes) -> bool:
    """Whether the message is, or holds at any depth, a signed or encrypted part.

    S/MIME or PGP/MIME (see L{_SIGNED_TYPES}).  Cheap for most messages: the
    top-level Content-Type decides unless it is a multipart, and a
    multipart whose bytes never spell a signed type is not walked.  A walk
    cut short by the depth or part limits counts as signed (the bytes name
    such a type and the part holding it was not reached): refusing to
    rebuild that message is the safe side.
    """
    if _SIGNED_MARK.search(raw) is None:
        # The everyday message: no signed type is spelt anywhere, so none is
        # there to find (one search, before any header is parsed).
        return False
    block, _ = header_end(raw, 0, len(raw))
    kind = _content_type(_HEADERS.parsebytes(raw[:block]))
    if kind in _SIGNED_TYPES:
        return True
    if not kind.startswith("multipart/"):
        return False
    tree = walk(raw)
    return tree.signed or not tree.complete


def _content_type(headers: EmailMessage) -> str:
    try:
        return headers.get_content_type()
    except Exception:  # a damaged Content-Type reads as the default
        return "text/plain"


def walk(raw: bytes) -> Tree:
    """Every leaf part of C{raw} with its byte span (see L{Leaf})."""
    tree = Tree()
    block, body = header_end(raw, 0, len(raw))
    headers = _HEADERS.parsebytes(raw[:block])
    if headers.get_content_maintype() == "multipart":
        _walk_multipart(raw, headers, body, len(raw), 1, False, tree)
    return tree


def _walk_multipart(
    raw: bytes,
    headers: EmailMessage,
    start: int,
    end: int,
    depth: int,
    frozen: bool,
    tree: Tree,
) -> None:
    """Add the leaves of the multipart whose body is C{raw[start:end]} to C{tree}.

    @param frozen: inside a signed part or an alternative: nothing below may
        be taken out.
    """
    if depth > MAX_DEPTH or len(tree.leaves) >= MAX_PARTS:
        tree.complete = False
        return
    try:
        boundary = headers.get_boundary()
    except Exception:
        boundary = None
    if boundary is None:
        return
    try:
        lines = _boundary_lines(boundary.encode("ascii"))
    except UnicodeEncodeError:
        return
    if lines is None:
        return
    kind = _content_type(headers)
    tree.signed = tree.signed or kind in _SIGNED_TYPES
    frozen = frozen or kind in _SIGNED_TYPES or kind == "multipart/alternative"
    parent = len(tree.parents)
    tree.parents.append(0)
    line = lines.search(raw, start, end)
    while line is not None and not line[2]:
        cut_start, part_start, _ = line
        while (again := lines.match(raw, part_start, end)) is not None:
            if again[1]:
                return
            cut_start, part_start = part_start, again[0]
        line = lines.search(raw, part_start, end)
        part_end = end if line is None else line[0]
        body_end = part_end
        if line is not None:
            # The line break before a boundary line belongs to it.
            if raw[body_end - 2 : body_end] == b"\r\n":
                body_end -= 2
            elif raw[body_end - 1 : body_end] in (b"\n", b"\r"):
                body_end -= 1
        block, body_start = header_end(raw, part_start, part_end)
        part_headers = _HEADERS.parsebytes(raw[part_start:block])
        tree.parents[parent] += 1
        if part_headers.get_content_maintype() == "multipart":
            _walk_multipart(raw, part_headers, body_start, part_end, depth + 1, frozen, tree)
            continue
        if len(tree.leaves) >= MAX_PARTS:
            tree.complete = False
            return
        part_type = _content_type(part_headers)
        tree.signed = tree.signed or part_type in _SIGNED_TYPES
        removable = not frozen and part_type not in _BODY_TYPES | _SIGNED_TYPES and line is not None
        tree.leaves.append(
            Leaf(
                cut_start,
                part_end,
                min(body_start, body_end),
                body_end,
                part_headers,
                parent,
                removable,
            )
        )


def decode(raw: bytes, leaf: Leaf) -> bytes:
    """A part's body with its transfer encoding undone (as-is if it cannot be)."""
    body = raw[leaf.body_start : leaf.body_end]
    encoding = str(leaf.headers.get("content-transfer-encoding", "")).strip().lower()
    if encoding == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body))
        except (binascii.Error, ValueError):
            return body
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _cut(raw: bytes, leaf: Leaf) -> Attachment:
    headers = leaf.headers
    try:
        filename = headers.get_filename()
    except Exception:
        filename = None
    disposition = (headers.get_content_disposition() or "").lower()
    content_id = str(headers.get("content-id", "")).strip().strip("<>") or None
    inline = disposition == "inline" or (disposition != "attachment" and content_id is not None)
    return Attachment(filename, _content_type(headers), decode(raw, leaf), inline, content_id)


def take_out(raw: bytes, fits: Callable[[int], bool]) -> tuple[bytes, list[Attachment]] | None:
    """Cut the largest removable parts out of C{raw} until C{fits(len(rest))}.

    A multipart always keeps at least one part (an empty multipart is not
    valid MIME), so its last remaining part stays.

    @return: the message without the cut parts (byte for byte the same
        elsewhere) and the cut parts, decoded, in their order in the message; None
        when even cutting every removable part does not make it fit.
    """
    tree = walk(raw)
    size = len(raw)
    remaining = list(tree.parents)
    chosen: list[Leaf] = []
    for leaf in sorted(
        (leaf for leaf in tree.leaves if leaf.removable),
        key=lambda leaf: leaf.cut_end - leaf.cut_start,
        reverse=True,
    ):
        if fits(size):
            break
        if remaining[leaf.parent] <= 1:
            continue
        remaining[leaf.parent] -= 1
        size -= leaf.cut_end - leaf.cut_start
        chosen.append(leaf)
    if not fits(size):
        return None
    chosen.sort(key=lambda leaf: leaf.cut_start)
    pieces: list[bytes] = []
    position = 0
    for leaf in chosen:
        pieces.append(raw[position : leaf.cut_start])
        position = leaf.cut_end
    pieces.append(raw[position:])
    return b"".join(pieces), [_cut(raw, leaf) for leaf in chosen]
