"""Pure parsing of the DSN parameters of MAIL and RCPT (RFC 3461).

A client that asks for delivery status notifications says so with C{RET}
and C{ENVID} on MAIL and C{NOTIFY} and C{ORCPT} on RCPT.  The relay cannot
produce DSNs itself (it hands each message to an API, which sends its own
notices, or none), but refusing the parameters with C{555} makes clients
such as Postfix with C{smtp_dsn} fail or retry without them, so they are
accepted, checked and carried on the transaction for the provider to use
or show.

Every function takes the parameter value as the client sent it and returns
the decoded value, or raises C{ValueError} with a one-line reason that the
command parser turns into C{501 5.5.4}.  Each runs in time linear in the
length of its input, and the lengths are bounded (RFC 3461 4.3, 4.4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3461 4.4: "ENVID ... MUST NOT exceed 100 characters"; 4.2: the ORCPT
# value (type, semicolon and xtext) "MUST NOT exceed 500 characters".
MAX_ENVID = 100
MAX_ORCPT = 500
NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")

# RFC 3461 4: addr-type is an atom (RFC 5322 atext).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_HEX = frozenset("0123456789ABCDEFabcdef")


@dataclass(frozen=True, slots=True)
class RecipientDsn:
    """What one RCPT asked for.

    @ivar address: the recipient as given on RCPT TO.
    @ivar notify: C{("NEVER",)}, or the events of C{NOTIFY_EVENTS} asked
        for, in the order given; None when RCPT had no NOTIFY.
    @ivar orcpt: C{(addr-type, original address)}, decoded from xtext, the
        type lower-cased; None when RCPT had no ORCPT.
    """

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Dsn:
    """The DSN parameters of one transaction.

    @ivar ret: C{"FULL"} or C{"HDRS"}, or None.
    @ivar envid: the envelope identifier, decoded from xtext, or None.
    @ivar recipients: one entry per recipient that carried NOTIFY or ORCPT,
        in RCPT order (recipients without either are not listed).
    """

    ret: str | None = None
    envid: str | None = None
    recipients: tuple[RecipientDsn, ...] = ()


def envelope_dsn(ret: str | None, envid: str | None, recipients: list[RecipientDsn]) -> Dsn | None:
    """The transaction's L{Dsn}, or None when the client used no DSN parameter at all."""
    listed = tuple(r for r in recipients if r.notify is not None or r.orcpt is not None)
    if ret is None and envid is None and not listed:
        return None
    return Dsn(ret, envid, listed)


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 4 xtext: C{+HH} is the octet HH, other characters stand for themselves.

    Lower-case hex digits are accepted too (the grammar asks for upper case;
    decoding them is unambiguous).  The octets must form UTF-8.

    @raise ValueError: a C{+} not followed by two hex digits, a character
        outside C{!}..C{~}, an C{=}, or octets that are not UTF-8.
    """
    if "+" not in text:
        if not _xchars(text):
            raise ValueError("not valid xtext")
        return text
    out = bytearray()
    i, size = 0, len(text)
    while i < size:
        char = text[i]
        if char == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise ValueError("'+' in xtext must be followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
            continue
        if not _xchars(char):
            raise ValueError("not valid xtext")
        out.append(ord(char))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("xtext does not decode to UTF-8") from None


def _xchars(text: str) -> bool:
    """True if every character is an xchar: C{!} to C{~} except C{+} and C{=}."""
    return text.isascii() and text.isprintable() and " " not in text and "=" not in text


def _printable(text: str) -> bool:
    """No control characters: the value ends up in logs and on the stdout provider."""
    return text.isprintable()


def parse_ret(value: str | None) -> str:
    """C{RET=FULL|HDRS} (case-insensitive) -> C{"FULL"} or C{"HDRS"}."""
    ret = (value or "").upper()
    if ret not in RET_VALUES:
        raise ValueError("RET must be FULL or HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    """C{ENVID=xtext} -> the decoded identifier (printable US-ASCII, RFC 3461 4.4)."""
    if not value:
        raise ValueError("ENVID needs a value")
    if len(value) > MAX_ENVID:
        raise ValueError(f"ENVID is longer than {MAX_ENVID} characters")
    envid = xtext_decode(value)
    if not (envid.isascii() and _printable(envid)):
        raise ValueError("ENVID must be printable US-ASCII")
    return envid


def parse_notify(value: str | None) -> tuple[str, ...]:
    """C{NOTIFY=NEVER} or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1)."""
    if not value:
        raise ValueError("NOTIFY needs NEVER or SUCCESS, FAILURE, DELAY")
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return ("NEVER",)
    if len(set(items)) != len(items) or not set(items).issubset(NOTIFY_EVENTS):
        raise ValueError("NOTIFY must be NEVER alone, or SUCCESS, FAILURE, DELAY once each")
    return tuple(items)


def parse_orcpt(value: str | None) -> tuple[str, str]:
    """C{ORCPT=addr-type;xtext} -> (lower-case type, decoded address) (RFC 3461 4.2)."""
    if not value:
        raise ValueError("ORCPT needs addr-type;address")
    if len(value) > MAX_ORCPT:
        raise ValueError(f"ORCPT is longer than {MAX_ORCPT} characters")
    kind, semicolon, encoded = value.partition(";")
    if not semicolon or not encoded or _ATOM.fullmatch(kind) is None:
        raise ValueError("ORCPT must be addr-type;address")
    address = xtext_decode(encoded)
    if not _printable(address):
        raise ValueError("ORCPT address holds control characters")
    return kind.lower(), address
