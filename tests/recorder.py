"""Recorded SMTP sessions: a fixed set of random sessions and the replies they got.

A refactoring of the SMTP front door must not change a single reply byte.
This module generates a few thousand random but reproducible sessions
(greetings, AUTH, STARTTLS, transactions with DATA, pipelined groups, bad
commands, abrupt ends), runs each through a real session over an in-memory
transport with a L{Clock}, and records what the server wrote and what it
delivered.  The recording is kept in C{tests/data/recorded_sessions.json.gz};
C{tests.test_recorded_sessions} replays the same sessions against the code
of the day and compares.

Re-record only when a reply is meant to change, and say why in the commit::

    PYTHONPATH=src:. .venv/bin/python -m tests.recorder --record
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from smtpproxy import tls
from smtpproxy.delivery import RelayRealm
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.sasl import StaticPasswordChecker
from tests.support import (
    PASSWORD,
    USER,
    RecordingProvider,
    certificate,
    open_guard,
    session_defaults,
)

RECORDING = Path(__file__).parent / "data" / "recorded_sessions.json.gz"
SEED = 20261130
SESSIONS = 3000
_ID = re.compile(rb"delivered as [0-9a-f]{12}")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """An in-memory transport that can 'start TLS': the protocol's side of STARTTLS runs,
    the handshake itself is not what is recorded."""

    tls_started = False

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started = True

    # The rest of ITCPTransport, which ITLSTransport extends: nothing to do here.
    def loseWriteConnection(self) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


def _plain(user: str, password: str) -> bytes:
    import base64

    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def _b64(text: str) -> bytes:
    import base64

    return base64.b64encode(text.encode())


@dataclass(frozen=True)
class Session:
    """One recorded session: the settings it ran under and what the client wrote."""

    auth: bool
    writes: tuple[bytes, ...]


def _body(rng: random.Random) -> bytes:
    lines = [b"From: a@example.com", b"To: b@example.org", b"Subject: s%d" % rng.randrange(99)]
    if rng.random() < 0.3:
        lines += [b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=utf-8"]
    lines.append(b"")
    for _ in range(rng.randrange(8)):
        roll = rng.random()
        if roll < 0.15:
            lines.append(b"." + b"x" * rng.randrange(5))  # stuffed on the wire
        elif roll < 0.2:
            lines.append(b"y" * rng.randrange(900, 4000))  # over the test's size limit
        elif roll < 0.25:
            lines.append("caf\u00e9".encode())
        else:
            lines.append(b"line %d" % rng.randrange(1000))
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def _commands(rng: random.Random, auth: bool) -> list[bytes]:
    """A session's client side as a list of command lines (and DATA bodies)."""
    out: list[bytes] = []
    roll = rng.random()
    if roll < 0.8:
        out.append(b"EHLO client.example")
    elif roll < 0.9:
        out.append(b"HELO client.example")
    elif roll < 0.95:
        out.append(b"EHLO")
    if rng.random() < 0.15:
        out += [b"STARTTLS", b"EHLO client.example"]
    if auth or rng.random() < 0.1:
        roll = rng.random()
        if roll < 0.5:
            out.append(b"AUTH PLAIN " + _plain(USER, PASSWORD))
        elif roll < 0.65:
            out.append(b"AUTH PLAIN " + _plain(USER, "wrong"))
        elif roll < 0.8:
            out += [b"AUTH LOGIN", _b64(USER), _b64(PASSWORD)]
        elif roll < 0.9:
            out += [b"AUTH LOGIN", b"*"]
        else:
            out.append(b"AUTH CRAM-MD5")
    for _ in range(rng.randrange(4)):
        sender = rng.choice(
            [
                b"<a@example.com>",
                b"<>",
                b"<a@example.com> SIZE=100",
                b"<bad",
                b"<a@[127.0.0.1]>",
                b"<a@example.com> RET=HDRS ENVID=x+2By",
                b"<a@example.com> BODY=BINARYMIME",
                b"<a@example.com> SMTPUTF8",
            ]
        )
        out.append(b"MAIL FROM:" + sender)
        for _ in range(rng.randrange(5)):
            out.append(
                b"RCPT TO:"
                + rng.choice(
                    [
                        *(b"<r%d@example.org>" % n for n in range(5)),
                        b"<b@example.org>",
                        b"<B@EXAMPLE.ORG>",
                        b"<x",
                        b"<>",
                        b"<r1@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r1@example.org",
                        b"<r2@example.org> NOTIFY=bogus",
                    ]
                )
            )
        roll = rng.random()
        if roll < 0.55:
            out += [b"DATA", _body(rng)]
        elif roll < 0.7:
            # CHUNKING: the body in one to three BDAT chunks, unstuffed.
            body = _body(rng)[: -len(b".\r\n")]
            cuts = sorted(rng.randrange(len(body) + 1) for _ in range(rng.randrange(3)))
            pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            for n, piece in enumerate(pieces):
                last = b" LAST" if n == len(pieces) - 1 else b""
                out.append(b"BDAT %d%s\r\n%s" % (len(piece), last, piece))
        elif roll < 0.85:
            out.append(b"RSET")
        for _ in range(rng.randrange(3)):
            out.append(
                rng.choice(
                    [b"NOOP", b"VRFY x", b"HELP", b"EXPN x", b"bogus", b"noop", b"RSET", b"\x00"]
                )
            )
    if rng.random() < 0.8:
        out.append(b"QUIT")
    return out


