"""Test helpers: a real relay on loopback, a recording provider, raw clients.

The provider here is a test double for the *backend*, never for the code
under test: the SMTP server, the parser and the delivery path all run for
real, over real sockets.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smtpproxy import tls
from smtpproxy.config import Config
from smtpproxy.delivery import RelayRealm
from smtpproxy.mime.message import Email
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.policy.guard import Guard, GuardSettings, settings_from
from smtpproxy.policy.rules import parse_networks
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import SessionSettings
from smtpproxy.smtp.sasl import StaticPasswordChecker
from smtpproxy.smtp.session import session_settings

USER = "relay-user"
PASSWORD = "s3cret-Pa55"
TIMEOUT = 10.0

_CERT: tuple[bytes, bytes] | None = None


def session_defaults(**changes: Any) -> SessionSettings:
    """The session settings a default configuration gives (host name C{relay.test}), changed.

    The defaults are read from L{smtpproxy.config}, where each is declared
    once; production code has no second copy for tests to lean on.
    """
    base = session_settings(Config(smtp_hostname="relay.test"))
    return dataclasses.replace(base, **changes)


def guard_defaults(**changes: Any) -> GuardSettings:
    """The guard settings a default configuration gives, with C{changes}."""
    return dataclasses.replace(settings_from(Config()), **changes)


#: No network restriction, the guard's other defaults: what tests on loopback
#: use.  The relay itself always builds its guard from the settings.
OPEN = guard_defaults(allowed_networks=parse_networks("0.0.0.0/0 ::/0"))


def open_guard(settings: SessionSettings, reactor: IReactorTime) -> Guard:
    """A guard admitting every address, asking for AUTH when C{settings} enable it."""
    return Guard(dataclasses.replace(OPEN, auth_enabled=settings.auth_enabled), reactor)


def certificate() -> tuple[bytes, bytes]:
    """One self-signed certificate for the whole test run (generation is slowish)."""
    global _CERT
    if _CERT is None:
        _CERT = tls.self_signed("relay.test")
    return _CERT


@dataclass
class RecordingProvider:
    """A backend that records what it is given.

    By default it accepts at once.  Tests that need the backend to be slow or
    to fail push a Deferred or an exception onto C{outcomes}; each send takes
    the next one.
    """

    name: str = "recording"
    emails: list[Email] = field(default_factory=list)
    accepts_raw_mime: bool = False
    outcomes: list[defer.Deferred[None] | BaseException] = field(default_factory=list)
    closed: bool = False

    def send(self, email: Email) -> defer.Deferred[None]:
        self.emails.append(email)
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, BaseException):
                return defer.fail(outcome)
            return outcome
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


@dataclass
class Relay:
    """A listening relay and what it needs for assertions."""

    port: int
    factory: RelayFactory
    provider: RecordingProvider
    listening: IListeningPort


def start_relay(
    case: TestCase,
    *,
    auth: bool = False,
    tls_enabled: bool = True,
    provider: RecordingProvider | None = None,
    guard: GuardSettings | None = None,
    parser: MessageParser | None = None,
    **settings: Any,
) -> Relay:
    """Listen on 127.0.0.1 with an ephemeral port; stopped by the test's cleanup."""
    from twisted.internet import reactor

    provider = provider or RecordingProvider()
    portal = Portal(RelayRealm(provider, reactor, parser=parser))
    portal.registerChecker(AllowAnonymousAccess())
    if auth:
        portal.registerChecker(StaticPasswordChecker(USER, PASSWORD))
    options = tls.server_context(*certificate()) if tls_enabled else None
    if auth:
        settings.setdefault("auth_users", (USER,))
    session = session_defaults(auth_enabled=auth, **settings)
    if guard is None:
        guard = dataclasses.replace(OPEN, auth_enabled=auth)
    factory = RelayFactory(session, portal, options, reactor, Guard(guard, reactor))
    listening: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")

    def stop() -> defer.Deferred[None]:
        for session_protocol in list(factory.sessions):
            session_protocol._tcp.abortConnection()
        stopped: defer.Deferred[None] = defer.maybeDeferred(listening.stopListening)
        return stopped

    case.addCleanup(stop)
    return Relay(listening.getHost().port, factory, provider, listening)


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """Run a blocking client (smtplib, a raw socket) beside the reactor."""
    return deferToThread(function, *args, **kwargs)


