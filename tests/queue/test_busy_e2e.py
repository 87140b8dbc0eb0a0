"""The SQLite queue when another process holds its write lock, or its storage is read-only.

The real twistd process with a SQLite queue, smtplib clients in threads, a
raw HTTP submission, and either a second process holding the queue's write
lock (Python's C{sqlite3} in a child process, C{BEGIN EXCLUSIVE}, as an
operator's C{sqlite3} shell left inside a transaction does) or, as root, a
read-only bind mount over the queue's body directory (a large body is
written there; the database itself stays writable).

Measured before the fix (the same scenario by hand): two clients in DATA
while the lock was held; the first heard C{451 4.3.0 Local error in
processing} after 30.1 s with a critical log line and a traceback, the
second waited 40 s, until the lock was given back.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import smtplib
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.queue.sqlite import INLINE_MAX, WRITE_LOCK_WAIT, body_directory
from tests.queue.test_e2e import QueuedRelay
from tests.support import TIMEOUT, async_test, in_thread, message
from tests.test_twistd import free_port

SECRET = "busy-queue-" + "k" * 40
BUSY = "message not queued: another process holds the queue's write lock"
READ_ONLY = "message not queued: the queue's storage is read-only"
#: An answer within two lock waits (one batch ahead, then its own) and this much more.
SLACK = 3.0


def _hold_lock(path: str) -> subprocess.Popen[bytes]:
    """Another process holding the queue's write lock until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            path,
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != b"held":
        holder.kill()
        raise AssertionError("the lock holder did not start")
    return holder


