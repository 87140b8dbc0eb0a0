"""TLS hardening, connection storms and a bounded shutdown (issue 9: L2, L3, storms).

Found by attacking the relay from outside: a 1024-bit RSA certificate
passed the start-up check and every STARTTLS then leaked its session (two
critical tracebacks each, a per-address cap that locked the client out, a
SIGTERM that never finished); TLS 1.2 accepted static-RSA suites; and idle
connections filling C{SMTP_MAX_CONNECTIONS} locked everyone out for the
300 s command timeout.

Start-up checks go through C{tap.Options} as twistd does; cipher suites are
tested with C{openssl s_client}; handshake failures with raw sockets and
openssl against a real listener; timers with a L{Clock}; SIGTERM and storms
against a real C{twistd} process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from smtpproxy import tap, tls
from smtpproxy.delivery import RelayRealm
from smtpproxy.policy import pressure
from smtpproxy.policy.guard import Guard
from smtpproxy.smtp.closing import CLOSE_GRACE
from smtpproxy.smtp.factory import FORCE_GRACE, RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from tests.support import (
    OPEN,
    TIMEOUT,
    RecordingProvider,
    async_test,
    in_thread,
    read_replies,
    session_defaults,
    start_relay,
)
from tests.test_twistd import Relay as TwistdRelay

_ONE_HOUR = timedelta(hours=1)


# --- certificates --------------------------------------------------------


def _certificate(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _ONE_HOUR)
        .not_valid_after(not_after or now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )


def _pems(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _weak_rsa() -> rsa.RSAPrivateKey:
    """The 1024-bit key of the finding."""
    return rsa.generate_private_key(65537, 1024)  # noqa: S505 - weak on purpose: must be refused


_RSA2048: tuple[bytes, bytes] | None = None


def rsa2048() -> tuple[bytes, bytes]:
    """One RSA-2048 certificate and key for the module (RSA generation is slowish)."""
    global _RSA2048
    if _RSA2048 is None:
        key = rsa.generate_private_key(65537, 2048)
        _RSA2048 = _pems(key, _certificate(key))
    return _RSA2048


def _write_pair(case: TestCase | SynchronousTestCase, pems: tuple[bytes, bytes]) -> dict[str, str]:
    directory = case.mktemp()
    os.makedirs(directory)
    env = {"SMTP_HOSTNAME": "relay.test"}
    for setting, name, data in zip(
        ("TLS_CERT_FILE", "TLS_KEY_FILE"), ("cert.pem", "key.pem"), pems, strict=True
    ):
        env[setting] = os.path.join(directory, name)
        with open(env[setting], "wb") as f:
            f.write(data)
    return env


def _start_up(env: dict[str, str]) -> str | None:
    """Run twistd's option parsing; the one-line refusal, or None if it would start."""
    options = tap.Options(environ=env)
    try:
        options.parseOptions([])
    except SystemExit as e:
        return str(e)
    return None