def read_replies(sock: socket.socket | ssl.SSLSocket, count: int) -> list[str]:
    """Read until C{count} complete replies arrived (or the server closed)."""
    data = b""
    replies: list[str] = []
    while len(replies) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        while b"\r\n" in data:
            line, data = data.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            if len(text) >= 4 and text[3] == "-":
                continue
            replies.append(text)
    return replies


def exchange(port: int, sends: Sequence[bytes], replies_after_each: Sequence[int]) -> list[str]:
    """Connect, read the greeting, then for each send read the given number of replies.

    Returns every final reply line, greeting first.  Blocking: use L{in_thread}.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        out = read_replies(sock, 1)
        for data, count in zip(sends, replies_after_each, strict=True):
            sock.sendall(data)
            out += read_replies(sock, count)
        return out


def codes(replies: Sequence[str]) -> list[int]:
    return [int(r[:3]) for r in replies]


def message(subject: str = "Hello", body: str = "Body text.\r\n", **headers: str) -> bytes:
    lines = {
        "From": "Sender <sender@example.com>",
        "To": "rcpt@example.org",
        "Subject": subject,
        "Message-ID": "<test-1@example.com>",
    }
    lines.update({k.replace("_", "-"): v for k, v in headers.items()})
    head = "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    return (head + "\r\n" + body).encode("utf-8")


def async_test(
    method: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., defer.Deferred[None]]:
    """Let trial run an C{async def} test method (trial waits on the Deferred)."""

    @functools.wraps(method)
    def run(*args: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(method(*args))

    return run


def listen_behind_proxy(case: TestCase, relay: Relay) -> int:
    """Also listen for PROXY-protocol connections to C{relay}; return the port."""
    from twisted.internet import reactor

    from smtpproxy.smtp.proxyheader import ProxyHeaderFactory

    wrapped: Any = ProxyHeaderFactory(relay.factory, reactor)
    port: Any = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


def until_ehlo_reply(port: int, data: bytes) -> bytes:
    """Send C{data} on a new connection; return what the relay says up to the end of its
    EHLO reply, or until it closes (a reset counts as closing).  Blocking: use L{in_thread}."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n250 " not in received:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"


def client_tls() -> ssl.SSLContext:
    """A client context that accepts the relay's self-signed test certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def sendmail(port: int, sender: str, recipients: list[str], data: bytes, **kw: Any) -> Any:
    """smtplib, optionally with STARTTLS (starttls=True) and AUTH (login=(user, pw))."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        if kw.get("starttls"):
            client.starttls(context=client_tls())
        if kw.get("login"):
            client.login(*kw["login"])
        return client.sendmail(sender, recipients, data)


class RecordingStream(io.StringIO):
    """A real text stream that also remembers each write call and each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def open_files_under(directory: str, pid: int | str = "self") -> list[str]:
    """Where a process's open descriptors point, for those inside C{directory}.

    An unlinked file reads as C{/dir/#inode (deleted)} (or C{/dir/name
    (deleted)}); descriptors that close while we look are skipped.
    """
    base = os.path.abspath(directory) + os.sep
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(base):
            found.append(target)
    return found


def wait_until(condition: Callable[[], bool], what: str, limit: float = 60) -> None:
    """Poll C{condition} from a thread until it holds; fail naming C{what} after C{limit} s.

    60 s, as a twistd started by a test may start slowly on a loaded machine.
    """
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
