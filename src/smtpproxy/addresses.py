"""Email addresses: RFC 5321 / 5322 / 6531 syntax and comparison keys, in one place.

Every wing reads addresses: the SMTP front door checks the envelope's
(RFC 5321, extended by RFC 6531 for UTF-8), the MIME parser reads the
header's (RFC 5322), the policy compares them against the operator's lists,
and the Graph provider compares header and envelope and writes addresses of
its own.  The grammar and the ways two addresses count as "the same" live
here so that they cannot drift apart; each caller keeps its own replies and
warnings.

Pure functions over strings, no I/O.  Every pattern is linear in its input:
no two adjacent or nested repeats can take the same character (the header
patterns are possessive as well), and whatever is converted (IDNA) is
bounded first.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import idna

MAX_LOCAL_PART = 64
"""RFC 5321 4.5.3.1.1, in octets (RFC 6531 3.3)."""
MAX_PATH = 256
"""RFC 5321 4.5.3.1.3: a whole envelope path, in octets."""
MAX_DOMAIN = 255
"""A domain as given, in octets, before it may reach the IDNA converter."""
MAX_HOSTNAME = 253
"""An ASCII (A-label) domain name: what DNS can carry."""
MAX_ADDRESS = 254
"""An address the relay writes itself (RFC 5321's path minus its brackets)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address from a header: display name (may be empty) and addr-spec."""

    name: str
    address: str

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


# -- syntax ------------------------------------------------------------------

# RFC 5321 4.1.2: atext for dot-strings, qtext/quoted-pair for quoted strings,
# each extended by RFC 6531 3.3 with any non-ASCII character (UTF8-non-ascii);
# C1 controls stay out.  Whether the transaction may use them at all is the
# SMTP dialogue's business.  Line and paragraph separators and bidirectional
# overrides are left out too: they would break a log line or make a
# displayed address read differently from what it is.
_UTF8 = "\u00a0-\u2027\u202f-\u2065\u206a-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8}-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e{_UTF8}])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
"""An ASCII domain name (LDH labels), as pattern text for callers' own patterns."""
_LITERAL = r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]"
_LOCAL_PART = re.compile(rf"{_DOT_STRING}|{_QUOTED}")
_HOSTNAME = re.compile(DOMAIN)
_ENVELOPE_DOMAIN = re.compile(rf"{DOMAIN}|{_LITERAL}")

# RFC 5322 3.2.3 / 3.4.1 in its everyday form: ASCII dot-atom@dot-atom.
_HEADER_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_ADDRESS = (
    rf"{_HEADER_ATEXT}++(?:\.{_HEADER_ATEXT}++)*+@{_HEADER_ATEXT}++(?:\.{_HEADER_ATEXT}++)*+"
)
# One mailbox, blanks around it already stripped.  Possessive repeats: a
# name's words, the blanks before C{<} and the address's atoms cannot trade
# characters, so a match reads each character once.  (The former pattern
# had optional blanks on both sides of an optional name, and a run of
# blanks cost time quadratic in its length.)
_SIMPLE_MAILBOX = re.compile(
    rf"(?:(?P<name>{_HEADER_ATEXT}++(?:[ \t]++{_HEADER_ATEXT}++)*+)?\s*+"
    rf"<(?P<bracketed>{_DOT_ATOM_ADDRESS})>|(?P<bare>{_DOT_ATOM_ADDRESS}))"
)
# Control characters (tab aside) go to the full parsers too: they keep them
# as part of a name or an address, where a plain strip() would drop them.
_UNUSUAL_ADDRESS_SYNTAX = re.compile(r'["(\\:;\x00-\x08\x0a-\x1f\x7f]|=\?')
# What can never be part of an address-like run when salvaging a header.
_ADDRESS_SEPARATORS = str.maketrans(dict.fromkeys("<>()[],;:\"'", " "))
# Characters that never appear unquoted in an address we would write: space,
# controls and the RFC 5322 specials that delimit addresses in a header.
_FORBIDDEN = frozenset(' \t\r\n\x00<>()[]\\,;:"@')


def split(address: str) -> tuple[str, str]:
    """C{(local part, domain)}, cut at the last C{@}.

    The last one: a quoted local part may hold an C{@} of its own, a domain
    never does.  Without any C{@} the local part is empty and the whole
    text is the domain (what the callers have always been handed).
    """
    local, _, domain = address.rpartition("@")
    return local, domain


def domain_of(address: str) -> str:
    """The domain of C{address}: what follows its last C{@} (see L{split})."""
    return address.rpartition("@")[2]


class Problem(enum.Enum):
    """Why an envelope address is not a valid mailbox, in the order it is checked."""

    TOO_LONG = "too long"
    SYNTAX = "syntax"
    LOCAL_PART_TOO_LONG = "local part too long"


