"""Pure parsing of SMTP command arguments (RFC 5321 section 4.1).

No I/O here: the protocol hands in the argument text of MAIL and RCPT and
gets back a typed result or a L{CommandError} carrying the exact reply to
send.  Keeping the grammar in one small module lets property tests hammer it
without a socket.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from smtpproxy import dsn
from smtpproxy.errors import Reply
from smtpproxy.qualify import qualify

# RFC 5321 4.1.2: atext for dot-strings, qtext/quoted-pair for quoted strings.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]"
_MAILBOX = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})")
_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_KEYWORDS = {word: re.compile(rf"{word}:\s*", re.IGNORECASE) for word in ("FROM", "TO")}
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]*))?$")

_Args = TypeVar("_Args")
_Options = TypeVar("_Options")

MAX_LOCAL_PART = 64
MAX_PATH = 256


class CommandError(Exception):
    """The argument is wrong; C{reply} is what the client must be told."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.reply = Reply(code, status, text)


@dataclass(frozen=True, slots=True)
class MailArguments:
    """A parsed MAIL FROM: the reverse-path ("" for <>) and its parameters."""

    sender: str
    size: int | None = None
    body: str | None = None
    # RFC 3461 (DSN): RET=FULL|HDRS and the decoded ENVID.
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RcptArguments:
    """A parsed RCPT TO: the forward-path and its DSN parameters (RFC 3461)."""

    recipient: str
    notify: tuple[str, ...] | None = None
    orcpt: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class MailOptions:
    """What the MAIL parameters are checked against.

    @ivar max_size: C{SIZE} above this is refused with 552.
    @ivar binarymime: C{BODY=BINARYMIME} is offered (RFC 3030).
    """

    max_size: int
    binarymime: bool = False


def check_line(line: bytes) -> None:
    """Refuse a CR, LF or NUL inside a line (its CRLF or LF already removed).

    RFC 5321 2.3.8: CR and LF only ever appear together, as the line's end.
    A bare CR passed on would split our replies (C{EHLO a<CR>b} echoed the
    argument and gave the client an extra reply line) and is how smuggling
    tricks start; a NUL ends strings in the software we hand values to.

    @raise CommandError: C{501 5.5.2}, counted as a client error.
    """
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise CommandError(501, "5.5.2", "Bare CR, LF or NUL inside a command line")


def split_command(line: bytes) -> tuple[str, str]:
    """Split a command line into an upper-case verb and its argument text.

    @raise CommandError: for bytes that cannot appear in a command (CR, LF
        or NUL inside the line, 8-bit), so the caller never has to decode
        anything itself.
    """
    check_line(line)
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError(
            500, "5.5.2", "8-bit characters are not allowed in commands (SMTPUTF8 unsupported)"
        ) from None
    text = text.strip(" \t")
    verb, _, rest = text.partition(" ")
    return verb.upper(), rest.strip(" \t")


def _path(text: str, keyword: str, role: str) -> tuple[str, str]:
    """Split C{FROM:<path> params} into the address and the parameter text."""
    match = _KEYWORDS[keyword].match(text)
    if match is None:
        raise CommandError(501, "5.5.4", f"Syntax: {keyword.upper()}:<address>")
    rest = text[match.end() :]
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise CommandError(501, f"5.1.{_bad(role)}", f"Bad {role} address syntax")
        path, params = rest[1:end], rest[end + 1 :]
        if params and not params.startswith(" "):
            raise CommandError(501, "5.5.4", "Expected a space before parameters")
    else:
        # Some old clients omit the angle brackets; accept a bare address.
        path, _, params = rest.partition(" ")
    if path.startswith("@"):
        path = _ROUTE.sub("", path)
    return path, params.strip()


def _closing_bracket(text: str) -> int:
    """Index of the '>' that closes the path, skipping quoted strings."""
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def _bad(role: str) -> str:
    return "7" if role == "sender" else "3"


def check_address(address: str, role: str) -> str:
    """Return C{address} if it is a valid RFC 5321 mailbox, else raise."""
    if len(address) > MAX_PATH:
        raise CommandError(501, f"5.1.{_bad(role)}", f"The {role} address is too long")
    if not _MAILBOX.fullmatch(address):
        raise CommandError(501, f"5.1.{_bad(role)}", f"Bad {role} address syntax")
    local = address.rsplit("@", 1)[0]
    if len(local) > MAX_LOCAL_PART:
        raise CommandError(501, f"5.1.{_bad(role)}", f"The {role} local part is too long")
    return address


