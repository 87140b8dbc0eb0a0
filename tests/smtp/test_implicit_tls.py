"""Implicit TLS (SMTPS_LISTEN, ssl: listen values), clean TLS closes, and live-only connection caps.

Issue 10: implicit TLS hung before the handshake (the greeting, written
first, paused the session, which then stopped reading the ClientHello);
every TLS session ended with a 10 s wait and a reset instead of
close_notify; and a client running exactly SMTP_MAX_CONNECTIONS_PER_IP
sessions in a loop was refused because sessions still closing were counted.

Real loopback sockets and real clients (Python's ssl and smtplib, swaks,
curl, openssl s_client) against the relay in this process, and twistd as a
subprocess for the settings themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.smtp import listeners
from tests.support import (
    OPEN,
    PASSWORD,
    TIMEOUT,
    USER,
    Relay,
    async_test,
    certificate,
    client_tls,
    codes,
    in_thread,
    message,
    read_replies,
    start_relay,
)
from tests.test_twistd import Relay as TwistdRelay
from tests.test_twistd import free_port, json_lines, run_twistd

#: The brief's bound: close_notify and the TCP close within this long of 221.
CLOSE_BOUND = 1.0
TRANSACTION = (
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    + message()
    + b".\r\nQUIT\r\n"
)


def listen_implicit(case: TestCase, relay: Relay, *, proxy: bool = False) -> int:
    """Also listen with implicit TLS for C{relay}, as tap does for SMTPS_LISTEN; return the port."""
    from twisted.internet import reactor

    spec = listeners.Listener("SMTPS_LISTEN", "tcp:0", proxy=proxy, implicit_tls=True)
    wrapped = listeners.wrap(spec, relay.factory, relay.factory.tls_options, reactor)
    factory: Any = wrapped
    port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


def wrap(sock: socket.socket) -> ssl.SSLSocket:
    """TLS for the test certificate; a TCP EOF without close_notify raises SSLEOFError."""
    return client_tls().wrap_socket(sock, suppress_ragged_eofs=False)


def smtps_session(port: int) -> tuple[ssl.SSLSocket, list[str], float]:
    """Connect with implicit TLS; return the socket, the greeting, and its latency."""
    started = time.monotonic()
    sock = wrap(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
    greeting = read_replies(sock, 1)
    return sock, greeting, time.monotonic() - started


def starttls_session(port: int) -> ssl.SSLSocket:
    """Connect, EHLO, STARTTLS: the session inside TLS, before its second EHLO."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    read_replies(raw, 1)
    raw.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
    assert codes(read_replies(raw, 2)) == [250, 220]
    return wrap(raw)


@dataclasses.dataclass
class CloseSeen:
    """What a client saw after its QUIT, in seconds after the 221 arrived."""

    replies: list[str]
    close_notify: float  # recv() returned b"": the server's close_notify
    tcp_close: float  # the TCP connection's end (FIN) after our own close_notify


def quit_and_watch_close(sock: ssl.SSLSocket, answer: bool = True) -> CloseSeen:
    """QUIT; time the server's close_notify, then its TCP close.

    With C{answer}, the client sends its own close_notify (C{unwrap}) as a
    polite peer does; without it, it just waits, as a client that takes
    close_notify for EOF and expects the server to close the connection.
    """
    sock.sendall(b"EHLO client.test\r\nQUIT\r\n")
    replies = read_replies(sock, 2)
    at_221 = time.monotonic()
    assert sock.recv(100) == b""  # raises SSLEOFError on a close without close_notify
    close_notify = time.monotonic() - at_221
    if answer:
        raw = sock.unwrap()
    else:
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        sock.close()
    with raw:
        raw.settimeout(TIMEOUT)
        assert raw.recv(100) == b""  # ConnectionResetError would mean an abort
    return CloseSeen(replies, close_notify, time.monotonic() - at_221)


def turn(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)