def mailbox_problem(address: str) -> Problem | None:
    """What is wrong with C{address} as an RFC 5321 (or RFC 6531) mailbox; None if nothing.

    Lengths are counted in octets, as RFC 6531 3.3 says.  A non-ASCII
    domain must be a valid internationalised domain name (L{is_idn_domain});
    an ASCII one must match RFC 5321's grammar (a domain or an address
    literal; its length is bounded by the path's alone).  Whether non-ASCII
    is allowed at all is the caller's business.
    """
    if len(address.encode("utf-8")) > MAX_PATH:
        return Problem.TOO_LONG
    if "@" not in address:
        return Problem.SYNTAX
    local, domain = split(address)
    if not _LOCAL_PART.fullmatch(local):
        return Problem.SYNTAX
    if domain.isascii():
        valid = _ENVELOPE_DOMAIN.fullmatch(domain) is not None
    else:
        valid = is_idn_domain(domain)
    if not valid:
        return Problem.SYNTAX
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return Problem.LOCAL_PART_TOO_LONG
    return None


def is_hostname(domain: str) -> bool:
    """Whether C{domain} is an ASCII domain name: LDH labels, at most 253 characters."""
    return len(domain) <= MAX_HOSTNAME and _HOSTNAME.fullmatch(domain) is not None


# -- internationalised domains (RFC 6530-6533) --------------------------------
#
# An SMTPUTF8 client may name a domain in Unicode (U-labels, exämple.test);
# DNS, Graph's recipient fields and every ASCII-only header need the same
# domain as A-labels (xn--exmple-cua.test).  The conversion follows IDNA 2008
# with the UTS 46 mapping (upper case is folded, ß is kept), through the
# idna package; the standard library's idna codec implements the older IDNA
# 2003 and maps some names to a different domain.


def ascii_domain(domain: str) -> str | None:
    """C{domain} as A-labels (an ASCII domain as it is); None if it is not a valid IDN."""
    if domain.isascii():
        return domain
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return None
    try:
        converted = idna.encode(domain, uts46=True).decode("ascii")
    except (UnicodeError, ValueError):
        # idna.IDNAError is a UnicodeError; a code point it has no rule for
        # (or a label it cannot map) must not become a traceback.
        return None
    return converted if is_hostname(converted) else None


def is_idn_domain(domain: str) -> bool:
    """Whether C{domain} (non-ASCII) is a valid internationalised domain name."""
    return ascii_domain(domain) is not None


def ascii_address(address: str) -> str:
    """C{address} with its domain as A-labels; unchanged when there is nothing to convert.

    The local part is never touched: RFC 6531 gives it no ASCII form, so a
    UTF-8 local part stays UTF-8 (see L{has_ascii_local_part}).  An address
    whose domain cannot be converted is returned as it is, for the caller's
    own validation to refuse.
    """
    if "@" not in address:
        return address
    local, domain = split(address)
    if domain.isascii():
        return address
    converted = ascii_domain(domain)
    return f"{local}@{converted}" if converted is not None else address


def has_ascii_local_part(address: str) -> bool:
    """Whether the part of C{address} before its last C{@} is ASCII (nothing RFC 6531 needs)."""
    return split(address)[0].isascii()


# -- comparison keys ---------------------------------------------------------
#
# Three questions, three answers, on purpose:
# - envelope_key: is this RCPT a duplicate in the transaction?  Only the
#   domain is case-blind (RFC 5321 2.4); the local part is the destination's
#   to interpret, so Bob@ and bob@ are both passed on.
# - pattern_key: does an operator's allow-list name this address?  ASCII
#   case only, and a non-ASCII address never matches: Unicode folding (the
#   Kelvin sign lowers to "k") must not forge a listed address.
# - mailbox_key: is this the same Exchange mailbox?  Exchange ignores case in
#   the local part too and reads an IDN by its A-labels, so the provider
#   must, or it sends Bob@ a second copy because the envelope said bob@.


def envelope_key(address: str) -> str:
    """What makes two recipients the same mailbox: the domain is case-blind, the local part not."""
    local, domain = split(address)
    return f"{local}@{domain.lower()}"


def pattern_key(address: str) -> str | None:
    """C{address} as allow-list entries are stored (lower case); None when no entry may match it."""
    if not address.isascii() or "@" not in address:
        return None
    return address.lower()


def mailbox_key(address: str) -> str:
    """How the Graph provider compares addresses: without angle brackets, blanks or case.

    An internationalised domain compares by its A-labels, so
    C{zoe@exämple.test} and C{zoe@xn--exmple-cua.test} are one address.

    The provider asks this a dozen times per message, mostly about the same
    few addresses (its mailboxes, the sender, the recipients), so keys of
    addresses no longer than a path (RFC 5321's 256 octets, in characters
    here) are remembered, a bounded number of them.
    """
    if len(address) <= MAX_PATH:
        return _cached_mailbox_key(address)
    return _mailbox_key(address)


def _mailbox_key(address: str) -> str:
    return ascii_address(address.strip().strip("<>").strip()).casefold()


_cached_mailbox_key = functools.lru_cache(maxsize=4096)(_mailbox_key)


# -- header address lists (RFC 5322 3.4) ---------------------------------------


