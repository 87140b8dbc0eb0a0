"""C{smtpproxy send}: one complete test message, to as many recipients as given.

The message is built by the standard library's C{email} package
(L{build_message}): Date, a Message-ID under this host's name, MIME-Version,
a text part and one part per C{--attach} file with a content type guessed
from its name, non-ASCII subjects and names encoded (RFC 2047 / 2231), and
non-ASCII body text as quoted-printable, so the message is 7-bit clean and
needs no 8BITMIME from the server.  C{--bcc} recipients are in the envelope
only.

It is delivered by Twisted's stock SMTP client (C{twisted.mail.smtp}'s
C{ESMTPClient}), which does what a delivery needs in one transaction: EHLO,
STARTTLS with a certificate checked for the host (the system CAs or
C{--ca-file}), AUTH PLAIN or LOGIN as offered, one MAIL, a RCPT per
recipient, DATA.  Three things are ours:

  - the body goes out already dot-stuffed by L{dialogue.dot_stuff} over
    the whole message; the stock client's own stuffing works per file
    chunk and misses a dot that starts a chunk;
  - PLAIN sends no authorization identity (the stock one names the user
    twice, which some servers refuse);
  - every line either side sends is kept for the report, AUTH answers
    hidden, and Twisted's own line log is off, so no password reaches an
    error message.

Exit status: 0 accepted for every recipient, 3 accepted for some, 1 not
sent, 2 a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid
from typing import TextIO

from twisted.internet.interfaces import IReactorTime

from smtpproxy import addresses
from smtpproxy.config import system_hostname
from smtpproxy.tools import connect
from smtpproxy.tools.connect import UsageError
from smtpproxy.tools.smtpclient import BuiltMessage, Outcome, SendOptions, deliver

__all__ = ["Attachment", "BuiltMessage", "MessageSpec", "build_message", "register"]

EXIT_SENT, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

#: Sent when neither --body nor --body-file is given.
DEFAULT_BODY = "This is a test message sent by `smtpproxy send`.\n"

# 7-bit clean: a non-ASCII body becomes quoted-printable or base64, so the
# message needs no BODY=8BITMIME (the stock client sends no MAIL parameters).
_POLICY = email_policy.SMTP.clone(cte_type="7bit")


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """What the command line asked for."""

    sender: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str = "smtpproxy test message"
    body: str = DEFAULT_BODY
    attachments: tuple[Attachment, ...] = ()


def envelope_address(text: str, option: str) -> str:
    """The addr-spec of C{Name <a@example.com>} or C{a@example.com}, domain as A-labels.

    @raise UsageError: not one address; a non-ASCII local part (it needs
        SMTPUTF8, which this tool does not speak).
    """
    found = getaddresses([text])
    if len(found) != 1 or not found[0][1] or "@" not in found[0][1]:
        raise UsageError(f"{option} {text!r}: expected one address such as a@example.com")
    address = addresses.ascii_address(found[0][1])
    if not addresses.has_ascii_local_part(address):
        raise UsageError(
            f"{option} {text!r}: a non-ASCII local part needs SMTPUTF8 (not supported)"
        )
    if addresses.mailbox_problem(address) is not None:
        raise UsageError(f"{option} {text!r}: not a valid address")
    return address


def _header_address(text: str, option: str) -> Address:
    name, spec = getaddresses([text])[0]
    local, domain = addresses.split(envelope_address(spec, option))
    return Address(display_name=name, username=local, domain=domain)


def build_message(spec: MessageSpec, *, now: datetime, hostname: str) -> BuiltMessage:
    """The message as bytes with CRLF line ends, and its envelope.

    @param now: the Date (an aware datetime); tests pass a fixed one.
    @param hostname: the right-hand side of the Message-ID.
    """
    envelope_from = envelope_address(spec.sender, "--from")
    recipients: list[str] = []
    for option, values in (("--to", spec.to), ("--cc", spec.cc), ("--bcc", spec.bcc)):
        for value in values:
            address = envelope_address(value, option)
            if address not in recipients:
                recipients.append(address)
    if not recipients:
        raise UsageError("give at least one --to, --cc or --bcc")
    message = EmailMessage(policy=_POLICY)
    message["From"] = _header_address(spec.sender, "--from")
    if spec.to:
        message["To"] = [_header_address(v, "--to") for v in spec.to]
    if spec.cc:
        message["Cc"] = [_header_address(v, "--cc") for v in spec.cc]
    message["Subject"] = spec.subject
    message["Date"] = format_datetime(now)
    message_id = make_msgid(domain=hostname)
    message["Message-ID"] = message_id
    message["User-Agent"] = "smtpproxy send"
    message.set_content(spec.body)
    for attachment in spec.attachments:
        guessed, encoding = mimetypes.guess_type(attachment.filename, strict=False)
        if guessed is None or encoding is not None:
            # A .gz or .bz2 file is a compressed file, whatever is inside.
            guessed = "application/octet-stream"
        maintype, _, subtype = guessed.partition("/")
        message.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=os.path.basename(attachment.filename),
        )
    data = message.as_bytes(policy=_POLICY)
    return BuiltMessage(data, message_id, envelope_from, tuple(recipients))


# -- output ------------------------------------------------------------------


def render_text(message: BuiltMessage, options: SendOptions, outcome: Outcome) -> str:
    lines = [
        f"smtpproxy send {options.target} ({connect.MODES[options.mode]}): "
        f"message {message.message_id}, "
        f"{len(message.data)} bytes, {len(message.recipients)} recipients"
    ]
    if options.mode != "plain" and not options.verify:
        lines.append("  (--no-verify: the server's certificate was not checked)")
    lines += [f"  {who}: {text}" for who, text in outcome.transcript]
    if outcome.tls is not None:
        facts = outcome.tls
        lines.append(f"TLS: {facts.version} {facts.cipher} ({facts.bits} bits)")
    refused = [r for r in outcome.recipients if not 200 <= r[1] < 300]
    for address, code, reply in refused:
        lines.append(f"refused: {address}: {code} {reply}")
    status = outcome.status
    if status == "failed":
        why = outcome.error or f"{outcome.code} {outcome.reply}"
        lines.append(f"NOT SENT: {why}")
    else:
        lines.append(
            f"{'SENT' if status == 'sent' else 'PARTLY SENT'}: {outcome.code} {outcome.reply} "
            f"({outcome.accepted} of {len(message.recipients)} recipients accepted, "
            f"{outcome.seconds:.2f} s)"
        )
    return "\n".join(lines) + "\n"


def render_json(message: BuiltMessage, options: SendOptions, outcome: Outcome) -> str:
    tls = outcome.tls
    document = {
        "server": str(options.target),
        "mode": options.mode,
        "verified": options.verify if options.mode != "plain" else None,
        "message_id": message.message_id,
        "size": len(message.data),
        # The message as built, before dot-stuffing: what the server should store.
        "sha256": hashlib.sha256(message.data).hexdigest(),
        "envelope": {"from": message.envelope_from, "to": list(message.recipients)},
        "tls": None
        if tls is None
        else {"version": tls.version, "cipher": tls.cipher, "bits": tls.bits},
        "recipients": [
            {"address": a, "code": code, "reply": reply} for a, code, reply in outcome.recipients
        ],
        "result": {"code": outcome.code, "reply": outcome.reply, "accepted": outcome.accepted},
        "status": outcome.status,
        "error": outcome.error,
        "seconds": round(outcome.seconds, 3),
        "transcript": [{"from": who, "line": text} for who, text in outcome.transcript],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- the command -------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add C{send} to the C{smtpproxy} command's subcommands."""
    parser = commands.add_parser(
        "send",
        # No abbreviations: "--password" must not quietly mean --password-file.
        allow_abbrev=False,
        help="send one complete test message and show the server's replies",
        description=(
            "Build a complete message (Date, Message-ID, MIME, attachments) and send it "
            "in one transaction to every --to, --cc and --bcc.  Exit status: 0 sent, "
            "3 sent to some recipients only, 1 not sent, 2 usage."
        ),
    )
    parser.add_argument("--server", required=True, metavar="HOST[:PORT]")
    parser.add_argument("--from", dest="sender", required=True, metavar="ADDRESS")
    parser.add_argument("--to", action="append", default=[], metavar="ADDRESS")
    parser.add_argument("--cc", action="append", default=[], metavar="ADDRESS")
    parser.add_argument(
        "--bcc", action="append", default=[], metavar="ADDRESS", help="envelope only"
    )
    parser.add_argument("--subject", default=MessageSpec.__dataclass_fields__["subject"].default)
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the message text")
    body.add_argument("--body-file", metavar="F", help="read the message text (UTF-8) from F")
    parser.add_argument(
        "--attach", action="append", default=[], metavar="FILE", help="attach FILE (repeatable)"
    )
    connect.add_connection_arguments(parser)
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="use TLS without checking the certificate (a relay's generated certificate)",
    )
    parser.set_defaults(run=main)


