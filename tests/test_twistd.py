"""The real thing: `twistd -n smtpproxy` as a process, driven by real clients.

These start the relay exactly as an operator does and talk to it with
smtplib, swaks, openssl s_client and HTTP, then stop it with SIGTERM.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.config import ENV_PREFIXES
from tests.support import TIMEOUT, async_test, in_thread, message

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


# Ports handed out lately: the kernel may give a port that was bound and
# closed a moment ago to the next bind(0) again, and a relay given the same
# port for SMTP_LISTEN and HTTP_LISTEN cannot start.
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=512)


def free_port() -> int:
    """A loopback port free now and not handed out by this process lately."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise AssertionError("no loopback port left that was not handed out lately")


def base_env(**settings: str) -> dict[str, str]:
    # Whatever relay-like variables the caller's shell holds are not this
    # test's settings (and an unknown one would stop the relay).
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


class Relay:
    """A twistd process with its ports; always killed at the end of the test."""

    def __init__(self, case: TestCase, args: tuple[str, ...] = (), **settings: str) -> None:
        self.smtp_port = free_port()
        self.http_port = free_port()
        settings.setdefault("SMTP_LISTEN", f"127.0.0.1:{self.smtp_port}")
        settings.setdefault("HTTP_LISTEN", f"127.0.0.1:{self.http_port}")
        settings.setdefault("SMTP_HOSTNAME", "relay.test")
        self.workdir = case.mktemp()
        os.makedirs(self.workdir)
        self.process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy", *args],
            env=base_env(**settings),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        case.addCleanup(self.kill)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=TIMEOUT)

    def wait_listening(self) -> None:
        """Poll the SMTP port until it answers (bounded), or fail with the logs."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        _, err = self.stop()
        raise AssertionError(f"relay did not start:\n{err.decode()}")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[bytes, bytes]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.communicate(timeout=60)


def run_twistd(*args: str, **settings: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy", *args],
        env=base_env(**settings),
        capture_output=True,
        timeout=60,
        check=False,
    )


def json_lines(stream: bytes) -> list[dict[str, Any]]:
    lines = []
    for line in stream.decode().splitlines():
        line = line.strip()
        if line:
            lines.append(json.loads(line))
    return lines


class LifecycleTests(TestCase):
    @async_test
    async def test_zero_config_start_send_health_and_sigterm(self) -> None:
        """Default settings: JSON startup log on stderr, a message printed on stdout,
        /healthz answers 200, SIGTERM exits 0."""
        relay = Relay(self)

        def scenario() -> tuple[int, bytes, bytes, bytes]:
            relay.wait_listening()
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                client.starttls(context=context)
                client.sendmail(
                    "a@example.com", ["b@example.org"], message("Quarterly report", "Numbers.\r\n")
                )
            url = f"http://127.0.0.1:{relay.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                health = response.read()
            out, err = relay.stop()
            return relay.process.returncode, out, err, health

        code, out, err, health = await in_thread(scenario)
        self.assertEqual(code, 0, err.decode())
        self.assertIn(b"Quarterly report", out)
        self.assertIn(b"Numbers.", out)
        self.assertEqual(json.loads(health)["status"], "ok")
        events = json_lines(err)
        [started] = [e for e in events if e.get("msg") == "smtpproxy started"]
        self.assertEqual(started["provider"], "stdout")
        self.assertEqual(started["auth"], "disabled")
        self.assertIn("self-signed", started["tls"])
        [delivered] = [e for e in events if e.get("outcome") == "delivered"]
        self.assertEqual(delivered["recipients"], ["b@example.org"])
        self.assertNotIn(b"Numbers.", err)

    @async_test
    async def test_swaks_and_openssl_with_auth(self) -> None:
        """swaks sends with STARTTLS + AUTH; openssl s_client sees AUTH only inside TLS."""
        if shutil.which("swaks") is None or shutil.which("openssl") is None:
            raise SkipTest("swaks and openssl are installed by .ci/run")
        relay = Relay(self, SMTP_USERNAME="app", SMTP_PASSWORD="pa55-w0rd")

        def scenario() -> tuple[Any, Any, Any, bytes]:
            relay.wait_listening()
            common = ["swaks", "--server", f"127.0.0.1:{relay.smtp_port}", "--to", "b@example.org"]
            good = subprocess.run(
                [
                    *common,
                    "--tls",
                    "--auth",
                    "PLAIN",
                    "--auth-user",
                    "app",
                    "--auth-password",
                    "pa55-w0rd",
                    "--header",
                    "Subject: via swaks",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            bad = subprocess.run(
                [
                    *common,
                    "--tls",
                    "--auth",
                    "LOGIN",
                    "--auth-user",
                    "app",
                    "--auth-password",
                    "wrong",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            ssl_session = subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-quiet",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{relay.smtp_port}",
                ],
                input=b"EHLO openssl.test\r\nQUIT\r\n",
                capture_output=True,
                timeout=60,
                check=False,
            )
            out, _ = relay.stop()
            return good, bad, ssl_session, out

        good, bad, ssl_session, out = await in_thread(scenario)
        self.assertEqual(good.returncode, 0, good.stdout.decode())
        self.assertIn(b"via swaks", out)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn(b"535 5.7.8", bad.stdout)
        self.assertRegex(ssl_session.stdout, rb"250[ -]AUTH PLAIN LOGIN\r\n")
        self.assertIn(b"221", ssl_session.stdout)


class StartupErrorTests(TestCase):
    """A bad setting stops the process with one line naming it (R5, R7.4)."""

    def assert_refused(self, name: str, result: subprocess.CompletedProcess[bytes]) -> None:
        self.assertNotEqual(result.returncode, 0)
        last = result.stderr.decode().strip().splitlines()[-1]
        self.assertIn(name, last)
        self.assertNotIn("Traceback", result.stderr.decode())

    @async_test
    async def test_bad_values(self) -> None:
        """Invalid numbers, partial Graph, missing certificate, unknown YAML, a misspelled
        environment variable, busy port: each stops twistd with one line naming it."""
        config = Path(self.mktemp())
        config.write_text("smtp:\n  lisen: ':25'\n")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            cases = [
                ("SMTP_MAX_MESSAGE_SIZE", (), {"SMTP_MAX_MESSAGE_SIZE": "lots"}),
                ("GRAPH_CLIENT_SECRET", (), {"GRAPH_TENANT_ID": "t", "GRAPH_CLIENT_ID": "c"}),
                (
                    "/nonexistent/cert.pem",
                    (),
                    {
                        "TLS_CERT_FILE": "/nonexistent/cert.pem",
                        "TLS_KEY_FILE": "/nonexistent/k.pem",
                    },
                ),
                ("smtp.lisen", ("--config", str(config)), {}),
                ("SMTP_LISTN (did you mean SMTP_LISTEN?)", (), {"SMTP_LISTN": ":25"}),
                ("SMTP_LISTEN", (), {"SMTP_LISTEN": f"127.0.0.1:{port}", "HTTP_LISTEN": ""}),
            ]
            for name, args, env in cases:
                result = await in_thread(run_twistd, *args, **env)
                self.assert_refused(name, result)

    @async_test
    async def test_help_lists_every_setting(self) -> None:
        """`twistd smtpproxy --help-settings` prints every setting once, each on a line of
        its own, and exits 0; `--help` (which twistd reflows) points to it."""
        from smtpproxy.config import settings

        every = settings()

        listing = await in_thread(run_twistd, "--help-settings")
        self.assertEqual(listing.returncode, 0, listing.stderr.decode())
        lines = listing.stdout.decode().splitlines()
        for setting in every:
            [line] = [line for line in lines if line.split()[0] == setting.env]
            self.assertIn(setting.help, line)
        self.assertEqual(len(lines), len(every) + 1)  # and the heading
        usage = await in_thread(run_twistd, "--help")
        self.assertIn("--help-settings", " ".join(usage.stdout.decode().split()))
