"""The operator command `smtpproxy queue ...` (a real process) beside a running relay's store.

The relay's side is the real SQLite store, opened as the relay opens it (the
queue's writer); the operator's side is the real console entry, run as a
process on the same QUEUE_URL, as docs/queue.md says operators use it while
the relay keeps running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers.graph.retry import response_problem
from smtpproxy.queue.front import QueueFront
from smtpproxy.queue.model import Attempt, Envelope, Outcome, QueueFullError
from smtpproxy.queue.policy import Schedule
from smtpproxy.queue.sqlite import SQLiteStore
from smtpproxy.queue.worker import QueueRunner, RunnerSettings
from smtpproxy.spool import MessageBody
from tests.support import RecordingProvider, in_thread, message
from tests.test_twistd import base_env

OWNER = "relay-a"


def _body(size: int) -> MessageBody:
    body = MessageBody()
    head = b"Subject: report\r\n\r\n"
    body.write(head + b"x" * (size - len(head)))
    return body


class OperatorBesideRelayTests(TestCase):
    async def relay_store(self, max_bytes: int) -> tuple[SQLiteStore, str]:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        store = SQLiteStore(str(directory / "queue.db"), max_bytes, reactor)
        await store.open()
        self.addCleanup(store.close)
        return store, f"sqlite:///{directory / 'queue.db'}"

    def command(self, url: str, *args: str) -> tuple[int, str, str]:
        result = subprocess.run(
            [sys.executable, "-m", "smtpproxy.cli", "queue", *args],
            env=base_env(QUEUE_URL=url),
            capture_output=True,
            timeout=60,
            check=False,
        )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async def test_deleting_dead_mail_makes_room_for_the_running_relay(self) -> None:
        """Defect: the SQLite store counts the bytes it holds in memory (SQLiteStore.held,
        loaded once at open, sqlite.py enqueue's QUEUE_MAX_BYTES test).  `smtpproxy queue
        delete` (and `retry`/purges it makes possible) runs in another process, so the
        bytes it frees are subtracted from the command's own count, never from the relay's:
        an operator whose queue is full of dead mail deletes it to make room, and the
        running relay keeps answering every new message 452 4.3.1 until it is restarted.

        Correct: once the operator's delete has removed the bodies, the running relay
        accepts new mail up to QUEUE_MAX_BYTES again (the limit is judged on what the
        queue holds, e.g. re-read from the database when the cached count says full)."""
        size = 10_000
        store, url = await self.relay_store(max_bytes=2 * size + size // 2)
        now = reactor.seconds()
        envelope = Envelope("a@example.com", ("b@example.org",), "192.0.2.7")
        dead = ["0" * 23 + "1", "0" * 23 + "2"]
        for n, id in enumerate(dead):
            await store.enqueue(id, envelope, _body(size), now - 100 + n)
        for _ in dead:
            [claimed] = await store.claim(OWNER, now, 30, 1, 10)
            await store.dead(claimed.id, OWNER, Attempt(now, Outcome.FAILED, "550 5.1.1 gone"))
        with self.assertRaises(QueueFullError):
            await store.enqueue("0" * 23 + "3", envelope, _body(size), now)

        for id in dead:
            code, out, err = await in_thread(self.command, url, "--json", "delete", id)
            self.assertEqual((code, json.loads(out)["deleted"]), (0, True), err)
        code, out, err = await in_thread(self.command, url, "--json", "stats")
        self.assertEqual(json.loads(out)["bytes"], 0, err)

        try:
            await store.enqueue("0" * 23 + "4", envelope, _body(size), now)
        except QueueFullError as e:
            self.fail(f"the relay still refuses new mail after the operator emptied it: {e}")

    async def test_stats_do_not_count_an_expired_lease_as_delivering(self) -> None:
        """Defect: after a relay was killed while delivering, `smtpproxy queue stats` keeps
        reporting its messages as "delivering" for up to QUEUE_LEASE_TIME, though nobody
        delivers them: the SQLite store's stats() (and PostgreSQL's tx.stats) count rows by
        their stored state, while model.State.DELIVERING says "expired leases count as
        queued" and claim() indeed treats them as due.  An operator checking the queue
        after a crash sees deliveries in flight that are not.

        Correct: a message whose lease has run out is counted as queued."""
        store, url = await self.relay_store(max_bytes=1 << 30)
        now = reactor.seconds()
        envelope = Envelope("a@example.com", ("b@example.org",), "192.0.2.7")
        await store.enqueue("0" * 23 + "1", envelope, _body(1000), now - 3600)
        # A relay (since killed) took the lease an hour ago for 300 s.
        await store.claim("killed-relay", now - 3600, 300, 1, 10)
        code, out, err = await in_thread(self.command, url, "--json", "stats")
        self.assertEqual(code, 0, err)
        stats = json.loads(out)
        self.assertEqual((stats["queued"], stats["delivering"]), (1, 0), err)

    async def test_provider_reply_cannot_drive_the_operators_terminal(self) -> None:
        """Defect: the reply an attempt is recorded with comes from the backend (Graph's
        error.code and error.message, which retry.parse_graph_error only folds on
        whitespace, so a permanent failure's reply carries them as sent; kept by
        policy.reply_text, whose logsafe.clip escapes for JSON logs only) and `smtpproxy
        queue show` / `list` (command.py _details, _table) print it, and the history's
        replies, raw to the operator's terminal.  A terminal escape in Graph's answer (ESC ]
        to retitle or ESC [2J to clear the screen, OSC 52 to write the clipboard) in a 4xx
        body, or in any error.code (also in the 503 and 429 replies), reaches
        the terminal of whoever inspects the queue.

        Correct: the readable output shows control characters escaped or replaced (the
        --json output is already safe), so nothing from a backend is a terminal command."""
        store, url = await self.relay_store(max_bytes=1 << 30)
        # What the Graph provider raises for this 400 answer (retry.response_problem).
        problem = response_problem(
            400,
            b'{"error": {"code": "ErrorInvalidRequest",'
            b' "message": "bad \\u001b]2;pwned\\u0007\\u001b[2J request"}}',
            None,
        )
        self.assertIn("\x1b", str(problem.error))
        provider = RecordingProvider()
        provider.outcomes.append(problem.error)
        settings = RunnerSettings(
            concurrency=1,
            per_route=1,
            lease_time=30.0,
            schedule=Schedule(min_interval=600.0, max_interval=3600.0, max_age=86400.0),
            dead_retention=86400.0,
            shutdown_timeout=1.0,
            poll_interval=0.05,
            purge_interval=600.0,
        )
        runner = QueueRunner(store, provider, reactor, MessageParser(reactor), settings)
        runner.startService()
        self.addCleanup(runner.stopService)
        front = QueueFront(store, reactor, kick=runner.kick)
        id = front.new_id()
        body = MessageBody()
        body.write(message("Status"))
        await front.enqueue(id, Envelope("a@example.com", ("b@example.org",)), body)
        for _ in range(200):
            entry = await store.show(id)
            if entry is not None and entry.attempts:
                break
            await deferLater(reactor, 0.02, lambda: None)
        await runner.stopService()
        for action in (["show", id], ["list"]):
            code, out, err = await in_thread(self.command, url, *action)
            self.assertEqual(code, 0, err)
            self.assertIn("ErrorInvalidRequest", out)
            self.assertNotIn("\x1b", out, f"`smtpproxy queue {action[0]}` printed an escape")

    async def test_command_on_a_missing_queue_does_not_report_an_empty_one(self) -> None:
        """Defect: `smtpproxy queue stats` (and list, retry --all-dead, ...) with a QUEUE_URL
        naming a file that does not exist (a typo, the wrong config file, the relay's
        working directory differing for a relative path) creates a new, empty queue there
        (sqlite.py _open_in_thread creates the schema and the bodies directory even when
        the store is opened with writer=False, as command.py does) and answers "queued: 0"
        with exit status 0.  The operator is told the queue is empty while the relay's real
        queue holds the backlog, and a stray queue.db is left behind.

        Correct: the operator command opens an existing queue only; a missing file is an
        error (exit status 3, "the queue could not be opened", naming the path) and nothing
        is created."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        url = f"sqlite:///{directory / 'queue.db'}"
        code, out, err = await in_thread(self.command, url, "stats")
        self.assertEqual(
            (code, sorted(os.listdir(directory))),
            (3, []),
            f"a missing queue was created and reported: {out!r} {err!r}",
        )