class StartupCertificateTests(SynchronousTestCase):
    """A certificate TLS cannot safely use stops the relay with one line naming the file."""

    def test_SEC_045_weak_keys_refused_at_startup(self) -> None:
        """RSA under 2048 bits and EC under 256 bits are refused before anything listens.

        The 1024-bit RSA key is the one from the finding: it used to pass and
        fail later inside every client's STARTTLS.
        """
        weak_rsa = _weak_rsa()
        weak_ec = ec.generate_private_key(ec.SECP192R1())
        for key, bits in ((weak_rsa, "1024 bits"), (weak_ec, "192 bits")):
            env = _write_pair(self, _pems(key, _certificate(key)))
            refusal = _start_up(env)
            assert refusal is not None, f"{bits} key accepted"
            self.assertEqual(len(refusal.splitlines()), 1)
            self.assertIn(repr(env["TLS_KEY_FILE"]), refusal)
            self.assertIn(bits, refusal)
        # Control: the smallest sizes allowed start.
        self.assertIsNone(_start_up(_write_pair(self, rsa2048())))
        p256 = ec.generate_private_key(ec.SECP256R1())
        self.assertIsNone(_start_up(_write_pair(self, _pems(p256, _certificate(p256)))))

    def test_SEC_046_expired_or_future_certificate_refused_at_startup(self) -> None:
        """A certificate past its end, or before its start, is refused at start-up."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cases = (
            ("expired", _certificate(key, now - timedelta(days=30), now - _ONE_HOUR)),
            ("not valid until", _certificate(key, now + _ONE_HOUR, now + timedelta(days=30))),
        )
        for wording, cert in cases:
            env = _write_pair(self, _pems(key, cert))
            refusal = _start_up(env)
            assert refusal is not None, f"{wording}: certificate accepted"
            self.assertEqual(len(refusal.splitlines()), 1)
            self.assertIn(f"TLS_CERT_FILE {env['TLS_CERT_FILE']!r}", refusal)
            self.assertIn(wording, refusal)


# --- cipher suites over the wire -----------------------------------------


def _s_client(port: int, *args: str) -> str | None:
    """STARTTLS with openssl s_client; the negotiated suite, or None if the handshake failed."""
    done = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    for line in done.stdout.decode("ascii", "replace").splitlines():
        if ", Cipher is " in line:
            cipher = line.rsplit(" ", 1)[1]
            return None if cipher == "(NONE)" else cipher
    return None


def _needs_openssl() -> None:
    if shutil.which("openssl") is None:
        raise SkipTest("openssl is installed by .ci/run")


def _rsa_relay(case: TestCase, **kw: Any) -> Any:
    """A loopback relay serving the RSA-2048 certificate (the finding was about RSA)."""
    relay = start_relay(case, **kw)
    relay.factory.tls_options = tls.server_context(*rsa2048())
    return relay


class CipherSuiteTests(TestCase):
    """TLS 1.2 negotiates only forward-secret AEAD suites; TLS 1.3 works."""

    @async_test
    async def test_SEC_047_tls12_forward_secret_aead_only(self) -> None:
        """Static-RSA and CBC suites fail the handshake; ECDHE with GCM or ChaCha20 succeed."""
        _needs_openssl()
        relay = _rsa_relay(self)

        def probe() -> dict[str, str | None]:
            results: dict[str, str | None] = {}
            for suite in (
                "AES128-SHA",
                "AES256-GCM-SHA384",
                "ECDHE-RSA-AES128-SHA",
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-RSA-CHACHA20-POLY1305",
            ):
                results[suite] = _s_client(relay.port, "-tls1_2", "-cipher", suite)
            results["TLS 1.3"] = _s_client(relay.port, "-tls1_3")
            return results

        results = await in_thread(probe)
        self.assertIsNone(results["AES128-SHA"])
        self.assertIsNone(results["AES256-GCM-SHA384"])
        self.assertIsNone(results["ECDHE-RSA-AES128-SHA"])
        for suite in (
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-RSA-CHACHA20-POLY1305",
        ):
            self.assertEqual(results[suite], suite)
        self.assertIsNotNone(results["TLS 1.3"])
        assert results["TLS 1.3"] is not None
        self.assertTrue(results["TLS 1.3"].startswith("TLS_"))


# --- handshake failures and slots ------------------------------------------


def _weak_context() -> CertificateOptions:
    """What the relay used to build from a 1024-bit RSA file: OpenSSL refuses it on first use."""
    key = _weak_rsa()
    return CertificateOptions(
        privateKey=cast(crypto.PKey, key),
        certificate=cast(crypto.X509, _certificate(key)),
    )


def _starttls(port: int) -> tuple[socket.socket, list[str]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    replies = read_replies(sock, 1)
    sock.sendall(b"EHLO client.test\r\n")
    replies += read_replies(sock, 1)
    sock.sendall(b"STARTTLS\r\n")
    replies += read_replies(sock, 1)
    return sock, replies


def _greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        return read_replies(sock, 1)[0]


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (True) or the timeout passes (False)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def _until(predicate: Any, limit: float) -> float:
    """Poll the reactor until C{predicate()}; the seconds it took (fails after C{limit})."""
    from twisted.internet import reactor

    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s")
        await deferLater(reactor, 0.05, lambda: None)
    return time.monotonic() - started


class HandshakeFailureTests(TestCase):
    """A failed or stalled TLS start ends its session and frees its slot; no traceback.

    The per-address cap is 2 and each case runs 3 times, so a leaked slot
    shows as a 421 for the next client.  Trial fails a test on any error
    logged meanwhile, which covers "no critical traceback".
    """

    per_ip = dataclasses.replace(OPEN, max_connections_per_ip=2)

    @async_test
    async def test_SEC_048_refused_tls_context_does_not_leak_the_session(self) -> None:
        """The L2 path: a context OpenSSL refuses at STARTTLS gets 454, and nothing leaks.

        (The start-up check of SEC-045 keeps such a context from being
        configured; this proves the session survives one anyway.)
        """
        relay = start_relay(self, guard=self.per_ip)
        relay.factory.tls_options = _weak_context()

        def attempts() -> list[list[str]]:
            out = []
            for _ in range(3):
                sock, replies = _starttls(relay.port)
                with sock:
                    sock.sendall(b"QUIT\r\n")
                    out.append(replies + read_replies(sock, 1))
            return out

        for replies in await in_thread(attempts):
            self.assertEqual([r[:3] for r in replies], ["220", "250", "454", "221"])
        await _until(lambda: not relay.factory.sessions, CLOSE_GRACE)
        self.assertEqual(relay.factory.guard.connections.total, 0)
        self.assertTrue((await in_thread(_greeting, relay.port)).startswith("220 "))

    @async_test
    async def test_SEC_049_failed_handshakes_free_their_slots(self) -> None:
        """Garbage instead of a ClientHello, or only refused suites: the session ends at once."""
        _needs_openssl()
        relay = _rsa_relay(self, guard=self.per_ip)

        def attempts() -> tuple[list[bool], list[str | None]]:
            closed = []
            for _ in range(3):
                sock, _ = _starttls(relay.port)
                with sock:
                    sock.sendall(b"this is not a TLS ClientHello\r\n" * 8)
                    closed.append(_closed_by_server(sock))
            refused = [_s_client(relay.port, "-tls1_2", "-cipher", "AES128-SHA") for _ in range(3)]
            return closed, refused

        closed, refused = await in_thread(attempts)
        self.assertEqual(closed, [True] * 3)
        self.assertEqual(refused, [None] * 3)
        await _until(lambda: not relay.factory.sessions, CLOSE_GRACE)
        self.assertEqual(relay.factory.guard.connections.total, 0)
        self.assertTrue((await in_thread(_greeting, relay.port)).startswith("220 "))

    @async_test
    async def test_SEC_049_stalled_handshake_cut_after_greeting_timeout(self) -> None:
        """STARTTLS then silence holds a slot only for the greeting timeout, not 300 s."""
        relay = start_relay(self, guard=self.per_ip, greeting_timeout=1.0)
        stalled = [
            (await in_thread(_starttls, relay.port))[0],
            (await in_thread(_starttls, relay.port))[0],
        ]
        try:
            self.assertIn("421 4.7.0", await in_thread(_greeting, relay.port))
            took = await _until(lambda: not relay.factory.sessions, 1.0 + CLOSE_GRACE)
            self.assertTrue((await in_thread(_greeting, relay.port)).startswith("220 "))
        finally:
            for sock in stalled:
                sock.close()
        self.assertLess(took, 1.0 + CLOSE_GRACE)


# --- shutdown ------------------------------------------------------------------


class _DeafTransport(StringTransport):
    """A transport that never reports the end of the connection, whatever it is asked.

    The state the broken TLS layer of L2 left a session in: closing and
    aborting do nothing, so C{connectionLost} never comes.
    """

    aborts = 0

    def abortConnection(self) -> None:
        self.aborts += 1


def _factory(clock: Clock, **settings: Any) -> RelayFactory:
    portal = Portal(RelayRealm(RecordingProvider(), clock))
    portal.registerChecker(AllowAnonymousAccess())
    guard_settings = dataclasses.replace(OPEN, max_connections=settings.pop("max_connections", 0))
    session = session_defaults(**settings)
    return RelayFactory(session, portal, None, clock, Guard(guard_settings, clock))


def _connect(
    factory: RelayFactory, transport: StringTransport | None = None
) -> tuple[RelayProtocol, StringTransport]:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
    transport = transport or StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
    protocol.makeConnection(transport)
    return protocol, transport


def _codes(transport: StringTransport) -> list[str]:
    lines = transport.value().decode("ascii", "replace").split("\r\n")
    return [line[:9] for line in lines if line[3:4] == " "]


class IdleLimitTests(SynchronousTestCase):
    """Silent clients cannot hold the session table: the greeting limit, and stress."""

    def test_SEC_051_silent_client_cut_after_greeting_timeout(self) -> None:
        """No command within SMTP_GREETING_TIMEOUT: 421 4.4.2; after one, the command timeout."""
        clock = Clock()
        factory = _factory(clock, greeting_timeout=30.0, command_timeout=300.0)
        _, silent = _connect(factory)
        talker, talking = _connect(factory)
        clock.advance(10)
        talker.dataReceived(b"EHLO client.test\r\n")
        clock.advance(19.5)
        self.assertFalse(silent.disconnecting)
        clock.advance(1)
        self.assertEqual(_codes(silent), ["220 relay", "421 4.4.2"])
        self.assertTrue(silent.disconnecting)
        clock.advance(250)
        self.assertFalse(talking.disconnecting)
        clock.advance(60)
        self.assertTrue(talking.disconnecting)

    def test_SEC_051_nearly_full_table_shortens_idle_limits(self) -> None:
        """At 80% of SMTP_MAX_CONNECTIONS, silent sessions get 5 s and talkers 10 s;
        once fewer than 70% are in use the configured limits return."""
        clock = Clock()
        factory = _factory(clock, max_connections=10, greeting_timeout=30.0, command_timeout=300.0)
        sessions = [_connect(factory) for _ in range(7)]
        for protocol, _ in sessions[:4]:
            protocol.dataReceived(b"EHLO client.test\r\n")
        clock.advance(2)
        self.assertFalse(factory.stressed)
        sessions.append(_connect(factory))  # 8 of 10: stressed
        self.assertTrue(factory.stressed)
        clock.advance(3.1)  # the first seven have idled 5.1 s, the last 3.1 s
        silent_cut = [t.disconnecting for _, t in sessions[4:]]
        self.assertEqual(silent_cut, [True, True, True, False])
        for protocol, _ in sessions[4:7]:
            protocol.connectionLost(None)  # 5 of 10 open: no longer stressed
        self.assertFalse(factory.stressed)
        clock.advance(10)
        self.assertEqual([t.disconnecting for _, t in sessions[:4]], [False] * 4)
        self.assertFalse(any(code.startswith("421") for _, t in sessions[:4] for code in _codes(t)))

    def test_SEC_051_full_table_of_idle_sessions_clears_within_seconds(self) -> None:
        """Idle connections filling the table are cut after 5 s; the next client is greeted."""
        clock = Clock()
        factory = _factory(clock, max_connections=20)
        idle = [_connect(factory) for _ in range(20)]
        _, refused = _connect(factory)
        self.assertEqual(_codes(refused), ["421 4.7.0"])
        clock.advance(pressure.STRESSED_GREETING + 0.1)
        self.assertTrue(all(t.disconnecting for _, t in idle))
        for protocol, _ in idle:
            protocol.connectionLost(None)
        _, welcome = _connect(factory)
        self.assertEqual(_codes(welcome), ["220 relay"])


class ShutdownBoundTests(SynchronousTestCase):
    """Shutdown ends within its timeout plus a short grace, whatever the sessions do."""

    def test_SEC_050_shutdown_finishes_when_a_session_never_ends(self) -> None:
        """A session whose transport never reports its end cannot hold the stop for ever."""
        clock = Clock()
        factory = _factory(clock)
        protocol, transport = _connect(factory, _DeafTransport())
        # Mid-DATA, so the first pass of shutdown leaves it be.
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        protocol.dataReceived(b"DATA\r\npart of a body\r\n")
        done = factory.shutdown(30)
        clock.advance(30)
        self.assertNoResult(done)
        clock.advance(FORCE_GRACE)
        self.successResultOf(done)
        self.assertEqual(factory.sessions, set())
        self.assertIn("421 4.3.2", _codes(transport))
        self.assertGreater(cast(_DeafTransport, transport).aborts, 0)


def _raw_starttls_and_stall(port: int) -> socket.socket:
    sock, replies = _starttls(port)
    assert replies[-1].startswith("220 "), replies
    return sock


def _never_reads(port: int) -> socket.socket:
    """Pipeline NOOPs without reading a reply until both kernels' buffers are full."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    batch = b"NOOP\r\n" * 2000
    stalled_since = time.monotonic()
    while time.monotonic() - stalled_since < 1.0:
        try:
            sock.send(batch)
            stalled_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
    return sock


