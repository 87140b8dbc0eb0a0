"""bcrypt's own bounded pool: separate from the reactor's threads, full means "try later".

Counted, never timed: work is held in the pool's threads by an event the
test releases, so "at once" means "while the pool is still held".
"""

from __future__ import annotations

import base64
import smtplib
import threading

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.hashpool import HashPool, PoolBusy
from smtpproxy.identities.router import IdentityChecker
from smtpproxy.identities.userpass import UserpassBackend, hash_password
from tests.support import TIMEOUT, async_test, client_tls, in_thread, start_relay


def held(case: TestCase, pool: HashPool) -> threading.Event:
    """An event the pool's work can wait on; released before the pool stops at cleanup."""
    gate = threading.Event()
    case.addCleanup(pool.close)
    case.addCleanup(gate.set)  # cleanups run last-added first: release, then stop
    return gate


class HashPoolTests(TestCase):
    @async_test
    async def test_full_pool_refuses_at_once_and_the_reactor_pool_still_runs(self) -> None:
        """One thread busy and one check waiting fill a pool of 1 + 1: a third check fails
        with PoolBusy at once (the Deferred has already failed), the reactor's own pool
        still runs work meanwhile, and once released the pool runs both and takes more."""
        pool = HashPool(reactor, threads=1, waiting=1)
        gate = held(self, pool)
        first = pool.run(lambda: gate.wait(TIMEOUT))
        second = pool.run(lambda: "second")
        self.assertEqual(pool.pending, 2)
        self.failureResultOf(pool.run(lambda: "third"), PoolBusy)
        self.assertEqual(await deferToThread(lambda: "shared pool"), "shared pool")
        self.assertFalse(gate.is_set())
        self.assertNoResult(first)
        self.assertNoResult(second)
        gate.set()
        self.assertTrue(await first)
        self.assertEqual(await second, "second")
        self.assertEqual(pool.pending, 0)
        self.assertEqual(await pool.run(lambda: "again"), "again")

    @async_test
    async def test_close_fails_waiting_checks_and_finishes_running_ones(self) -> None:
        """At the stop, a check still waiting for a thread fails with PoolBusy (its client
        hears 454), one already running finishes, and later checks fail at once."""
        pool = HashPool(reactor, threads=1, waiting=2)
        gate = held(self, pool)
        running = pool.run(lambda: gate.wait(TIMEOUT))
        waiting = pool.run(lambda: "never run")
        # Released, but its result reaches the reactor thread only after close().
        gate.set()
        pool.close()
        self.failureResultOf(waiting, PoolBusy)
        self.failureResultOf(pool.run(lambda: "late"), PoolBusy)
        self.assertTrue(await running)
        pool.close()  # a second close (the reactor's shutdown trigger) does nothing


class FullPoolOnTheWireTests(TestCase):
    @async_test
    async def test_SEC_123_auth_flood_gets_454_without_stalling_other_threads(self) -> None:
        """With the bcrypt pool and its wait list full, a further AUTH is answered 454 4.7.0
        while the pool is still held (nothing queued behind it), is not counted as a failed
        login, and the reactor's shared thread pool (host name lookups) keeps running: the
        smtplib client itself runs there.  Released, the right password gets 235."""
        pool = HashPool(reactor, threads=1, waiting=1)
        gate = held(self, pool)
        entry = ProviderEntry(
            "apps",
            "userpass",
            {"users": [{"username": "app", "password_hash": hash_password("app-pw", 4)}]},
            fallback=True,
        )
        checker = IdentityChecker([entry], {"apps": UserpassBackend(entry, reactor, pool)}, reactor)
        # Its log summary's timer runs on the real reactor.
        self.addCleanup(checker.log_summary.stop)
        relay = start_relay(self, auth=True)
        relay.factory.portal.registerChecker(checker)
        blocked = [pool.run(lambda: gate.wait(TIMEOUT)) for _ in range(2)]

        def auth(secret: str) -> tuple[int, bytes]:
            plain = base64.b64encode(f"\0app\0{secret}".encode()).decode("ascii")
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client:
                client.starttls(context=client_tls())
                client.ehlo()
                return client.docmd("AUTH", "PLAIN " + plain)

        code, text = await in_thread(auth, "guess")
        self.assertFalse(gate.is_set())
        self.assertEqual((code, text[:5]), (454, b"4.7.0"))
        self.assertEqual(len(relay.factory.guard.auth_failures), 0)
        self.assertEqual(await deferToThread(lambda: "shared pool"), "shared pool")
        gate.set()
        for d in blocked:
            self.assertTrue(await d)
        code, _ = await in_thread(auth, "app-pw")
        self.assertEqual(code, 235)