def _data(port: int, subject: str, body: str) -> tuple[int, str, float]:
    """One message through DATA: the reply's code and text and how long DATA took."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        started = time.monotonic()
        code, text = client.data(message(subject, body))
        return code, text.decode(), time.monotonic() - started


def _submit(port: int, subject: str) -> tuple[int, Any, float]:
    """One raw HTTP submission: status, JSON body and how long it took."""
    body = message(subject, f"Body of {subject}.\r\n")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    started = time.monotonic()
    connection.request(
        "POST",
        "/v1/messages/raw?from=a@example.com&to=b@example.org",
        body,
        {"Authorization": f"Bearer {SECRET}", "Content-Type": "message/rfc822"},
    )
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    return answer.status, json.loads(data), time.monotonic() - started


class WriteLockHeldTests(TestCase):
    timeout = 120

    @async_test
    async def test_enqueues_answered_451_busy_within_the_bound(self) -> None:
        """Another process holds the queue's write lock: two SMTP clients in DATA and one
        HTTP submission are each refused within two lock waits (not 30 s): SMTP with
        451 4.3.0 "Queue busy", HTTP with 503 temporary_failure and Retry-After; a
        session that is not enqueuing meanwhile is answered at once; each refusal is one
        warning naming the cause (no body in the log); nothing was stored or delivered;
        once the lock is given back a message is queued and delivered once."""
        http = free_port()
        relay = QueuedRelay(self, HTTP_LISTEN=f"127.0.0.1:{http}", HTTP_API_KEYS=f"e2e:{SECRET}")

        def scenario() -> dict[str, Any]:
            relay.start()
            relay.wait_for("queue opened")
            holder = _hold_lock(str(relay.dir / "queue.db"))
            seen: dict[str, Any] = {}
            try:
                threads = [
                    threading.Thread(
                        target=lambda n=n: seen.__setitem__(
                            f"smtp{n}", _data(relay.port, f"busy{n}", f"Secret body {n}.\r\n")
                        )
                    )
                    for n in range(2)
                ]
                threads.append(
                    threading.Thread(
                        target=lambda: seen.__setitem__("http", _submit(http, "busy-http"))
                    )
                )
                for thread in threads:
                    thread.start()
                time.sleep(0.5)
                started = time.monotonic()
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as other:
                    other.ehlo("other.test")
                    seen["noop"] = other.noop()[0]
                seen["other_took"] = time.monotonic() - started
                for thread in threads:
                    thread.join(TIMEOUT)
            finally:
                holder.kill()
                holder.wait()
            seen["stats"] = relay.command("stats")
            seen["after"] = _data(relay.port, "after", "Body of after.\r\n")
            relay.wait_for("message delivered")
            time.sleep(1.0)  # room for a duplicate to show, if there were one
            return seen

        seen = await in_thread(scenario)
        bound = WRITE_LOCK_WAIT * 2 + SLACK
        for n in range(2):
            code, text, took = seen[f"smtp{n}"]
            self.assertEqual((code, text), (451, "4.3.0 Queue busy, try again later"))
            self.assertLess(took, bound)
        status, answer, took = seen["http"]
        self.assertEqual((status, answer["error"]["code"]), (503, "temporary_failure"), answer)
        self.assertIn("4.3.0 Queue busy", answer["error"]["message"])
        self.assertLess(took, bound)
        self.assertEqual(seen["noop"], 250)
        self.assertLess(seen["other_took"], 1.0)
        self.assertEqual(seen["after"][0], 250, seen["after"])
        warnings = relay.events(BUSY)
        self.assertEqual(len(warnings), 3, relay.err())
        for warning in warnings:
            self.assertEqual(warning["level"], "warn")
            self.assertIn("write lock", warning["error"])
        self.assertEqual(sorted(w.get("front_door", "smtp") for w in warnings)[0], "http")
        self.assertEqual(relay.events("message could not be queued"), [])
        self.assertNotIn("Secret body", relay.err())
        # Nothing of the refused messages was kept; only the later one was delivered.
        self.assertEqual((seen["stats"]["queued"], seen["stats"]["bytes"]), (0, 0))
        self.assertNotIn("Secret body", relay.out())
        self.assertNotIn("busy-http", relay.out())
        self.assertEqual(relay.out().count("Body of after."), 1)
        self.assertEqual(len(relay.events("message delivered")), 1)


class ReadOnlyBodiesTests(TestCase):
    timeout = 120

    @async_test
    async def test_large_message_on_a_read_only_filesystem_is_451_named(self) -> None:
        """The queue's body directory is on a filesystem that went read-only (a
        read-only bind mount; root only): a message too large for the database's rows
        is refused with 451 4.3.0 at once, and one error line says the storage is
        read-only (before: a critical line with a traceback and "Local error in
        processing").  Once writable again the same message is queued and delivered."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("a read-only bind mount needs root and mount(8)")
        relay = QueuedRelay(self)
        large = "x" * 76 + "\r\n"
        body = large * (INLINE_MAX // len(large) + 10)

        def scenario() -> dict[str, Any]:
            relay.start()
            relay.wait_for("queue opened")  # the body directory exists from then on
            bodies = body_directory(str(relay.dir / "queue.db"))
            for args in (["--bind", bodies, bodies], ["-o", "remount,bind,ro", bodies]):
                done = subprocess.run(
                    ["mount", *args], capture_output=True, timeout=30, check=False
                )
                if done.returncode != 0:
                    subprocess.run(["umount", bodies], capture_output=True, timeout=30)
                    raise SkipTest(f"cannot bind-mount here: {done.stderr.decode().strip()}")
            seen: dict[str, Any] = {}
            try:
                seen["refused"] = _data(relay.port, "large-ro", body)
            finally:
                subprocess.run(["umount", bodies], capture_output=True, timeout=30, check=True)
            seen["stats"] = relay.command("stats")
            seen["after"] = _data(relay.port, "large-ro", body)
            relay.wait_for("message delivered")
            return seen

        seen = await in_thread(scenario)
        code, text, took = seen["refused"]
        self.assertEqual((code, text), (451, "4.3.0 Queue storage unavailable, try again later"))
        self.assertLess(took, 5.0)
        [line] = relay.events(READ_ONLY)
        self.assertEqual(line["level"], "error")
        self.assertIn("read-only", line["error"])
        self.assertEqual(line["reply"], "451 4.3.0")
        self.assertEqual(relay.events("message could not be queued"), [])
        self.assertEqual((seen["stats"]["queued"], seen["stats"]["bytes"]), (0, 0))
        self.assertEqual(seen["after"][0], 250)
        self.assertEqual(len(relay.events("message delivered")), 1)
