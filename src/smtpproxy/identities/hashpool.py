"""A few threads of their own for password hashes, with a bounded wait list.

bcrypt is slow on purpose, so it cannot run in the reactor thread.  The
reactor's shared thread pool is no place for it either: that pool also
resolves host names (Graph, the upstream SMTP server, HTTP identity
endpoints), and a flood of AUTH commands would queue unbounded work in
front of every lookup.  L{HashPool} runs at most C{threads} checks at once
in a L{ThreadPool} that only it uses, keeps at most C{waiting} more in its
own list, and refuses the rest at once with L{PoolBusy}: the caller answers
"try later" rather than let a queue, and every client's wait, grow.

The threads start with the first check, after the reactor runs (so never
before twistd forks), and stop at L{close} or, failing that, when the
reactor shuts down.  Checks still waiting at the stop fail with
L{PoolBusy}; the stop waits only for the ones already running.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: Checks run at once.  bcrypt releases the GIL, so each running check
#: takes a CPU; two bound what a flood of logins can take from the relay.
THREADS = 2
#: Checks that may wait for a thread: at cost 12 (0.25 to 0.8 s a check by
#: CPU and load) the last one waits 5 to 15 s, well inside an SMTP
#: client's patience (RFC 5321 gives a command minutes).
WAITING = 32


class PoolBusy(Exception):  # noqa: N818 (a state, like BackendUnavailable)
    """Every thread is busy and the wait list is full, or the pool is stopping."""


class _Job(Generic[T]):
    """A check that waits for a thread, and the Deferred its caller holds."""

    __slots__ = ("done", "work")

    def __init__(self, work: Callable[[], T]) -> None:
        self.work = work
        self.done: defer.Deferred[T] = defer.Deferred()


class HashPool:
    """Runs slow hash checks in its own threads, at most C{threads + waiting} at a time."""

    def __init__(
        self,
        reactor: IReactorCore,
        threads: int = THREADS,
        waiting: int = WAITING,
        name: str = "smtpproxy-hash",
    ) -> None:
        self.threads = threads
        self.waiting = waiting
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
        self._queue: deque[_Job[object]] = deque()
        self._running = 0
        self._closed = False
        self._trigger: object = None

    @property
    def pending(self) -> int:
        """Checks running or waiting now (at most C{threads + waiting})."""
        return self._running + len(self._queue)

    def run(self, work: Callable[[], T]) -> defer.Deferred[T]:
        """Run C{work} in a pool thread; fail with L{PoolBusy} at once when full or stopped."""
        if self._closed:
            return defer.fail(PoolBusy("stopping"))
        job = _Job(work)
        if self._running < self.threads:
            self._start(cast(_Job[object], job))
        elif len(self._queue) < self.waiting:
            self._queue.append(cast(_Job[object], job))
        else:
            return defer.fail(PoolBusy(f"{self.pending} checks running or waiting"))
        return job.done

    def _start(self, job: _Job[object]) -> None:
        if not self._pool.started:
            self._pool.start()
            # Threads must not outlive the reactor even if close() is never called.
            self._trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._shutdown
            )
        self._running += 1
        # The reactor provides both; IReactorCore is what its type names.
        reactor = cast(IReactorFromThreads, self._reactor)
        running = deferToThreadPool(reactor, self._pool, job.work)
        running.addBoth(self._finished, job)

    def _finished(self, result: object, job: _Job[object]) -> None:
        # In the reactor thread (deferToThreadPool delivers results there).
        self._running -= 1
        if self._queue and not self._closed:
            self._start(self._queue.popleft())
        if isinstance(result, Failure):
            job.done.errback(result)
        else:
            job.done.callback(result)

    def _shutdown(self) -> None:
        self._trigger = None  # firing now: nothing to remove
        self.close()

    def close(self) -> None:
        """Fail the waiting checks, wait for the running ones, stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        waiting, self._queue = self._queue, deque()
        for job in waiting:
            job.done.errback(PoolBusy("stopping"))
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if self._pool.started:
            self._pool.stop()