class ImplicitTLSTests(TestCase):
    """An implicit-TLS listener: greeting inside TLS, same AUTH and policy, bounded stalls."""

    @async_test
    async def test_smtp_ssl_with_auth(self) -> None:
        """smtplib.SMTP_SSL is greeted at once, sees AUTH but not STARTTLS, logs in, sends."""
        relay = start_relay(self, auth=True)
        port = listen_implicit(self, relay)

        def client() -> tuple[float, dict[str, str], Any]:
            started = time.monotonic()
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=TIMEOUT, context=client_tls()) as smtp:
                latency = time.monotonic() - started
                smtp.ehlo("client.test")
                features = dict(smtp.esmtp_features)
                smtp.login(USER, PASSWORD)
                refused = smtp.sendmail("a@example.com", ["b@example.org"], message("Over 465"))
            return latency, features, refused

        latency, features, refused = await in_thread(client)
        self.assertLess(latency, CLOSE_BOUND)
        self.assertNotIn("starttls", features)
        self.assertEqual(features["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertEqual(refused, {})
        [email] = relay.provider.emails
        self.assertEqual(email.subject, "Over 465")

    @async_test
    async def test_no_starttls_inside_implicit_tls_and_auth_required(self) -> None:
        """STARTTLS inside implicit TLS is 503; MAIL before AUTH is 530, as on the STARTTLS port."""
        relay = start_relay(self, auth=True)
        port = listen_implicit(self, relay)

        def client() -> list[str]:
            sock, greeting, _ = smtps_session(port)
            with sock:
                sock.sendall(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<a@example.com>\r\n")
                return greeting + read_replies(sock, 3)

        replies = await in_thread(client)
        self.assertEqual(codes(replies), [220, 250, 503, 530])
        self.assertIn("TLS already active", replies[2])

    @async_test
    async def test_close_notify_and_tcp_close_within_a_second_of_221(self) -> None:
        """After QUIT, implicit TLS and STARTTLS both send close_notify and close TCP at
        once, whether or not the client answers with its own close_notify."""
        relay = start_relay(self)
        port = listen_implicit(self, relay)

        def client() -> list[CloseSeen]:
            seen = []
            for answer in (True, False):
                seen.append(quit_and_watch_close(smtps_session(port)[0], answer))
                seen.append(quit_and_watch_close(starttls_session(relay.port), answer))
            return seen

        for seen in await in_thread(client):
            self.assertEqual(codes(seen.replies), [250, 221])
            self.assertLess(seen.close_notify, CLOSE_BOUND)
            self.assertLess(seen.tcp_close, CLOSE_BOUND)
        self.assertEqual(relay.factory.guard.connections.total, 0)

    @async_test
    async def test_stalled_client_cut_at_greeting_timeout(self) -> None:
        """A client that connects and sends nothing, or half a ClientHello, holds its slot
        until SMTP_GREETING_TIMEOUT, then the connection is dropped and the slot freed."""
        relay = start_relay(self, greeting_timeout=1.0)
        port = listen_implicit(self, relay)
        guard = relay.factory.guard

        def stall(first_bytes: bytes) -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.sendall(first_bytes)
                started = time.monotonic()
                with contextlib.suppress(ConnectionResetError):
                    self.assertEqual(sock.recv(100), b"")
                return time.monotonic() - started

        for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):
            cut: defer.Deferred[float] = in_thread(stall, first_bytes)
            await turn(0.5)
            self.assertEqual(guard.connections.total, 1)
            waited = await cut
            self.assertGreater(waited, 0.4)
            self.assertLess(waited, 1.0 + CLOSE_BOUND)
            self.assertEqual(guard.connections.total, 0)

    @async_test
    async def test_refusal_is_sent_inside_tls(self) -> None:
        """Over the per-address cap the implicit-TLS client completes its handshake and
        reads 421 4.7.0, then a clean close."""
        relay = start_relay(self, guard=dataclasses.replace(OPEN, max_connections_per_ip=1))
        port = listen_implicit(self, relay)

        def client() -> tuple[list[str], list[str], bytes]:
            held, first, _ = smtps_session(port)
            with held:
                refused, second, _ = smtps_session(port)
                with refused:
                    return first, second, refused.recv(100)

        first, second, after = await in_thread(client)
        self.assertEqual(codes(first), [220])
        self.assertEqual(codes(second), [421])
        self.assertIn("4.7.0", second[0])
        self.assertEqual(after, b"")

    @async_test
    async def test_proxy_header_then_tls(self) -> None:
        """haproxy: composes with implicit TLS: the PROXY header in plain text, then the
        handshake; the session sees the client address the header names."""
        relay = start_relay(self)
        port = listen_implicit(self, relay, proxy=True)

        def client() -> tuple[list[str], str]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            raw.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.1 40000 465\r\n")
            with wrap(raw) as sock:
                greeting = read_replies(sock, 1)
                sock.sendall(b"EHLO client.test\r\n")
                ehlo = b""
                while b"\r\n250 " not in ehlo:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    ehlo += chunk
                return greeting, ehlo.decode()

        greeting, ehlo = await in_thread(client)
        self.assertEqual(codes(greeting), [220])
        self.assertIn("greets client.test [192.0.2.9]", ehlo)


class LiveSessionCapTests(TestCase):
    """SMTP_MAX_CONNECTIONS_PER_IP counts live sessions, not ones closing after 221."""

    PARALLEL = 50  # the default per-address cap
    ROUNDS = 2  # 50 sessions, then at once 50 more

    def run_clients(self, connect: Any) -> tuple[list[str], int]:
        """PARALLEL threads, all connected at once, each doing ROUNDS full transactions
        with QUIT back to back: once it has read 221 a thread opens its next session at
        once, and only then closes the old socket (the server is closing it anyway).
        Returns every reply that is not a success, and how many sessions were live at
        the same moment."""
        start = threading.Barrier(self.PARALLEL, timeout=TIMEOUT)
        live = [0]
        lock = threading.Lock()
        failures: list[str] = []

        def worker() -> None:
            previous: socket.socket | None = None
            for round_number in range(self.ROUNDS):
                sock, greeting = connect()
                if previous is not None:
                    previous.close()
                previous = sock
                if codes(greeting) != [220]:
                    failures.extend(greeting)
                    continue
                if round_number == 0:
                    with lock:
                        live[0] += 1
                    start.wait()  # all PARALLEL sessions are open now
                sock.sendall(b"EHLO client.test\r\n" + TRANSACTION)
                replies = read_replies(sock, 6)
                failures.extend(r for r in replies if r[0] not in "23")
            if previous is not None:
                previous.close()

        with ThreadPoolExecutor(self.PARALLEL) as pool:
            for done in [pool.submit(worker) for _ in range(self.PARALLEL)]:
                done.result()
        return failures, live[0]

    async def check(self, mode: str) -> None:
        relay = start_relay(self)  # OPEN: 50 per address
        self.assertEqual(relay.factory.guard.settings.max_connections_per_ip, self.PARALLEL)
        port = listen_implicit(self, relay)

        def connect() -> tuple[socket.socket, list[str]]:
            if mode == "implicit":
                sock, greeting, _ = smtps_session(port)
                return sock, greeting
            plain = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
            greeting = read_replies(plain, 1)
            if mode == "plain" or codes(greeting) != [220]:
                return plain, greeting
            plain.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
            read_replies(plain, 2)
            return wrap(plain), greeting

        failures, live = await in_thread(self.run_clients, connect)
        self.assertEqual(failures, [])
        self.assertEqual(live, self.PARALLEL)
        self.assertEqual(len(relay.provider.emails), self.PARALLEL * self.ROUNDS)

    @async_test
    async def test_fifty_sessions_in_a_loop_plain(self) -> None:
        """Plain SMTP: 50 parallel sessions, each followed at once by the next, never 421."""
        await self.check("plain")

    @async_test
    async def test_fifty_sessions_in_a_loop_starttls(self) -> None:
        """STARTTLS: 50 parallel sessions, each followed at once by the next, never 421."""
        await self.check("starttls")

    @async_test
    async def test_fifty_sessions_in_a_loop_implicit_tls(self) -> None:
        """Implicit TLS: 50 parallel sessions, each followed at once by the next, never 421."""
        await self.check("implicit")

    @async_test
    async def test_fifty_live_sessions_still_refuse_the_fifty_first(self) -> None:
        """The cap itself still holds: with 50 sessions live the 51st gets 421 4.7.0."""
        relay = start_relay(self)

        def client() -> list[str]:
            held = [socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)]
            for _ in range(self.PARALLEL - 1):
                held.append(socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT))
            try:
                for sock in held:
                    read_replies(sock, 1)
                with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as extra:
                    return read_replies(extra, 1)
            finally:
                for sock in held:
                    sock.close()

        [reply] = await in_thread(client)
        self.assertTrue(reply.startswith("421 4.7.0"), reply)


