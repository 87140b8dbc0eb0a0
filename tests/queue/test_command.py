"""`smtpproxy queue ...`: the real console entry, as a process, on a real SQLite queue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smtpproxy.queue import command
from smtpproxy.queue.command import visible
from smtpproxy.queue.model import Attempt, Entry, Envelope, Outcome, Refused, State
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.spool import MessageBody
from tests.support import async_test, in_thread
from tests.test_twistd import base_env

OWNER = "test-worker"


def _body(data: bytes) -> MessageBody:
    body = MessageBody()
    body.write(data)
    return body


class QueueCommandTests(TestCase):
    async def fill(self) -> tuple[str, str]:
        """A queue with one queued and one dead message; their ids."""
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.url = f"sqlite:///{self.dir / 'queue.db'}"
        store = SQLiteStore(str(self.dir / "queue.db"), 1 << 30, reactor)
        self.addCleanup(store.close)
        await store.open()
        now = reactor.seconds()
        queued, dead = "0" * 23 + "1", "0" * 23 + "2"
        envelope = Envelope("a@example.com", ("b@example.org", "c@example.org"), "192.0.2.7")
        await store.enqueue(queued, envelope, _body(b"Subject: one\r\n\r\nx\r\n"), now - 60)
        await store.enqueue(dead, envelope, _body(b"Subject: two\r\n\r\ny\r\n"), now - 30)
        [first] = await store.claim(OWNER, now, 30, 1, 10)
        self.assertEqual(first.id, queued)  # oldest first
        busy = Attempt(now, Outcome.DEFERRED, "451 4.4.5 busy")
        await store.deferred(queued, OWNER, busy, now + 3600)
        [claimed] = await store.claim(OWNER, now + 1, 30, 2, 10)
        attempt = Attempt(now, Outcome.FAILED, "550 5.1.1 no such user", "req-7", OWNER)
        await store.dead(claimed.id, OWNER, attempt)
        await store.close()
        return queued, dead

    def run_command(self, *args: str, url: str | None = None) -> tuple[int, str, str]:
        settings = {"QUEUE_URL": self.url if url is None else url}
        result = subprocess.run(
            [sys.executable, "-m", "smtpproxy.cli", "queue", *args],
            env=base_env(**settings),
            capture_output=True,
            timeout=60,
            check=False,
        )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async def json(self, *args: str) -> Any:
        code, out, err = await in_thread(self.run_command, "--json", *args)
        self.assertIn(code, (0, 1), err)
        return json.loads(out)

    @async_test
    async def test_look_and_act(self) -> None:
        """stats, list, show (with the attempt history and Graph's request id), retry of
        every dead message, delete: each does what it says, readable and as JSON."""
        queued, dead = await self.fill()
        stats = await self.json("stats")
        self.assertEqual((stats["queued"], stats["dead"], stats["delivering"]), (1, 1, 0))
        listed = await self.json("list")
        self.assertEqual(
            [(e["id"], e["state"]) for e in listed], [(queued, "queued"), (dead, "dead")]
        )
        self.assertEqual([e["id"] for e in await self.json("list", "--state", "dead")], [dead])

        code, text, _ = await in_thread(self.run_command, "list")
        self.assertEqual(code, 0)
        header, *rows = text.splitlines()
        self.assertTrue(header.startswith("ID "), header)
        self.assertEqual(len(rows), 2)
        self.assertIn("b@example.org (+1)", rows[0])
        self.assertIn("550 5.1.1 no such user", rows[1])

        code, text, _ = await in_thread(self.run_command, "show", dead)
        self.assertEqual(code, 0)
        self.assertIn("state:       dead", text)
        self.assertIn("failed     550 5.1.1 no such user request-id req-7", text)
        shown = await self.json("show", dead)
        self.assertEqual(shown["history"][0]["request_id"], "req-7")

        self.assertEqual(await self.json("retry", "--all-dead"), {"retried": 1})
        self.assertEqual((await self.json("stats"))["dead"], 0)
        self.assertEqual(await self.json("delete", queued), {"id": queued, "deleted": True})
        self.assertEqual([e["id"] for e in await self.json("list")], [dead])

    @async_test
    async def test_missing_things(self) -> None:
        """An unknown id exits 1 with a plain sentence; no QUEUE_URL exits 2 saying so."""
        await self.fill()
        code, out, _ = await in_thread(self.run_command, "show", "nope")
        self.assertEqual((code, out), (1, "no message nope\n"))
        code, _, _ = await in_thread(self.run_command, "retry", "nope")
        self.assertEqual(code, 1)
        code, _, err = await in_thread(self.run_command, "stats", url="")
        self.assertEqual(code, 2)
        self.assertIn("QUEUE_URL is not set", err)
        code, _, err = await in_thread(self.run_command, "stats", url="sqlite://host/x.db")
        self.assertEqual(code, 2)
        self.assertIn("QUEUE_URL", err)


class VisibleTextTests(TestCase):
    """The readable output's defence against terminal escapes from a backend, without I/O."""

    def test_controls_become_escapes(self) -> None:
        """Every C0 control (tab too), DEL, every C1 control and the bidirectional overrides
        are written as visible escapes; letters, accented ones included, stay as they are."""
        self.assertEqual(
            visible("a\x00\x07\t\x1b[2J\x7f\x85\x9b\u202eé\u2066z"),
            "a\\x00\\x07\\x09\\x1b[2J\\x7f\\x85\\x9b\\u202eé\\u2066z",
        )
        self.assertEqual(visible("plain Ünïcode text"), "plain Ünïcode text")

    def test_show_and_list_escape_what_the_backend_said(self) -> None:
        """A reply holding an OSC and a CSI sequence (last reply, the history, a refused
        recipient's reply) prints escaped in `show` and `list`: the only control left is the
        line feed between lines.  The JSON document keeps the text as it was (json escapes it)."""
        hostile = "550 5.6.0 bad \x1b]2;pwned\x07\x1b[2J request"
        attempt = Attempt(
            1000.0, Outcome.FAILED, hostile, "req-1", "w", (Refused("c@example.org", hostile),)
        )
        entry = Entry(
            id="0" * 24,
            envelope=Envelope("a@example.com", ("b@example.org",)),
            size=10,
            queued_at=900.0,
            state=State.DEAD,
            attempts=1,
            next_attempt=1000.0,
            last_reply=hostile,
            history=(attempt,),
        )
        for text in (command._details(entry, 1100.0), command._table([entry], 1100.0)):
            self.assertEqual([c for c in text if ord(c) < 32 and c != "\n"], [])
            self.assertIn("bad \\x1b]2;pwned\\x07\\x1b[2J", text)
        self.assertEqual(command._details(entry, 1100.0).count("\\x1b]2;"), 3)
        document = command._dump(command._entry(entry, history=True))
        self.assertEqual(json.loads(document)["last_reply"], hostile)
