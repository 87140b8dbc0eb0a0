"""DNS rebinding against the mailbox: the real twistd, curl and raw sockets (SEC-118 to SEC-120).

A hostile page on the internet points its own name at 127.0.0.1 after
loading, and the developer's browser then treats the mailbox as that page's
origin.  curl's C{--resolve} does what the rebound DNS answer does: it sends
a request for C{http://evil.example:PORT/} to the relay on loopback, with
C{Host: evil.example:PORT}, exactly as the browser would.  Each test fails
on the listener as it was (it answered any Host).
"""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import subprocess

from twisted.trial.unittest import SkipTest, TestCase

from tests.security.test_http_listener import Twistd, read_response
from tests.support import TIMEOUT, async_test, in_thread

ALLOWED = "mail.dev.test"
SUBJECT = "Password reset code 424242"


def curl(url: str, *args: str) -> tuple[int, bytes]:
    """curl's status code and body for C{url} (C{args} before it)."""
    done = subprocess.run(
        [
            "curl",
            "--silent",
            "--max-time",
            str(TIMEOUT),
            "--write-out",
            "\n%{http_code}",
            *args,
            url,
        ],
        capture_output=True,
        timeout=TIMEOUT + 5,
        check=False,
    )
    body, _, code = done.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request written as given on a new connection, and its response."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return read_response(sock)


class MailboxHostTests(TestCase):
    timeout = 120

    def relay(self) -> Twistd:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed (Debian package curl)")
        relay = Twistd(self, PROVIDER="mailbox", HTTP_ALLOWED_HOSTS=ALLOWED)
        relay.wait_listening()
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
            client.sendmail(
                "app@example.com",
                ["dev@example.org"],
                f"Subject: {SUBJECT}\r\n\r\nsecret body\r\n".encode(),
            )
        return relay

    @async_test
    async def test_SEC_118_rebound_name_refused(self) -> None:
        """A request for the mailbox's page, its API and a captured message through a
        rebound name (curl --resolve evil.example -> 127.0.0.1) gets 421 with a JSON body
        naming HTTP_ALLOWED_HOSTS and none of the captured mail; a POST's body is not read.
        The refusal is logged once, with the Host, and counted in the metrics."""

        def scenario() -> None:
            relay = self.relay()
            port = relay.http_port
            rebound = f"evil.example:{port}:127.0.0.1"
            for path in ("/", "/api/v1/messages", "/api/v1/message/latest", "/api/v1/events"):
                code, body = curl(f"http://evil.example:{port}{path}", "--resolve", rebound)
                self.assertEqual(code, 421, (path, body))
                self.assertNotIn(SUBJECT.encode(), body)
                self.assertIn("HTTP_ALLOWED_HOSTS", json.loads(body)["status"])
            # An upper-case variant and a trailing dot are the same name: still refused.
            code, _ = curl(f"http://127.0.0.1:{port}/api/v1/messages", "-H", "Host: EVIL.example.")
            self.assertEqual(code, 421)
            # A delete through the rebound name: refused at the headers, nothing deleted.
            status, headers, _ = raw(
                port,
                b"DELETE /api/v1/messages HTTP/1.1\r\nHost: evil.example\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            )
            self.assertEqual(status, 421)
            self.assertEqual(headers["connection"], "close")
            code, body = curl(f"http://127.0.0.1:{port}/api/v1/messages")
            self.assertEqual((code, json.loads(body)["total"]), (200, 1))
            code, metrics = curl(f"http://127.0.0.1:{port}/metrics")
            self.assertIn(b'reason="host"', metrics)
            relay.process.kill()
            _, err = relay.process.communicate(timeout=TIMEOUT)
            logged = [line for line in err.decode().splitlines() if "Host not allowed" in line]
            # Six refusals, one line: the rest wait for the next minute's line.
            self.assertEqual(len(logged), 1, logged)
            self.assertEqual(json.loads(logged[0])["host"], f"evil.example:{port}")

        await in_thread(scenario)

    @async_test
    async def test_SEC_119_addresses_localhost_and_listed_names_accepted(self) -> None:
        """The mailbox answers a Host that is an IP literal (127.0.0.1:PORT, [::1]:PORT),
        localhost or a name under .localhost, and the name in HTTP_ALLOWED_HOSTS (any
        case, with its port); the captured message is listed each time."""

        def scenario() -> None:
            relay = self.relay()
            port = relay.http_port
            url = f"http://127.0.0.1:{port}/api/v1/messages"
            for host in (
                f"127.0.0.1:{port}",
                f"[::1]:{port}",
                f"localhost:{port}",
                "mailbox.localhost",
                f"{ALLOWED}:{port}",
                "MAIL.DEV.TEST",
            ):
                code, body = curl(url, "-H", f"Host: {host}")
                self.assertEqual(code, 200, (host, body))
                self.assertEqual(json.loads(body)["messages"][0]["Subject"], SUBJECT)
            code, body = curl(
                f"http://{ALLOWED}:{port}/", "--resolve", f"{ALLOWED}:{port}:127.0.0.1"
            )
            self.assertEqual(code, 200)
            self.assertIn(b"<html", body.lower())

        await in_thread(scenario)

    @async_test
    async def test_SEC_120_missing_host_and_other_parts(self) -> None:
        """HTTP/1.0 without Host (no browser sends that) is answered; two Host headers or a
        malformed one are refused; /healthz, /readyz and /metrics answer any Host (they show
        no mail, and probes and scrapers name the relay as they like)."""

        def scenario() -> None:
            relay = self.relay()
            port = relay.http_port
            status, _, body = raw(port, b"GET /api/v1/messages HTTP/1.0\r\n\r\n")
            self.assertEqual(status, 200, body)
            self.assertIn(SUBJECT.encode(), body)
            for hosts in (
                b"Host: 127.0.0.1\r\nHost: evil.example\r\n",
                b"Host: evil.example:port\r\n",
                b"Host: ::1\r\n",
            ):
                status, _, body = raw(port, b"GET /api/v1/messages HTTP/1.1\r\n" + hosts + b"\r\n")
                self.assertEqual(status, 421, (hosts, body))
            for path in ("/healthz", "/readyz", "/metrics"):
                code, _ = curl(f"http://127.0.0.1:{port}{path}", "-H", "Host: evil.example")
                self.assertEqual(code, 200, path)

        await in_thread(scenario)