def run_client(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=60, check=False)


def s_client_after_quit(args: list[str]) -> tuple[float, subprocess.Popen[bytes], bytes, bytes]:
    """Run openssl s_client, send EHLO and QUIT with stdin kept open; return how long
    after the 221 arrived the program ended (it ends when the server closes)."""
    process = subprocess.Popen(
        ["openssl", "s_client", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    out = b""
    at_221: float | None = None
    try:
        # s_client reads stdin only once its handshake is done (after its own
        # EHLO and STARTTLS with -starttls): the commands wait in the pipe.
        process.stdin.write(b"EHLO openssl.test\r\nQUIT\r\n")
        process.stdin.flush()
        while True:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
            if at_221 is None and b"\n221 " in out:
                at_221 = time.monotonic()
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
    assert process.stderr is not None
    err = process.stderr.read()
    process.stderr.close()
    process.stdout.close()
    ended = time.monotonic()
    return (ended - at_221 if at_221 is not None else float("inf")), process, out, err


class RealClientTests(TestCase):
    """swaks, curl and openssl s_client against both listeners, with AUTH."""

    def setUp(self) -> None:
        self.relay = start_relay(self, auth=True)
        self.smtps_port = listen_implicit(self, self.relay)

    def need(self, *programs: str) -> None:
        missing = [p for p in programs if shutil.which(p) is None]
        if missing:
            raise SkipTest(f"{', '.join(missing)} not installed (.ci/run installs them)")

    def swaks(self, port: int, *options: str) -> list[str]:
        return [
            "swaks",
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "a@example.com",
            "--to",
            "b@example.org",
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
            *options,
        ]

    @async_test
    async def test_swaks(self) -> None:
        """swaks --tls-on-connect (465), --tls and --tls --pipeline (STARTTLS) all send,
        and each run ends promptly after its QUIT."""
        self.need("swaks")
        runs = [
            self.swaks(self.smtps_port, "--tls-on-connect"),
            self.swaks(self.relay.port, "--tls"),
            self.swaks(self.relay.port, "--tls", "--pipeline"),
            self.swaks(self.smtps_port, "--tls-on-connect", "--pipeline"),
        ]
        for args in runs:
            started = time.monotonic()
            result = await in_thread(run_client, args)
            took = time.monotonic() - started
            self.assertEqual(result.returncode, 0, result.stdout.decode() + result.stderr.decode())
            self.assertIn(b"<~  221 2.0.0", result.stdout)
            self.assertIn(b"=== Connection closed with remote host.", result.stdout)
            self.assertLess(took, 5.0, args)
        self.assertEqual(len(self.relay.provider.emails), len(runs))

    @async_test
    async def test_curl(self) -> None:
        """curl smtps:// and smtp:// --ssl-reqd upload a message with AUTH."""
        self.need("curl")
        body = Path(self.mktemp())
        body.write_bytes(message("Via curl"))
        for url in (f"smtps://127.0.0.1:{self.smtps_port}", f"smtp://127.0.0.1:{self.relay.port}"):
            args = [
                "curl",
                "--silent",
                "--show-error",
                "--insecure",
                "--ssl-reqd",
                "--user",
                f"{USER}:{PASSWORD}",
                "--mail-from",
                "a@example.com",
                "--mail-rcpt",
                "b@example.org",
                "--upload-file",
                str(body),
                url,
            ]
            result = await in_thread(run_client, args)
            self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual([e.subject for e in self.relay.provider.emails], ["Via curl"] * 2)

    @async_test
    async def test_openssl_sees_close_notify_after_quit(self) -> None:
        """openssl s_client, implicit (-quiet) and -starttls smtp: the session ends within
        a second of 221 with stdin still open, because the server closed it; without
        -quiet s_client prints "closed" (SSL_read returned 0: close_notify), and never
        an unexpected EOF."""
        self.need("openssl")
        runs = [
            ["-quiet", "-connect", f"127.0.0.1:{self.smtps_port}"],
            ["-quiet", "-starttls", "smtp", "-connect", f"127.0.0.1:{self.relay.port}"],
            ["-connect", f"127.0.0.1:{self.smtps_port}"],
            ["-starttls", "smtp", "-connect", f"127.0.0.1:{self.relay.port}"],
        ]
        for args in runs:
            after_221, process, out, err = await in_thread(s_client_after_quit, args)
            self.assertLess(after_221, CLOSE_BOUND, (args, err.decode()[-300:]))
            self.assertEqual(process.returncode, 0, err.decode()[-300:])
            self.assertNotIn(b"unexpected eof", err.lower())
            self.assertRegex(out, rb"250[ -]AUTH PLAIN LOGIN\r\n")
            if "-quiet" not in args:
                self.assertIn(b"\nclosed", out)


class TwistdTests(TestCase):
    """The settings, with twistd as a process."""

    def write_certificate(self) -> tuple[str, str]:
        # twistd runs in a directory of its own: absolute paths.
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        cert, key = certificate()
        (directory / "cert.pem").write_bytes(cert)
        (directory / "key.pem").write_bytes(key)
        return str(directory / "cert.pem"), str(directory / "key.pem")

    @async_test
    async def test_smtps_listen_and_ssl_endpoint(self) -> None:
        """SMTPS_LISTEN beside SMTP_LISTEN, and an ssl: SMTP_LISTEN with its own key files
        (the issue's configuration, which hung): both greet over TLS and deliver."""
        cert_file, key_file = self.write_certificate()
        smtps_port = free_port()
        both = TwistdRelay(self, SMTPS_LISTEN=f"127.0.0.1:{smtps_port}")
        ssl_port = free_port()
        ssl_only = TwistdRelay(
            self,
            SMTP_LISTEN=f"ssl:{ssl_port}:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}",
        )

        def send(port: int, subject: str) -> None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with smtplib.SMTP_SSL(
                        "127.0.0.1", port, timeout=TIMEOUT, context=client_tls()
                    ) as smtp:
                        smtp.sendmail("a@example.com", ["b@example.org"], message(subject))
                        return
                except (OSError, smtplib.SMTPException):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        def scenario() -> tuple[bytes, bytes, bytes, bytes]:
            both.wait_listening()
            send(smtps_port, "Both listeners")
            send(ssl_port, "ssl endpoint")
            return *both.stop(), *ssl_only.stop()

        out_both, err_both, out_ssl, err_ssl = await in_thread(scenario)
        self.assertIn(b"Both listeners", out_both)
        self.assertIn(b"ssl endpoint", out_ssl)
        [started] = [e for e in json_lines(err_both) if e.get("msg") == "smtpproxy started"]
        self.assertEqual(started["smtps_listen"], f"tcp:{smtps_port}:interface=127.0.0.1")
        self.assertTrue(started["tls"].startswith("self-signed "))
        [started] = [e for e in json_lines(err_ssl) if e.get("msg") == "smtpproxy started"]
        self.assertTrue(started["tls"].startswith("custom CN=relay.test"))
        self.assertEqual(both.process.returncode, 0)

    @async_test
    async def test_listen_values_refused_at_startup(self) -> None:
        """An ssl: option that would bypass the TLS policy, or a second certificate, stops
        the relay with one line naming the problem and no traceback."""
        cert_file, key_file = self.write_certificate()
        cases = [
            (
                "SMTP_LISTEN: ssl: option 'sslmethod'",
                {"SMTP_LISTEN": "ssl:0:sslmethod=TLSv1_METHOD"},
            ),
            (
                "the certificate is named twice",
                {
                    "SMTPS_LISTEN": f"ssl:0:privateKey={key_file}",
                    "TLS_CERT_FILE": cert_file,
                    "TLS_KEY_FILE": key_file,
                },
            ),
            ("SMTPS_LISTEN", {"SMTPS_LISTEN": "465:x"}),
        ]
        for words, env in cases:
            result = await in_thread(run_twistd, HTTP_LISTEN="", **env)
            self.assertNotEqual(result.returncode, 0)
            stderr = result.stderr.decode()
            self.assertIn(words, stderr.strip().splitlines()[-1])
            self.assertNotIn("Traceback", stderr)