def _parameters(text: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for token in text.split():
        match = _PARAM.match(token)
        if match is None:
            raise CommandError(501, "5.5.4", f"Malformed parameter {token[:40]!r}")
        name = match.group(1).upper()
        if name in found:
            # RFC 3461 4: each DSN parameter at most once; likewise the rest.
            raise CommandError(501, "5.5.4", f"Parameter {name[:40]} given twice")
        found[name] = match.group(2)
    return found


def _mail_size(args: MailArguments, value: str | None, options: MailOptions) -> MailArguments:
    if value is None or not value.isdigit() or len(value) > 20:
        raise ValueError("SIZE needs a number of bytes")
    size = int(value)
    if size > options.max_size:
        raise CommandError(
            552, "5.3.4", f"Message too big: this server accepts at most {options.max_size} bytes"
        )
    return replace(args, size=size)


def _mail_body(args: MailArguments, value: str | None, options: MailOptions) -> MailArguments:
    body = (value or "").upper()
    if body in ("7BIT", "8BITMIME") or (body == "BINARYMIME" and options.binarymime):
        return replace(args, body=body)
    offered = "7BIT, 8BITMIME or BINARYMIME" if options.binarymime else "7BIT or 8BITMIME"
    raise ValueError(f"BODY must be {offered}")


# MAIL and RCPT parameters: keyword -> handler returning the arguments with
# the parameter applied.  A handler raises ValueError for a malformed value
# (answered 501 5.5.4) or CommandError for any other reply; a keyword not
# listed is answered 555.  Offering a new parameter is one entry here.
_MAIL_PARAMETERS: dict[str, Callable[[MailArguments, str | None, MailOptions], MailArguments]] = {
    "SIZE": _mail_size,
    "BODY": _mail_body,
    # RFC 4954 5: a relay may ignore the AUTH= identity it is handed.
    "AUTH": lambda args, value, options: args,
    "RET": lambda args, value, options: replace(args, ret=dsn.parse_ret(value)),
    "ENVID": lambda args, value, options: replace(args, envid=dsn.parse_envid(value)),
}
_RCPT_PARAMETERS: dict[str, Callable[[RcptArguments, str | None, None], RcptArguments]] = {
    "NOTIFY": lambda args, value, options: replace(args, notify=dsn.parse_notify(value)),
    "ORCPT": lambda args, value, options: replace(args, orcpt=dsn.parse_orcpt(value)),
}


def _apply(
    verb: str,
    args: _Args,
    text: str,
    table: Mapping[str, Callable[[_Args, str | None, _Options], _Args]],
    options: _Options,
) -> _Args:
    """Apply each parameter in C{text} to C{args} through C{table}."""
    for name, value in _parameters(text).items():
        handler = table.get(name)
        if handler is None:
            raise CommandError(555, "5.5.4", f"Unsupported {verb} parameter {name[:40]}")
        try:
            args = handler(args, value, options)
        except ValueError as e:
            raise CommandError(501, "5.5.4", str(e)) from None
    return args


def parse_mail(
    argument: str, max_size: int, default_domain: str = "", binarymime: bool = False
) -> MailArguments:
    """Parse the argument of MAIL (C{FROM:<addr> [SIZE=n] [BODY=...] [RET=...] [ENVID=...]}).

    @param default_domain: a bare local part (C{MAIL FROM:<root>}, as cron
        and local tools send) is qualified with it, as Postfix's
        C{append_at_myorigin} does; empty: such a sender is refused.
    @param binarymime: C{BODY=BINARYMIME} is accepted (CHUNKING is offered
        and the provider carries binary content).
    """
    path, param_text = _path(argument, "FROM", "sender")
    path = qualify(path, default_domain)
    args = MailArguments(check_address(path, "sender") if path else "")
    if not param_text:
        return args
    return _apply("MAIL", args, param_text, _MAIL_PARAMETERS, MailOptions(max_size, binarymime))


def parse_rcpt(argument: str) -> RcptArguments:
    """Parse the argument of RCPT (C{TO:<addr> [NOTIFY=...] [ORCPT=...]})."""
    path, param_text = _path(argument, "TO", "recipient")
    if not path:
        raise CommandError(501, "5.1.3", "A recipient address is required")
    args = RcptArguments(check_address(path, "recipient"))
    if not param_text:
        return args
    return _apply("RCPT", args, param_text, _RCPT_PARAMETERS, None)
