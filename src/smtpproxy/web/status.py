"""What the probes and the metrics know about the slow parts, refreshed in the background.

C{/readyz} and C{/metrics} must answer at once, whatever the provider or the
queue's database is doing: a probe that waits on PostgreSQL or on Entra's
token endpoint times out and takes the relay out of service for the wrong
reason.  L{StatusPoller} asks them every L{INTERVAL} seconds (a
C{LoopingCall}) and keeps the last answers; the scrape and the probe only
read those.  Each question is bounded by L{CHECK_TIMEOUT}, and a question
still unanswered is not asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpproxy.queue.model import Stats, Writability

__all__ = ["CHECK_TIMEOUT", "INTERVAL", "StatusPoller"]

log = Logger(namespace="smtpproxy.http")

#: Seconds between two refreshes.
INTERVAL = 5.0
#: Seconds one question may take before it counts as failed.
CHECK_TIMEOUT = 10.0

#: What the provider check answers before its first answer.
NOT_CHECKED = "not checked yet"


def _briefly(failure: Failure, name: str = "") -> str:
    """A failure in one short line for a probe's body (never a traceback).

    @param name: the question's name, put first ("write check: ...") where
        two questions to one backend could fail alike.
    """
    error = failure.value
    text = str(error) or type(error).__name__
    if isinstance(error, defer.TimeoutError):
        text = f"no answer within {CHECK_TIMEOUT:g} s"
    if name:
        text = f"{name}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class _Question:
    ask: Callable[[], defer.Deferred[Any]]
    name: str = ""
    busy: bool = False


class StatusPoller:
    """The provider's readiness and the queue's statistics, as last seen.

    @ivar provider_problem: None when the provider's last check passed,
        else what failed (L{NOT_CHECKED} before the first answer).
    @ivar queue_stats: the queue's last statistics, or None (no queue, or
        no answer yet).
    @ivar queue_problem: None when the last statistics came back, else why not.
    @ivar queue_writability: what the queue's last write check found, or
        None (no queue, or no answer yet).
    @ivar queue_write_problem: None when the last write check answered
        (whatever it found), else why it did not.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        provider_check: Callable[[], defer.Deferred[None]] | None,
        queue_stats: Callable[[float], defer.Deferred[Stats]] | None,
        queue_writable: Callable[[], defer.Deferred[Writability]] | None = None,
    ) -> None:
        self._reactor = reactor
        self.provider_problem: str | None = NOT_CHECKED if provider_check else None
        self.queue_stats: Stats | None = None
        self.queue_problem: str | None = NOT_CHECKED if queue_stats else None
        self._questions: list[tuple[_Question, Callable[[Any], None], Callable[[str], None]]] = []
        if provider_check is not None:
            self._questions.append(
                (_Question(provider_check), self._provider_ok, self._provider_failed)
            )
        if queue_stats is not None:
            # Asked at the reactor's time: a lease that ran out counts as queued.
            asked_now = _Question(lambda: queue_stats(self.now()))
            self._questions.append((asked_now, self._stats_ok, self._stats_failed))
        self.queue_writability: Writability | None = None
        self.queue_write_problem: str | None = NOT_CHECKED if queue_writable else None
        if queue_writable is not None:
            self._questions.append(
                (_Question(queue_writable, "write check"), self._writable_ok, self._writable_failed)
            )
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = reactor

    def now(self) -> float:
        """The reactor's time, to age the queue's oldest message against."""
        return self._reactor.seconds()

    def start(self) -> None:
        """Refresh now and every L{INTERVAL} seconds."""
        if self._questions and not self._loop.running:
            self._loop.start(INTERVAL, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> None:
        """Ask every question not already waiting for its answer."""
        for question, ok, failed in self._questions:
            if question.busy:
                continue
            question.busy = True
            try:
                asked = question.ask()
            except Exception as e:
                question.busy = False
                text = str(e) or type(e).__name__
                failed(f"{question.name}: {text}" if question.name else text)
                continue
            asked.addTimeout(CHECK_TIMEOUT, self._reactor)

            def done(result: object, question: _Question = question) -> object:
                question.busy = False
                return result

            def problem(
                failure: Failure, failed: Callable[[str], None] = failed, name: str = question.name
            ) -> None:
                failed(_briefly(failure, name))

            asked.addBoth(done).addCallbacks(ok, problem)

    def _provider_ok(self, _: object) -> None:
        self.provider_problem = None

    def _provider_failed(self, why: str) -> None:
        self.provider_problem = why

    def _stats_ok(self, stats: Stats) -> None:
        self.queue_stats = stats
        self.queue_problem = None

    def _stats_failed(self, why: str) -> None:
        self.queue_problem = why

    def _writable_ok(self, found: Writability) -> None:
        self.queue_writability = found
        self.queue_write_problem = None

    def _writable_failed(self, why: str) -> None:
        self.queue_writability = None
        self.queue_write_problem = why
