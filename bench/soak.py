"""Soak test: many hostile and honest clients against a real relay, then an audit.

The unit and security suites prove each control on its own, with a fake
clock and one session at a time.  What they cannot show is how the controls
behave together, for minutes, with sessions dying at every possible point
while others deliver mail next to them.  This script does that and then
checks the two things that matter most to a relay's users:

  - every message the relay answered 250 to was delivered exactly once, and
    nothing else was (a message is never lost, doubled, or delivered after
    its client gave up before the final dot);
  - the process does not leak: open file descriptors and resident memory
    after the storm are back where they were before it.

The relay runs as a real C{twistd} process with the stdout provider, whose
output is redirected to a file; every message carries a unique token in its
envelope sender, Subject and Message-ID, so the delivered blocks can be
matched one by one against what the clients were told.  A message whose
connection died after the final dot but before its reply was read may be
delivered or not ("reply lost"): both are fine, and counted apart.

Each client thread loops over a random mix of scenarios: good mail through
C{smtplib} (several messages per connection, sometimes over STARTTLS), raw
pipelined transactions, bad commands (garbage, NUL, 8-bit, over-long lines,
commands out of order, the error budget), oversize messages, abrupt
disconnects at every stage, slow partial lines, and hostile messages built to
make a parser stall or a log flood (issue 9's attacks, cut to size).  A probe
connects every 100 ms throughout and reports the longest wait for a
greeting: the stall every other client of the relay would have felt.  Everything talks to
127.0.0.1 only; every loop is bounded by a count and by the deadline, and
every socket has a timeout, so a hung relay shows up as a reported hang,
never as a soak test that does not end.

    PYTHONPATH=src:. .venv/bin/python bench/soak.py --quick
    PYTHONPATH=src:. .venv/bin/python bench/soak.py --clients 20 --minutes 1

The exit status is 0 when nothing was lost, doubled or leaked, the relay
stopped cleanly on SIGTERM and its log holds no traceback or error; 1
otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TWISTD = ROOT / ".venv" / "bin" / "twistd"

MAX_MESSAGE_SIZE = 200_000
MAX_ERRORS = 10  # the relay's default SMTP_MAX_ERRORS
MAX_MINUTES = 30.0
MAX_CLIENTS = 200
QUICK_SECONDS = 15.0
IO_TIMEOUT = 20.0  # per socket operation; a relay slower than this is hung
MAX_REPLY_LINES = 50
MAX_REPLY_BYTES = 64 * 1024
MAX_ITERATIONS = 1_000_000  # per client, far beyond what any deadline allows
SAMPLE_EVERY = 3.0
STOP_TIMEOUT = 60.0

MAX_FD_GROWTH = 10
# A greeting slower than this means the reactor stalled (a busy shared
# machine adds tens of milliseconds, never seconds).
MAX_STALL = 2.0
MAX_RSS_GROWTH_KB = 30 * 1024

SEPARATOR = "=" * 72
TOKEN = re.compile(r"soak-([wm]\d{3}x\d{7})@soak\.test")


# -- the ledger: what every client was told --------------------------------

STARTED = "started"  # transaction begun, final dot not sent: must not be delivered
DOT_SENT = "dot-sent"  # final dot sent (or maybe sent), reply never read: either way
ACCEPTED = "accepted"  # 250 after the dot: must be delivered exactly once
REJECTED = "rejected"  # 4xx/5xx after the dot: must not be delivered


@dataclass
class Anomaly:
    """One kind of unexpected client-side outcome, with its first example."""

    count: int
    example: str


class Ledger:
    """Thread-safe record of every message's fate and of surprises seen by clients."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.scenarios: Counter[str] = Counter()
        self.variants: Counter[str] = Counter()
        self.anomalies: dict[str, Anomaly] = {}
        self.hostile: set[str] = set()

    def set(self, token: str, state: str) -> None:
        with self._lock:
            self.states[token] = state

    def ran(self, scenario: str) -> None:
        with self._lock:
            self.scenarios[scenario] += 1

    def variant(self, label: str) -> None:
        with self._lock:
            self.variants[label] += 1

    def anomaly(self, scenario: str, kind: str, example: str) -> None:
        key = f"{scenario}: {kind}"
        with self._lock:
            seen = self.anomalies.get(key)
            if seen is None:
                self.anomalies[key] = Anomaly(1, example)
            else:
                seen.count += 1


# -- a minimal SMTP wire client --------------------------------------------


class UnexpectedReplyError(Exception):
    """The relay answered something the scenario did not expect."""


class ClosedError(Exception):
    """The relay closed the connection where the scenario expected a reply."""


class Wire:
    """A raw SMTP connection: write bytes, read replies; nothing hidden.

    C{smtplib} cannot pipeline, send bytes it considers invalid, or hang up
    at an arbitrary point, which is what most scenarios need.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        for _ in range(MAX_REPLY_BYTES):
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > MAX_REPLY_BYTES:
                raise UnexpectedReplyError(f"reply line over {MAX_REPLY_BYTES} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ClosedError("connection closed by the relay")
            self.buffer += chunk
        raise UnexpectedReplyError("reply line never ended")

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; return its code and full text."""
        lines = []
        for _ in range(MAX_REPLY_LINES):
            line = self.line()
            if not re.match(rb"^\d{3}[ -]", line):
                raise UnexpectedReplyError(f"malformed reply line {line[:80]!r}")
            lines.append(line.decode("ascii", "replace").rstrip("\r\n"))
            if line[3:4] == b" ":
                return int(line[:3]), "\n".join(lines)
        raise UnexpectedReplyError(f"reply with more than {MAX_REPLY_LINES} lines")

    def expect(self, code: int, what: str) -> str:
        got, text = self.reply()
        if got != code:
            raise UnexpectedReplyError(f"{what}: expected {code}, got {text[:120]!r}")
        return text

    def command(self, line: bytes, code: int) -> str:
        self.send(line + b"\r\n")
        return self.expect(code, line.split(b" ")[0].decode("ascii", "replace"))

    def expect_eof(self, what: str) -> None:
        """The relay must now close the connection without saying more."""
        for _ in range(100):
            if self.buffer:
                raise UnexpectedReplyError(
                    f"{what}: data after the closing reply {bytes(self.buffer[:80])!r}"
                )
            chunk = self.sock.recv(4096)
            if not chunk:
                return
            self.buffer += chunk
        raise UnexpectedReplyError(f"{what}: connection not closed")

    def starttls(self, context: ssl.SSLContext) -> None:
        if self.buffer:
            raise UnexpectedReplyError(
                f"plaintext after the 220 to STARTTLS: {bytes(self.buffer[:80])!r}"
            )
        self.sock = context.wrap_socket(self.sock)

    def close(self, reset: bool = False) -> None:
        """Hang up: a FIN, or with C{reset} an RST (SO_LINGER 0)."""
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