def generate(seed: int = SEED, count: int = SESSIONS) -> list[Session]:
    """The same C{count} sessions for the same C{seed}, on any machine."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(count):
        auth = rng.random() < 0.3
        commands = _commands(rng, auth)
        stream = [
            c if c.endswith(b".\r\n") or c.startswith(b"BDAT ") else c + b"\r\n" for c in commands
        ]
        writes: list[bytes] = []
        roll = rng.random()
        if roll < 0.5:
            writes = stream  # lock step: one command a write
        elif roll < 0.8:
            # Pipelined groups of a few commands each.
            i = 0
            while i < len(stream):
                n = rng.randrange(1, 5)
                writes.append(b"".join(stream[i : i + n]))
                i += n
        else:
            # One stream cut at arbitrary points.
            data = b"".join(stream)
            i = 0
            while i < len(data):
                n = rng.randrange(1, 200)
                writes.append(data[i : i + n])
                i += n
        sessions.append(Session(auth, tuple(writes)))
    return sessions


_TLS: Any = None


def run(session: Session) -> dict[str, Any]:
    """Replay one session; the server's bytes (ids normalised) and its deliveries."""
    global _TLS
    if _TLS is None:
        _TLS = tls.server_context(*certificate())
    clock = Clock()
    provider = RecordingProvider()
    portal = Portal(RelayRealm(provider, clock))
    portal.registerChecker(AllowAnonymousAccess())
    portal.registerChecker(StaticPasswordChecker(USER, PASSWORD))
    settings = session_defaults(
        max_message_size=3000,
        max_recipients=3,
        auth_enabled=session.auth,
        allow_insecure_auth=True,
    )
    factory = RelayFactory(settings, portal, _TLS, clock, open_guard(settings, clock))
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000))
    protocol.makeConnection(transport)
    for write in session.writes:
        if transport.disconnecting:
            break
        protocol.dataReceived(write)
        clock.advance(1)
    clock.advance(10_000)
    protocol.connectionLost(None)
    replies = _ID.sub(b"delivered as <id>", transport.value())
    delivered = [
        [e.envelope_from, list(e.envelope_to), hashlib.sha256(e.raw).hexdigest()[:16]]
        for e in provider.emails
    ]
    return {"replies": replies.decode("utf-8", "surrogateescape"), "delivered": delivered}


def record(path: Path = RECORDING) -> None:
    results = [run(session) for session in generate()]
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seed": SEED, "sessions": SESSIONS, "results": results}
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=True, separators=(",", ":"))


def load(path: Path = RECORDING) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
        return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--record", action="store_true", help=f"write {RECORDING}")
    args = parser.parse_args()
    if args.record:
        record()
        print(f"recorded {SESSIONS} sessions into {RECORDING}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