def _spec(arguments: argparse.Namespace) -> MessageSpec:
    body = arguments.body if arguments.body is not None else DEFAULT_BODY
    if arguments.body_file is not None:
        body = _read(arguments.body_file, "--body-file").decode("utf-8", "strict")
    attachments = tuple(Attachment(path, _read(path, "--attach")) for path in arguments.attach)
    return MessageSpec(
        sender=arguments.sender,
        to=tuple(arguments.to),
        cc=tuple(arguments.cc),
        bcc=tuple(arguments.bcc),
        subject=arguments.subject,
        body=body,
        attachments=attachments,
    )


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"{option} {path}: {e.strerror or e}") from None


def main(arguments: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run C{smtpproxy send} from parsed arguments; the exit status."""
    out = out or sys.stdout
    mode = "tls" if arguments.tls else "starttls" if arguments.starttls else "plain"
    hostname = system_hostname(socket.getfqdn)[0]
    try:
        target = connect.parse_target(arguments.server, implicit_tls=mode == "tls")
        if arguments.user is not None and mode == "plain" and not arguments.insecure_auth:
            raise UsageError(
                "--user without --starttls or --tls would send the password in clear text "
                "(add --insecure-auth on a network you trust)"
            )
        if arguments.ca_file is not None:
            connect.ca_certificates(arguments.ca_file)
        spec = _spec(arguments)
        # The Message-ID's right-hand side: this host, unless it has no usable
        # name, then the sender's domain (never "localhost", which filters mark).
        id_domain = arguments.helo or hostname
        if id_domain == "localhost":
            id_domain = envelope_address(spec.sender, "--from").rpartition("@")[2]
        message = build_message(spec, now=_now(), hostname=id_domain)
        password = connect.read_password(arguments.user, arguments.password_file)
    except (UsageError, UnicodeDecodeError) as e:
        sys.stderr.write(f"smtpproxy send: {e}\n")
        return EXIT_USAGE
    options = SendOptions(
        target=target,
        mode=mode,
        helo=arguments.helo or hostname,
        timeout=arguments.timeout,
        ca_file=arguments.ca_file,
        verify=not arguments.no_verify,
        user=arguments.user,
        password=password,
    )
    result: list[int] = []

    async def run(reactor: IReactorTime) -> None:
        outcome = await deliver(reactor, message, options)
        render = render_json if arguments.json else render_text
        out.write(render(message, options, outcome))
        out.flush()
        status = outcome.status
        result.append(
            EXIT_SENT if status == "sent" else EXIT_PARTIAL if status == "partial" else EXIT_FAILED
        )

    connect.react(run)
    return result[0] if result else EXIT_FAILED


def _now() -> datetime:
    return datetime.now().astimezone()
