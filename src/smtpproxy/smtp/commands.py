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
from smtpproxy.addresses import DOMAIN, Problem, mailbox_problem, qualify
from smtpproxy.errors import Reply

_ROUTE = re.compile(rf"^@{DOMAIN}(?:,@{DOMAIN})*:")
_KEYWORDS = {word: re.compile(rf"{word}:\s*", re.IGNORECASE) for word in ("FROM", "TO")}
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]*))?$")

_Args = TypeVar("_Args")
_Options = TypeVar("_Options")

# RFC 6531 3.3: UTF-8 may appear in these commands' addresses (VRFY and EXPN
# too, which this relay answers without looking at the argument).
_UTF8_VERBS = frozenset({"MAIL", "RCPT", "VRFY", "EXPN"})


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
    # RFC 6531: the transaction may use UTF-8 addresses (and headers).
    smtputf8: bool = False
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

    8-bit bytes must be well-formed UTF-8 (RFC 6531 3.3) and may only stand
    in the argument of MAIL and RCPT, where L{parse_mail} and L{parse_rcpt}
    decide whether the transaction declared SMTPUTF8.  The check on the
    bytes is one strict decode: linear, and a malformed sequence can never
    reach a parser, a log line or a provider.

    @raise CommandError: for bytes that cannot appear in a command (CR, LF
        or NUL inside the line, malformed UTF-8, non-ASCII outside MAIL and
        RCPT), so the caller never has to decode anything itself.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        check_line(line)
        # 501 when the verb itself is readable: the argument is what is wrong.
        verb_ok = line.lstrip(b" \t").split(b" ", 1)[0].isascii()
        raise CommandError(501 if verb_ok else 500, "5.5.2", "Malformed UTF-8 in command") from None
    # CR, LF and NUL are not printable: the usual printable line skips
    # check_line's three scans, and any other line still gets them, before
    # anything else is decided, exactly as if they came first.
    if not text.isprintable():
        check_line(line)
    text = text.strip(" \t")
    verb, _, rest = text.partition(" ")
    if not text.isascii() and verb.upper() not in _UTF8_VERBS:
        raise CommandError(
            500, "5.5.2", "8-bit characters are only allowed in MAIL and RCPT addresses"
        )
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
    """Return C{address} if it is a valid RFC 5321 (or RFC 6531) mailbox, else raise.

    The syntax is L{smtpproxy.addresses.mailbox_problem}'s; this gives each
    problem its reply.  Whether non-ASCII is allowed in this transaction at
    all is L{check_declared}'s business.
    """
    problem = mailbox_problem(address)
    if problem is None:
        return address
    status = f"5.1.{_bad(role)}"
    if problem is Problem.TOO_LONG:
        raise CommandError(501, status, f"The {role} address is too long")
    if problem is Problem.LOCAL_PART_TOO_LONG:
        raise CommandError(501, status, f"The {role} local part is too long")
    raise CommandError(501, status, f"Bad {role} address syntax")


def check_declared(address: str, smtputf8: bool, role: str) -> None:
    """Refuse a non-ASCII address in a transaction that did not declare SMTPUTF8.

    RFC 6531 3.5 and 3.7.4.1: such an address needs C{MAIL FROM:<...>
    SMTPUTF8}; without it the answer is C{553 5.6.7} (a permanent "mailbox
    name not allowed"), so a client retries through a path that can carry
    it or bounces with a reason a person can act on.
    """
    if not smtputf8 and not address.isascii():
        raise CommandError(
            553,
            "5.6.7",
            f"Non-ASCII {role} address needs SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)",
        )


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
    "SMTPUTF8": lambda args, value, options: replace(args, smtputf8=_no_value("SMTPUTF8", value)),
}
_RCPT_PARAMETERS: dict[str, Callable[[RcptArguments, str | None, None], RcptArguments]] = {
    "NOTIFY": lambda args, value, options: replace(args, notify=dsn.parse_notify(value)),
    "ORCPT": lambda args, value, options: replace(args, orcpt=dsn.parse_orcpt(value)),
}


def _no_value(keyword: str, value: str | None) -> bool:
    """A keyword that takes no value (RFC 6531 3.4's SMTPUTF8): True, or ValueError."""
    if value is not None:
        raise ValueError(f"{keyword} takes no value")
    return True


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
    if param_text:
        options = MailOptions(max_size, binarymime)
        args = _apply("MAIL", args, param_text, _MAIL_PARAMETERS, options)
    check_declared(args.sender, args.smtputf8, "sender")
    return args


def parse_rcpt(argument: str, smtputf8: bool = False) -> RcptArguments:
    """Parse the argument of RCPT (C{TO:<addr> [NOTIFY=...] [ORCPT=...]}).

    @param smtputf8: whether this transaction's MAIL declared SMTPUTF8,
        which a non-ASCII recipient address needs.
    """
    path, param_text = _path(argument, "TO", "recipient")
    if not path:
        raise CommandError(501, "5.1.3", "A recipient address is required")
    address = check_address(path, "recipient")
    check_declared(address, smtputf8, "recipient")
    args = RcptArguments(address)
    if not param_text:
        return args
    return _apply("RCPT", args, param_text, _RCPT_PARAMETERS, None)