def simple_mailboxes(value: str) -> list[Mailbox] | None:
    """Parse the everyday forms of an address header quickly, or return None.

    C{Name <a@b.example>} and bare C{a@b.example}, comma separated, cover
    nearly all real mail; the standard library's full RFC 5322 parser costs
    a quarter of the relay's CPU per message on them.  Anything with quotes,
    comments, groups, encoded words, dots in names, control characters or
    other syntax returns None so the full parser decides, and the results
    agree where both apply.
    (Without quotes, comments or groups every comma separates two
    addresses, so a plain split is exact here.)
    """
    if not value.isascii() or _UNUSUAL_ADDRESS_SYNTAX.search(value) is not None:
        return None
    found = []
    for item in value.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(item.strip(" \t"))
        if match is None:
            return None
        address = match["bracketed"] or match["bare"]
        name = match["name"]
        found.append(Mailbox(" ".join(name.split()) if name else "", address))
    return found


def split_address_list(value: str) -> list[str] | None:
    """C{value} cut at the commas that separate addresses; None when it holds a group.

    A comma separates addresses unless it is inside a quoted string, a
    comment or angle brackets.  A group (a colon outside all of those)
    returns None: its members cannot be read apart from it.  One pass over
    the characters.
    """
    pieces: list[str] = []
    start = 0
    quoted = escaped = angle = False
    comment = 0
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and (quoted or comment):
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(char, 0)
        elif char == '"':
            quoted = True
        elif char == "(":
            comment = 1
        elif angle:
            angle = char != ">"
        elif char == "<":
            angle = True
        elif char == ":":
            return None
        elif char == ",":
            pieces.append(value[start:index])
            start = index + 1
    pieces.append(value[start:])
    return pieces


def salvage_addresses(value: str, parsed: Sequence[Mailbox]) -> list[Mailbox]:
    """C{parsed}, plus whatever else in C{value} looks like an address.

    A candidate is a run of characters other than blanks and C{<>()[],;:"'}
    with an C{@} somewhere inside it (not first, not last).  Duplicates are
    found by the whole address lower-cased (a header's addresses are only
    being listed here, not compared with another source).  Splitting and
    testing each run is linear; C{findall} with a pattern took 36 s on a
    160,000-character run without an C{@}.
    """
    seen = {mailbox.address.lower() for mailbox in parsed}
    mailboxes = list(parsed)
    for candidate in value.translate(_ADDRESS_SEPARATORS).split():
        if "@" in candidate[1:-1] and candidate.lower() not in seen:
            seen.add(candidate.lower())
            mailboxes.append(Mailbox("", candidate))
    return mailboxes


# -- addresses the relay writes itself ---------------------------------------
#
# Cron, old applications and sendmail-style tools send bare local parts
# (From: root, MAIL FROM:<root>).  A mail server qualifies them with its own
# domain (Postfix's append_at_myorigin); Graph does not, and refuses a
# message whose Reply-To it cannot read with ErrorInvalidRecipients.  So
# every address the relay adds to a message goes through here: a bare local
# part gets the default domain, and what is still not a plain
# local@domain.tld address is left out rather than bounce the message.


def _plain(text: str) -> bool:
    """Non-empty, no forbidden character, no control, dots only between characters."""
    if not text or text.startswith(".") or text.endswith(".") or ".." in text:
        return False
    return not any(char in _FORBIDDEN or char < " " or char == "\x7f" for char in text)


def is_deliverable(address: str) -> bool:
    """Whether C{address} is a plain C{local@domain.tld} that Graph accepts as a recipient.

    Stricter than RFC 5321 on purpose: quoted local parts and address
    literals are valid SMTP but not what Exchange takes in a Reply-To, and
    a single-label domain (C{root@myhost}) is not deliverable on the
    Internet.  UTF-8 is allowed (RFC 6531 addresses).
    """
    if len(address) > MAX_ADDRESS or "@" not in address:
        return False
    local, domain = split(address)
    if len(local) > MAX_LOCAL_PART or not _plain(local) or not _plain(domain):
        return False
    return "." in domain


def is_local_part(text: str) -> bool:
    """Whether C{text} is a bare local part (C{root}): something to qualify."""
    return len(text) <= MAX_LOCAL_PART and _plain(text)


def qualify(address: str, domain: str) -> str:
    """C{address} with C{@domain} appended when it is a bare local part, else unchanged."""
    if domain and "@" not in address and is_local_part(address):
        return f"{address}@{domain}"
    return address


def default_domain(configured: str, senders: Sequence[str]) -> str:
    """The domain a bare C{MAIL FROM} local part is qualified with.

    C{SMTP_DEFAULT_DOMAIN} when set; else the domain of the first mailbox
    the relay sends as (C{GRAPH_SENDER}); else empty, and the session uses
    its host name, as Postfix's C{myorigin} defaults to C{myhostname}.
    """
    if configured:
        return configured
    for sender in senders:
        domain = domain_of(sender)
        if domain:
            return domain
    return ""