# -- messages -----------------------------------------------------------------

WORDS = (
    *("relay", "tenant", "graph", "message", "envelope", "header", "body", "line", "parser"),
    *("session", "queue", "token", "invoice", "report", "monday", "quarterly", "meeting"),
    *("agenda", "notes", "draft", "final", "Grüße", "café", "naïve", "Straße", "東京", "пример"),
)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def text_lines(rng: random.Random, size: int, ascii_only: bool) -> list[str]:
    """About C{size} bytes of prose in lines of varying length, some starting with a dot."""
    out: list[str] = []
    total = 0
    for _ in range(size // 10 + 1):
        if total >= size:
            break
        line = words(rng, rng.randint(1, 14))
        if ascii_only:
            line = line.encode("ascii", "ignore").decode("ascii")
        roll = rng.random()
        if roll < 0.05:
            line = "." + line  # must survive dot-stuffing
        elif roll < 0.07:
            line = "."
        elif roll < 0.09:
            line = ""
        out.append(line)
        total += len(line.encode()) + 2
    return out


def make_message(rng: random.Random, token: str, size: int) -> bytes:
    """A message of roughly C{size} bytes in one of several shapes, not yet dot-stuffed."""
    shape = rng.choice(("plain", "utf8", "html", "multipart", "long-line"))
    head = [
        f"From: Soak Client <soak-{token}@soak.test>",
        "To: Someone <rcpt@soak.test>",
        f"Subject: soak {token}",
        "Date: Mon, 02 Nov 2026 10:00:00 +0000",
        f"Message-ID: <soak-{token}@soak.test>",
        "MIME-Version: 1.0",
    ]
    body: list[str]
    if shape == "plain":
        head.append("Content-Type: text/plain; charset=us-ascii")
        body = text_lines(rng, size, ascii_only=True)
    elif shape == "utf8":
        head += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
        body = text_lines(rng, size, ascii_only=False)
    elif shape == "html":
        head += ["Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
        body = ["<html><body>"]
        body += [f"<p>{line}</p>" for line in text_lines(rng, size, ascii_only=False)]
        body.append("</body></html>")
    elif shape == "long-line":
        # DATA lines may be far longer than 1000 bytes: real clients send them.
        head.append("Content-Type: text/plain; charset=us-ascii")
        body = ["x" * min(size, rng.randint(1000, 60_000)), "end"]
    else:
        boundary = f"b-{token}"
        head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        raw = rng.randbytes(max(1, size * 3 // 4))
        encoded = base64.encodebytes(raw).decode("ascii").splitlines()
        body = [
            f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8",
            "",
            *text_lines(rng, 200, ascii_only=False),
            f"--{boundary}",
            "Content-Type: application/octet-stream",
            f'Content-Disposition: attachment; filename="{token}.bin"',
            "Content-Transfer-Encoding: base64",
            "",
            *encoded,
            f"--{boundary}--",
        ]
    return "\r\n".join([*head, "", *body]).encode("utf-8") + b"\r\n"


def dot_stuffed(message: bytes) -> bytes:
    """The message as sent after DATA: dot-stuffed, ending in CRLF.CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def good_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.7:
        return rng.randint(100, 4_000)
    if roll < 0.95:
        return rng.randint(4_000, 40_000)
    return rng.randint(40_000, 140_000)


# -- one client ----------------------------------------------------------------


@dataclass
class Client:
    """One soak client: its identity, its random stream and where it reports."""

    phase: str
    cid: int
    port: int
    rng: random.Random
    ledger: Ledger
    tls: ssl.SSLContext
    seq: int = 0

    def token(self) -> str:
        self.seq += 1
        token = f"{self.phase}{self.cid:03d}x{self.seq:07d}"
        self.ledger.set(token, STARTED)
        return token

    def wire(self, greet: bool = True, ehlo: bool = True) -> Wire:
        wire = Wire(self.port)
        if greet:
            wire.expect(220, "greeting")
            if ehlo:
                wire.command(b"EHLO soak-client.test", 250)
        return wire

    def recipients(self) -> list[bytes]:
        count = 1 if self.rng.random() < 0.8 else self.rng.randint(2, 4)
        return [b"RCPT TO:<rcpt%d@soak.test>" % i for i in range(count)]

    def settle(self, token: str, code: int, text: str, expected: int = 250) -> None:
        """Record the reply to a final dot; an unexpected one is an anomaly."""
        self.ledger.set(token, ACCEPTED if code == 250 else REJECTED)
        if code != expected:
            raise UnexpectedReplyError(f"after the dot: expected {expected}, got {text[:120]!r}")

    def transaction(self, wire: Wire, pipelined: bool, then_quit: bool = False) -> None:
        """One good message over a raw connection, answered 250."""
        token = self.token()
        body = dot_stuffed(make_message(self.rng, token, good_size(self.rng)))
        head = [b"MAIL FROM:<soak-%s@soak.test>" % token.encode(), *self.recipients(), b"DATA"]
        if pipelined:
            wire.send(b"".join(line + b"\r\n" for line in head))
            for line in head[:-1]:
                wire.expect(250, line.split(b":")[0].decode())
            wire.expect(354, "DATA")
        else:
            for line in head[:-1]:
                wire.command(line, 250)
            wire.command(b"DATA", 354)
        self.ledger.set(token, DOT_SENT)
        wire.send(body + (b"QUIT\r\n" if then_quit else b""))
        self.settle(token, *wire.reply())
        if then_quit:
            wire.expect(221, "QUIT")


Scenario = Callable[[Client], None]


def good_smtplib(client: Client) -> None:
    """Honest mail through the standard library client, sometimes over STARTTLS."""
    rng = client.rng
    smtp = smtplib.SMTP(HOST, client.port, local_hostname="soak-client.test", timeout=IO_TIMEOUT)
    try:
        code, text = smtp.ehlo()
        if code != 250:
            raise UnexpectedReplyError(f"EHLO: {code} {text[:80]!r}")
        tls = rng.random() < 0.3
        client.ledger.variant("good-smtplib/" + ("starttls" if tls else "plain"))
        if tls:
            code, text = smtp.starttls(context=client.tls)
            if code != 220:
                raise UnexpectedReplyError(f"STARTTLS: {code} {text[:80]!r}")
            smtp.ehlo()
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.1:
                smtp.noop()
            if rng.random() < 0.1:
                smtp.rset()
            token = client.token()
            message = make_message(rng, token, good_size(rng))
            code, text = smtp.mail(f"soak-{token}@soak.test")
            if code != 250:
                raise UnexpectedReplyError(f"MAIL: {code} {text[:80]!r}")
            for line in client.recipients():
                code, text = smtp.rcpt(line[9:-1].decode())
                if code != 250:
                    raise UnexpectedReplyError(f"RCPT: {code} {text[:80]!r}")
            code, text = smtp.docmd("DATA")
            if code != 354:
                raise UnexpectedReplyError(f"DATA: {code} {text[:80]!r}")
            client.ledger.set(token, DOT_SENT)
            smtp.send(dot_stuffed(message))
            code, text = smtp.getreply()
            client.settle(token, code, text.decode("ascii", "replace"))
        if rng.random() < 0.9:
            code, text = smtp.quit()
            if code != 221:
                raise UnexpectedReplyError(f"QUIT: {code} {text[:80]!r}")
    finally:
        smtp.close()


def pipelined(client: Client) -> None:
    """Raw transactions, pipelined as RFC 2920 allows, or whole in one write."""
    rng = client.rng
    wire = client.wire()
    try:
        batch = rng.random() < 0.5
        client.ledger.variant("pipelined/" + ("one-write" if batch else "rfc2920"))
        if not batch:
            count = rng.randint(1, 4)
            for i in range(count):
                client.transaction(
                    wire, pipelined=True, then_quit=i == count - 1 and rng.random() < 0.5
                )
            return
        # Several whole transactions and QUIT in one write: every reply must
        # come back, in order, and QUIT's only after the last 250.
        parts: list[bytes] = []
        expected: list[tuple[int, str | None]] = []
        for _ in range(rng.randint(1, 3)):
            token = client.token()
            recipients = client.recipients()
            parts += [b"MAIL FROM:<soak-%s@soak.test>\r\n" % token.encode()]
            parts += [line + b"\r\n" for line in recipients]
            parts += [b"DATA\r\n", dot_stuffed(make_message(rng, token, rng.randint(100, 20_000)))]
            expected += [(250, None)] * (1 + len(recipients)) + [(354, None), (250, token)]
            client.ledger.set(token, DOT_SENT)
        parts.append(b"QUIT\r\n")
        expected.append((221, None))
        wire.send(b"".join(parts))
        for code, owner in expected:
            got, text = wire.reply()
            if owner is not None:
                client.settle(owner, got, text)
            elif got != code:
                raise UnexpectedReplyError(f"pipelined batch: expected {code}, got {text[:120]!r}")
        wire.expect_eof("after QUIT")
    finally:
        wire.close()


def bad_line(rng: random.Random) -> tuple[str, bytes]:
    """One command line the relay must refuse with a 5xx (and nothing worse)."""
    kind = rng.choice(("garbage", "nul", "8bit", "long", "unknown", "syntax", "cr"))
    if kind == "garbage":
        # Anything but LF, after a byte that cannot start a verb.
        noise = bytes(b for b in rng.randbytes(rng.randint(1, 300)) if b != 0x0A)
        return kind, b"#" + noise.rstrip(b"\r")
    if kind == "nul":
        return kind, rng.choice((b"EH\x00LO x", b"MAIL FROM:<a\x00b@soak.test>", b"\x00\x00\x00"))
    if kind == "8bit":
        return kind, rng.choice(
            ("MAIL FROM:<jörg@soak.test>".encode(), b"H\xe9LO x", b"RCPT TO:<\xff\xfe@soak.test>")
        )
    if kind == "long":
        return kind, rng.choice((b"NOOP ", b"MAIL FROM:<", b"VRFY ")) + b"a" * rng.randint(600, 995)
    if kind == "unknown":
        return kind, rng.choice((b"XYZZY", b"GET / HTTP/1.1", b"", b"   ", b"MAIL", b"TURN"))
    if kind == "syntax":
        return kind, rng.choice(
            (b"MAIL TO:<a@b.test>", b"MAIL FROM:a@", b"MAIL FROM:<a@b.test> SIZE=x", b"EHLO")
        )
    return kind, rng.choice((b"MAIL FROM:<a\rb@soak.test>", b"NOOP\rMAIL FROM:<x@y.test>"))


def bad_commands(client: Client) -> None:
    """Refused commands one after another; the session survives, or the budget closes it."""
    rng = client.rng
    greeted = rng.random() < 0.8
    wire = client.wire(ehlo=greeted)
    errors = 0
    exhaust = rng.random() < 0.25
    client.ledger.variant("bad-commands/" + ("error-budget" if exhaust else "recover"))
    try:
        for _ in range(MAX_ERRORS + 2 if exhaust else rng.randint(1, MAX_ERRORS - 2)):
            roll = rng.random()
            if roll < 0.15:
                # Out of order: RCPT or DATA without MAIL.
                lines, what = [rng.choice((b"RCPT TO:<a@soak.test>", b"DATA"))], "order"
            elif roll < 0.25 and greeted and errors < MAX_ERRORS - 2:
                # MAIL twice, then DATA without RCPT: two refusals (RSET after).
                wire.command(b"MAIL FROM:<twice@soak.test>", 250)
                lines, what = [b"MAIL FROM:<twice@soak.test>", b"DATA", b"RSET"], "order"
            else:
                what, line = bad_line(rng)
                lines = [line]
            for line in lines:
                wire.send(line + b"\r\n")
                if line == b"RSET":
                    wire.expect(250, "RSET")
                    continue
                errors += 1
                code, text = wire.reply()
                if errors >= MAX_ERRORS:
                    if code != 421:
                        raise UnexpectedReplyError(
                            f"error budget: expected 421, got {text[:120]!r}"
                        )
                    wire.expect_eof("after 421")
                    return
                if not 500 <= code <= 599:
                    raise UnexpectedReplyError(
                        f"{what} {line[:40]!r}: expected 5xx, got {text[:120]!r}"
                    )
            if rng.random() < 0.3:
                wire.command(b"RSET", 250)
        if exhaust:
            raise UnexpectedReplyError(f"error budget: still open after {errors} errors")
        # The refusals must not have spoiled the session.
        if not greeted:
            wire.command(b"EHLO soak-client.test", 250)
        wire.command(b"RSET", 250)
        if rng.random() < 0.5:
            client.transaction(wire, pipelined=rng.random() < 0.5)
        wire.command(b"QUIT", 221)
    finally:
        wire.close()


def oversize(client: Client) -> None:
    """Messages over the limit: refused with 552, and the session stays usable."""
    rng = client.rng
    wire = client.wire()
    try:
        variant = rng.choice(("size-param", "data", "data", "one-line"))
        client.ledger.variant(f"oversize/{variant}")
        if variant == "size-param":
            wire.command(b"MAIL FROM:<big@soak.test> SIZE=%d" % (MAX_MESSAGE_SIZE + 1), 552)
        else:
            token = client.token()
            wire.command(b"MAIL FROM:<soak-%s@soak.test>" % token.encode(), 250)
            wire.command(b"RCPT TO:<rcpt@soak.test>", 250)
            wire.command(b"DATA", 354)
            size = rng.randint(MAX_MESSAGE_SIZE + 1_000, 2 * MAX_MESSAGE_SIZE)
            if variant == "data":
                message = make_message(rng, token, size)
                while len(message) <= MAX_MESSAGE_SIZE:
                    message += b"padding padding padding padding padding padding\r\n" * 1000
            else:
                head = make_message(rng, token, 100)
                message = head + b"y" * size + b"\r\n"
            client.ledger.set(token, DOT_SENT)
            wire.send(dot_stuffed(message))
            client.settle(token, *wire.reply(), expected=552)
        if rng.random() < 0.6:
            client.transaction(wire, pipelined=rng.random() < 0.5)
        wire.command(b"QUIT", 221)
    finally:
        wire.close()


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS handshake, to send (or half-send) by hand."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def disconnect(client: Client) -> None:
    """Hang up (FIN or RST) at one of the points a transaction can die."""
    rng = client.rng
    where = rng.choice(
        (
            "connect",
            "greeting",
            "mid-command",
            "after-mail",
            "after-rcpt",
            "after-data",
            "mid-data",
            "almost-dot",
            "after-dot",
            "after-dot-quit",
            "mid-handshake",
            "tls-garbage",
        )
    )
    reset = rng.random() < 0.5
    client.ledger.variant(f"disconnect/{where}")
    if where == "connect":
        Wire(client.port).close(reset)
        return
    wire = client.wire(ehlo=where != "greeting")
    try:
        if where == "greeting":
            return
        if where == "mid-command":
            wire.send(rng.choice((b"MAIL FROM:<half@", b"EHLO", b"RCPT TO:<x@y.test>\r")))
            return
        if where in ("mid-handshake", "tls-garbage"):
            wire.command(b"STARTTLS", 220)
            if where == "tls-garbage":
                wire.send(b"\x16\x03\x01" + rng.randbytes(rng.randint(1, 200)))
            else:
                hello = client_hello(client.tls)
                wire.send(hello[: rng.randint(1, len(hello))])
            return
        token = client.token()
        wire.command(b"MAIL FROM:<soak-%s@soak.test>" % token.encode(), 250)
        if where == "after-mail":
            return
        wire.command(b"RCPT TO:<rcpt@soak.test>", 250)
        if where == "after-rcpt":
            return
        wire.command(b"DATA", 354)
        if where == "after-data":
            return
        body = dot_stuffed(make_message(rng, token, good_size(rng)))
        if where == "mid-data":
            wire.send(body[: rng.randint(1, len(body) - 4)])
        elif where == "almost-dot":
            # One byte short of the terminator: this message must not go out.
            wire.send(body[: rng.choice((-1, -2))])
        else:
            client.ledger.set(token, DOT_SENT)
            wire.send(body + (b"QUIT\r\n" if where == "after-dot-quit" else b""))
    finally:
        wire.close(reset)


def slow(client: Client) -> None:
    """Slowloris, briefly: commands and a body trickled a few bytes at a time."""
    rng = client.rng
    wire = client.wire(ehlo=False)

    def trickle(data: bytes, budget: float) -> None:
        end = time.monotonic() + budget
        position = 0
        for _ in range(len(data)):
            if position >= len(data):
                return
            step = rng.randint(1, 3) if time.monotonic() < end else len(data)
            wire.send(data[position : position + step])
            position += step
            time.sleep(rng.uniform(0.005, 0.05))

    try:
        trickle(b"EHLO slow.soak.test\r\n", 1.0)
        wire.expect(250, "EHLO")
        variant = rng.choice(("abandon-line", "abandon-data", "finish"))
        client.ledger.variant(f"slow/{variant}")
        if variant == "abandon-line":
            trickle(b"MAIL FROM:<slow@soak.test>"[: rng.randint(1, 25)], 1.0)
            return
        token = client.token()
        wire.command(b"MAIL FROM:<soak-%s@soak.test>" % token.encode(), 250)
        wire.command(b"RCPT TO:<rcpt@soak.test>", 250)
        wire.command(b"DATA", 354)
        body = dot_stuffed(make_message(rng, token, rng.randint(100, 600)))
        if variant == "abandon-data":
            trickle(body[: rng.randint(1, len(body) - 4)], 1.0)
            return
        client.ledger.set(token, DOT_SENT)
        trickle(body, 1.5)
        client.settle(token, *wire.reply())
        wire.command(b"QUIT", 221)
    finally:
        wire.close()


def starttls_raw(client: Client) -> None:
    """STARTTLS by hand, sometimes with a command injected behind it in plaintext."""
    rng = client.rng
    wire = client.wire()
    try:
        inject = rng.random() < 0.5
        client.ledger.variant("starttls-raw/" + ("injected" if inject else "clean"))
        wire.send(b"STARTTLS\r\n" + (b"MAIL FROM:<injected@soak.test>\r\n" if inject else b""))
        wire.expect(220, "STARTTLS")
        wire.starttls(client.tls)
        text = wire.command(b"EHLO soak-client.test", 250)
        # An injected MAIL that survived would answer here, in place of EHLO.
        if "PIPELINING" not in text:
            raise UnexpectedReplyError(
                f"first reply inside TLS is not the EHLO reply: {text[:80]!r}"
            )
        if "STARTTLS" in text:
            raise UnexpectedReplyError("STARTTLS still advertised inside TLS")
        # The injected MAIL must be forgotten: RCPT has no transaction to join.
        wire.command(b"RCPT TO:<rcpt@soak.test>", 503)
        if rng.random() < 0.3:
            wire.command(b"STARTTLS", 503)
        for _ in range(rng.randint(0, 2)):
            client.transaction(wire, pipelined=rng.random() < 0.5)
        wire.command(b"QUIT", 221)
    finally:
        wire.close()


def hostile_message(rng: random.Random, token: str) -> tuple[str, bytes]:
    """One of issue 9's parser attacks, cut to fit the soak's size limit.

    Each once froze the whole relay for seconds (quadratic parsing) or wrote
    megabytes of log; each must now be delivered like any other message
    while the other clients notice nothing.
    """
    ident = (
        f"From: <soak-{token}@soak.test>\r\nSubject: soak {token}\r\n"
        f"Message-ID: <soak-{token}@soak.test>\r\n"
    ).encode()
    kind = rng.choice(("header-spaces", "angle-run", "semicolons", "warning-flood", "deep"))
    if kind == "header-spaces":
        head = b"X:" + b" " * rng.randint(5_000, 20_000) + b"\rY\r\n"
        return kind, ident + head + b"\r\nbody\r\n"
    if kind == "angle-run":
        return kind, ident + b"To: <" + b"a" * rng.randint(40_000, 160_000) + b">\r\n\r\nbody\r\n"
    if kind == "semicolons":
        parts = [ident, b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n']
        for n in range(rng.randint(2, 10)):
            parts.append(
                b"--b\r\nContent-Type: text/plain" + b";" * 8_000 + b"\r\n"
                b"Content-Disposition: attachment" + b";" * 8_000 + b"\r\n\r\npart %d\r\n" % n
            )
        return kind, b"".join([*parts, b"--b--\r\n"])
    if kind == "warning-flood":
        fields = b"".join(b"X%d: \xff\r\n" % n for n in range(rng.randint(1_000, 15_000)))
        return kind, ident + fields + b"\r\nbody\r\n"
    depth = rng.randint(20, 200)
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="d%d"\r\n\r\n--d%d\r\n' % (n, n)
        for n in range(depth)
    )
    return kind, ident + opening + b"Content-Type: text/plain\r\n\r\ndeep\r\n"


def hostile(client: Client) -> None:
    """A hostile message in an otherwise honest transaction: it must get its 250."""
    token = client.token()
    client.ledger.hostile.add(token)
    kind, message = hostile_message(client.rng, token)
    client.ledger.variant("hostile/" + kind)
    wire = client.wire()
    try:
        wire.command(b"MAIL FROM:<soak-%s@soak.test>" % token.encode(), 250)
        wire.command(b"RCPT TO:<rcpt@soak.test>", 250)
        wire.command(b"DATA", 354)
        client.ledger.set(token, DOT_SENT)
        wire.send(dot_stuffed(message))
        client.settle(token, *wire.reply())
        wire.command(b"QUIT", 221)
    finally:
        wire.close()


SCENARIOS: tuple[tuple[str, Scenario, int], ...] = (
    ("good-smtplib", good_smtplib, 30),
    ("pipelined", pipelined, 15),
    ("bad-commands", bad_commands, 15),
    ("oversize", oversize, 6),
    ("disconnect", disconnect, 20),
    ("slow", slow, 4),
    ("starttls-raw", starttls_raw, 6),
    ("hostile", hostile, 4),
)


def client_loop(client: Client, deadline: float, stop: threading.Event) -> None:
    """Run random scenarios until the deadline; every surprise goes to the ledger."""
    names = [name for name, _, _ in SCENARIOS]
    runs = {name: run for name, run, _ in SCENARIOS}
    weights = [weight for _, _, weight in SCENARIOS]
    for _ in range(MAX_ITERATIONS):
        if stop.is_set() or time.monotonic() >= deadline:
            return
        name = client.rng.choices(names, weights)[0]
        client.ledger.ran(name)
        try:
            runs[name](client)
        except (UnexpectedReplyError, ClosedError, smtplib.SMTPException, OSError) as e:
            kind = type(e).__name__
            if isinstance(e, UnexpectedReplyError):
                kind += ": " + re.sub(r"'.*", "", str(e))[:60]
            where = f"client {client.phase}{client.cid:03d} seq {client.seq}"
            client.ledger.anomaly(name, kind, f"{where}: {e}")
            if isinstance(e, ConnectionRefusedError):
                stop.wait(0.5)  # the relay is gone: do not spin until the sampler notices
        except Exception as e:  # a bug in this script: report it, keep going
            client.ledger.anomaly(name, f"soak client bug {type(e).__name__}", repr(e))


# -- the relay process --------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The relay's resource use at one moment."""

    at: float
    fds: int
    rss_kb: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def relay_env(port: int, log_level: str) -> dict[str, str]:
    """The environment for the relay: ours, minus any relay settings, plus the soak's."""
    prefixes = (
        *("SMTP_", "SMTPS_", "HTTP_", "TLS_", "LOG_", "GRAPH_", "STDOUT_"),
        *("QUEUE_", "RELAY_", "AUTH_", "MAILBOX_"),
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(prefixes) and key not in ("PROVIDER", "SMTP_PROXY_CONFIG")
    }
    env.update(
        PYTHONPATH=f"{ROOT / 'src'}:{ROOT}",
        PYTHONDONTWRITEBYTECODE="1",
        SMTP_LISTEN=f"{HOST}:{port}",
        HTTP_LISTEN="",
        SMTP_HOSTNAME="soak.test",
        # One JSON object per delivered message: nothing a message holds can
        # forge or split a record, so the audit below can trust every line.
        STDOUT_FORMAT="json",
        LOG_LEVEL=log_level,
        SMTP_MAX_CONNECTIONS_PER_IP="1000",
        SMTP_MAX_MESSAGE_SIZE=str(MAX_MESSAGE_SIZE),
    )
    return env


class Relay:
    """The relay under test, as a real C{twistd} process."""

    def __init__(self, twistd: Path, workdir: Path, port: int, log_level: str = "warn") -> None:
        self.port = port
        self.stdout_path = workdir / "relay.stdout"
        self.stderr_path = workdir / "relay.stderr"
        self._stdout: IO[bytes] = self.stdout_path.open("wb")
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", "smtpproxy"],
            cwd=ROOT,
            env=relay_env(port, log_level),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode} at startup")
            try:
                wire = Wire(self.port)
                try:
                    wire.expect(220, "greeting")
                    wire.command(b"QUIT", 221)
                    return
                finally:
                    wire.close()
            except (OSError, UnexpectedReplyError, ClosedError):
                if time.monotonic() > end:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"relay not answering on {HOST}:{self.port} after {timeout} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> Sample:
        pid = self.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return Sample(time.monotonic(), fds, rss)

    def settled_sample(self, timeout: float = 10.0) -> Sample:
        """A sample once the relay has closed its side of the finished sessions."""
        previous = self.sample()
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.5) + 1):
            time.sleep(0.5)
            current = self.sample()
            if current.fds == previous.fds or time.monotonic() > end:
                return current
            previous = current
        return previous

    def stop(self) -> None:
        """SIGTERM, then wait; a relay that does not stop is killed and reported."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=STOP_TIMEOUT)
            self.stop_seconds = time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.exit_code = None
        finally:
            self._stdout.close()
            self._stderr.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stdout.close()
        self._stderr.close()


class Sampler(threading.Thread):
    """Samples the relay's descriptors and memory every few seconds while clients run."""

    def __init__(self, relay: Relay, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.stop = stop
        self.samples: list[Sample] = []
        self.died = False

    def run(self) -> None:
        for _ in range(int(MAX_MINUTES * 60 / SAMPLE_EVERY) + 10):
            if not self.relay.alive():
                self.died = True
                self.stop.set()  # no point hammering a dead relay
                return
            # OSError: the process ended between the check and the read.
            with contextlib.suppress(OSError):
                self.samples.append(self.relay.sample())
            if self.stop.wait(SAMPLE_EVERY):
                return


class GreetingProbe(threading.Thread):
    """Connects every 100 ms and times the wait for the greeting.

    What one hostile message costs everybody else: a relay that stalls while
    it parses shows up here as a long wait, however well the clients fare.
    """

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = stop
        self.waits: list[float] = []
        self.failed = 0

    def run(self) -> None:
        for _ in range(int(MAX_MINUTES * 60 / 0.1) + 10):
            started = time.monotonic()
            try:
                with socket.create_connection((HOST, self.port), timeout=IO_TIMEOUT) as s:
                    s.recv(512)
                    self.waits.append(time.monotonic() - started)
                    s.sendall(b"QUIT\r\n")
            except OSError:
                self.waits.append(time.monotonic() - started)
                self.failed += 1
            if self.stop.wait(0.1):
                return


def run_clients(
    phase: str,
    count: int,
    seconds: float,
    port: int,
    seed: int,
    ledger: Ledger,
    stop: threading.Event,
) -> list[str]:
    """Run C{count} clients for C{seconds}; return the names of clients that hung."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The relay's certificate is self-signed and generated at startup.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + seconds
    threads: list[tuple[str, threading.Thread]] = []
    for cid in range(count):
        rng = random.Random(f"{seed}-{phase}-{cid}")
        client = Client(phase, cid, port, rng, ledger, context)
        name = f"{phase}{cid:03d}"
        thread = threading.Thread(
            target=client_loop, args=(client, deadline, stop), name=name, daemon=True
        )
        thread.start()
        threads.append((name, thread))
    hung = []
    for name, thread in threads:
        # A scenario in flight at the deadline makes at most a few dozen
        # socket calls, each bounded by IO_TIMEOUT.
        thread.join(max(0.0, deadline - time.monotonic()) + 5 * IO_TIMEOUT)
        if thread.is_alive():
            hung.append(name)
    return hung


# -- the audit ---------------------------------------------------------------


@dataclass
class Delivered:
    """What the stdout provider printed, message by message."""

    counts: Counter[str] = field(default_factory=Counter)
    blocks: int = 0
    unidentified: list[str] = field(default_factory=list)
    crossed: list[str] = field(default_factory=list)


def delivered_blocks(path: Path) -> Iterator[dict[str, str]]:
    """The identifying fields of each delivered message (one JSON object a line)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
                headers = record.get("headers") or {}
                yield {
                    "Envelope-From": str(record["envelope"]["from"]),
                    "Subject": str(headers.get("subject") or ""),
                    "Message-ID": str(headers.get("message_id") or ""),
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                yield {"unparsed": line[:200]}


def read_deliveries(path: Path, hostile: set[str]) -> Delivered:
    delivered = Delivered()
    for block in delivered_blocks(path):
        delivered.blocks += 1
        found = {
            name: TOKEN.search(block.get(name, "")) for name in ("Envelope-From", "Message-ID")
        }
        subject = block.get("Subject", "")
        tokens = {m.group(1) for m in found.values() if m is not None}
        sender = found["Envelope-From"]
        if sender is not None and sender.group(1) in hostile and not block.get("Message-ID"):
            # A hostile message whose parse was abandoned is delivered as
            # raw bytes: only its envelope names it.
            delivered.counts[sender.group(1)] += 1
            continue
        if len(tokens) != 1 or None in found.values():
            delivered.unidentified.append(json.dumps(block)[:200])
            continue
        token = tokens.pop()
        if subject != f"soak {token}":
            delivered.crossed.append(f"{token}: Subject {subject[:60]!r}")
        delivered.counts[token] += 1
    return delivered


@dataclass
class LogFindings:
    """What the relay's JSON log on stderr says about itself."""

    levels: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    tracebacks: int = 0
    not_json: list[str] = field(default_factory=list)


def read_log(path: Path) -> LogFindings:
    findings = LogFindings()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if "Traceback" in line:
                findings.tracebacks += 1
            try:
                event = json.loads(line)
            except ValueError:
                if line.strip() and len(findings.not_json) < 20:
                    findings.not_json.append(line.rstrip()[:300])
                continue
            if not isinstance(event, dict):
                continue
            level = str(event.get("level", "?"))
            findings.levels[level] += 1
            findings.messages[f"{level}: {event.get('msg', '')}"[:120]] += 1
            if level in ("error", "critical") and len(findings.errors) < 20:
                findings.errors.append(line.rstrip()[:600])
    return findings


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


def audit(
    ledger: Ledger,
    delivered: Delivered,
    log: LogFindings,
    relay: Relay,
    start: Sample,
    end: Sample,
    samples: list[Sample],
    hung: list[str],
    relay_died: bool,
    probe: GreetingProbe,
) -> tuple[list[str], list[str]]:
    """The report lines and the list of failures (empty: the run passed)."""
    lines: list[str] = []
    failures: list[str] = []
    states = Counter(ledger.states.values())
    accepted = {t for t, s in ledger.states.items() if s == ACCEPTED}
    reply_lost = {t for t, s in ledger.states.items() if s == DOT_SENT}
    lost = sorted(accepted - set(delivered.counts))
    duplicated = sorted(t for t, n in delivered.counts.items() if n > 1)
    phantom = sorted(
        f"{t} ({ledger.states.get(t, 'never sent')})"
        for t in delivered.counts
        if t not in accepted and t not in reply_lost
    )
    lost_delivered = len(reply_lost & set(delivered.counts))

    lines.append(
        "Scenarios run: " + ", ".join(f"{k} {v}" for k, v in ledger.scenarios.most_common())
    )
    lines.append("Variants: " + ", ".join(f"{k} {v}" for k, v in sorted(ledger.variants.items())))
    lines.append(
        f"Messages: {len(ledger.states)} started; {states[ACCEPTED]} accepted (250 after the dot); "
        f"{states[REJECTED]} refused after the dot; {states[STARTED]} abandoned before the dot; "
        f"{states[DOT_SENT]} with the reply lost ({lost_delivered} of them delivered)"
    )
    lines.append(
        f"Delivered: {delivered.blocks} blocks on stdout, {len(delivered.counts)} distinct messages"
    )
    for label, items in (
        ("LOST (accepted, never delivered)", lost),
        ("DUPLICATED (delivered more than once)", duplicated),
        ("PHANTOM (delivered, never accepted)", phantom),
        ("UNIDENTIFIED blocks", delivered.unidentified),
        ("CROSSED (fields of two messages mixed)", delivered.crossed),
    ):
        lines.append(f"{label}: {len(items)}" + (f"  e.g. {items[:10]}" if items else ""))
        if items:
            failures.append(f"{len(items)} {label.split(' ')[0].lower()}")

    waits = sorted(probe.waits)
    if waits:
        lines.append(
            f"Greeting probe: {len(waits)} connections, longest wait {waits[-1] * 1000:.0f} ms, "
            f"p99 {waits[int(len(waits) * 0.99)] * 1000:.0f} ms, {probe.failed} failed"
        )
        if waits[-1] > MAX_STALL:
            failures.append(f"a greeting waited {waits[-1]:.1f} s (the relay stalled)")
    if probe.failed:
        failures.append(f"{probe.failed} probe connections failed")

    peak_fds = max([start.fds, end.fds, *(s.fds for s in samples)])
    peak_rss = max([start.rss_kb, end.rss_kb, *(s.rss_kb for s in samples)])
    lines.append(
        f"File descriptors: start {start.fds}, end {end.fds}, max {peak_fds} "
        f"({len(samples)} samples while loaded)"
    )
    lines.append(f"RSS: start {mb(start.rss_kb)}, end {mb(end.rss_kb)}, max {mb(peak_rss)}")
    if samples:
        # A leak shows as a steady climb; noise as a plateau.
        picked = (
            [samples[i * (len(samples) - 1) // 11] for i in range(12)]
            if len(samples) > 12
            else samples
        )
        lines.append(
            "    while loaded, fds/RSS MB: "
            + " ".join(f"{s.fds}/{s.rss_kb / 1024:.1f}" for s in picked)
        )
    if end.fds - start.fds > MAX_FD_GROWTH:
        failures.append(f"file descriptors grew by {end.fds - start.fds}")
    if end.rss_kb - start.rss_kb > MAX_RSS_GROWTH_KB:
        failures.append(f"RSS grew by {mb(end.rss_kb - start.rss_kb)}")

    if relay.exit_code is None:
        lines.append(f"Relay: did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM (killed)")
        failures.append("relay did not stop on SIGTERM")
    else:
        lines.append(
            f"Relay: exit code {relay.exit_code}, {relay.stop_seconds:.2f} s after SIGTERM"
        )
        if relay.exit_code != 0:
            failures.append(f"relay exit code {relay.exit_code}")
    if relay_died:
        failures.append("relay died during the run")

    lines.append(
        "Relay log: "
        + (", ".join(f"{k} {v}" for k, v in sorted(log.levels.items())) or "empty")
        + f"; {log.tracebacks} lines mentioning a traceback"
    )
    for message, count in log.messages.most_common(10):
        lines.append(f"    {count:6d}  {message}")
    for error in log.errors:
        lines.append(f"    ERROR LINE: {error}")
    for other in log.not_json:
        lines.append(f"    NOT JSON: {other}")
    if log.tracebacks:
        failures.append(f"{log.tracebacks} traceback lines in the relay log")
    bad_levels = log.levels["error"] + log.levels["critical"]
    if bad_levels:
        failures.append(f"{bad_levels} error/critical log lines")

    surprises = sum(a.count for a in ledger.anomalies.values())
    lines.append(f"Client-side surprises (wrong reply, unexpected close, timeout): {surprises}")
    for key, anomaly in sorted(ledger.anomalies.items(), key=lambda kv: -kv[1].count):
        lines.append(f"    {anomaly.count:6d}  {key}")
        lines.append(f"            e.g. {anomaly.example[:300]}")
    if surprises:
        failures.append(f"{surprises} unexpected replies, closes or timeouts")
    if hung:
        failures.append(f"clients still blocked after the deadline: {', '.join(hung)}")
    return lines, failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--minutes", type=float, default=1.0, help="duration (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"run {QUICK_SECONDS:.0f} s only")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default 5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="where relay output goes")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warn"),
        default="warn",
        help="the relay's LOG_LEVEL (default warn; debug and info show more, slower)",
    )
    parser.add_argument("--twistd", type=Path, default=TWISTD, help="the twistd to run")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be between 1 and {MAX_CLIENTS}")
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be above 0 and at most {MAX_MINUTES:.0f}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seconds = QUICK_SECONDS if args.quick else args.minutes * 60
    warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 5.0)
    warmup = min(max(warmup, 0.0), 60.0)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smtpproxy-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    print(
        f"soak: {args.clients} clients, {warmup:.0f} s warm-up + {seconds:.0f} s, seed {seed}, "
        f"relay on {HOST}:{port}, output in {workdir}",
        flush=True,
    )

    ledger = Ledger()
    stop = threading.Event()
    relay = Relay(args.twistd, workdir, port, args.log_level)
    sampler = Sampler(relay, stop)
    probe = GreetingProbe(port, stop)
    try:
        relay.wait_ready()
        hung = run_clients("w", args.clients, warmup, port, seed, ledger, stop)
        if not relay.alive():
            raise RuntimeError(f"relay exited with {relay.proc.returncode} during the warm-up")
        start = relay.settled_sample()
        sampler.start()
        probe.start()
        began = time.monotonic()
        hung += run_clients("m", args.clients, seconds, port, seed, ledger, stop)
        elapsed = time.monotonic() - began
        stop.set()
        sampler.join(SAMPLE_EVERY + 5)
        probe.join(IO_TIMEOUT + 5)
        relay_died = sampler.died or not relay.alive()
        if relay_died:
            end = sampler.samples[-1] if sampler.samples else start
        else:
            end = relay.settled_sample()
        relay.stop()
    except RuntimeError as e:
        relay.kill()
        tail = relay.stderr_path.read_text(errors="replace")[-2000:]
        print(f"FAIL: {e}\nrelay stderr ends with:\n{tail}")
        return 1
    except BaseException:
        relay.kill()
        raise

    delivered = read_deliveries(relay.stdout_path, ledger.hostile)
    log = read_log(relay.stderr_path)
    lines, failures = audit(
        ledger, delivered, log, relay, start, end, sampler.samples, hung, relay_died, probe
    )
    accepted = sum(1 for s in ledger.states.values() if s == ACCEPTED)
    print(SEPARATOR)
    print(
        f"smtpproxy soak: {args.clients} clients, {elapsed:.0f} s loaded "
        f"(+{warmup:.0f} s warm-up), seed {seed}; "
        f"{accepted / (elapsed + warmup):.0f} accepted messages/s"
    )
    print(SEPARATOR)
    for line in lines:
        print(line)
    print(SEPARATOR)
    if failures:
        print("FAIL: " + "; ".join(failures))
    else:
        print("PASS: nothing lost, doubled or leaked; clean log and clean stop")
    print(f"relay stdout: {relay.stdout_path}\nrelay stderr: {relay.stderr_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