class TwistdTests(TestCase):
    """The real process, as an operator runs it."""

    @async_test
    async def test_sigterm_with_stuck_sessions_exits_in_time(self) -> None:
        """SIGTERM exits 0 within SMTP_SHUTDOWN_TIMEOUT + 5 s with a stalled handshake
        and a client that never reads open (wire proof for SEC-050)."""
        shutdown_timeout = 3.0
        relay = TwistdRelay(self, SMTP_SHUTDOWN_TIMEOUT=str(shutdown_timeout), HTTP_LISTEN="")

        def scenario() -> tuple[int, float, bytes]:
            relay.wait_listening()
            held = [_raw_starttls_and_stall(relay.smtp_port), _never_reads(relay.smtp_port)]
            try:
                started = time.monotonic()
                relay.process.send_signal(signal.SIGTERM)
                _, err = relay.process.communicate(timeout=shutdown_timeout + 30)
                return relay.process.returncode, time.monotonic() - started, err
            finally:
                for sock in held:
                    sock.close()

        code, took, err = await in_thread(scenario)
        self.assertEqual(code, 0, err.decode())
        self.assertLess(took, shutdown_timeout + 5)
        self.assertNotIn(b'"critical"', err)

    @async_test
    async def test_SEC_052_idle_storm_does_not_lock_clients_out(self) -> None:
        """20 idle connections fill SMTP_MAX_CONNECTIONS=20: the next client is refused,
        but one a few seconds later is greeted (the idle ones are cut after 5 s,
        not 300 s); the listen backlog is 1024."""
        relay = TwistdRelay(self, SMTP_MAX_CONNECTIONS="20", HTTP_LISTEN="")

        def scenario() -> tuple[str, float, str, str]:
            relay.wait_listening()
            # wait_listening's own probe must be gone from the table first.
            time.sleep(0.5)
            idle = []
            try:
                for _ in range(20):
                    sock = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10)
                    read_replies(sock, 1)
                    idle.append(sock)
                refused = _greeting(relay.smtp_port)
                started = time.monotonic()
                while True:
                    greeting = _greeting(relay.smtp_port)
                    if greeting.startswith("220 ") or time.monotonic() - started > 30:
                        break
                    time.sleep(0.25)
                took = time.monotonic() - started
            finally:
                for sock in idle:
                    sock.close()
            listening = ""
            if shutil.which("ss"):
                listening = subprocess.run(
                    ["ss", "-Hltn", f"sport = :{relay.smtp_port}"],
                    capture_output=True,
                    check=False,
                    timeout=10,
                ).stdout.decode()
            return refused, took, greeting, listening

        refused, took, greeting, listening = await in_thread(scenario)
        self.assertIn("421 4.7.0 Too many connections", refused)
        self.assertTrue(greeting.startswith("220 "), greeting)
        self.assertLess(took, pressure.STRESSED_GREETING + 1.0 + 3.0)
        if listening:
            # ss shows a listening socket's backlog in the Send-Q column; the
            # kernel caps what was asked for at net.core.somaxconn.
            with open("/proc/sys/net/core/somaxconn") as f:
                expected = min(pressure.LISTEN_BACKLOG, int(f.read()))
            self.assertEqual(listening.split()[2], str(expected))
