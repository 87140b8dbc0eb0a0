"""Parsing a message without holding the reactor: time slices and a budget.

L{smtpproxy.mime.message.parse_steps} yields between pieces of work, each
linear in the bytes it reads and bounded by the size limits.  A
L{MessageParser} runs those steps in slices: the first slice at once (an
everyday message is parsed in it, with no extra reactor turn and no
scheduling), the rest through a L{Cooperator} shared by every session,
which gives each parse in progress a few milliseconds per reactor turn and
lets the reactor serve sockets and timers in between.  A parse still
unfinished after C{SMTP_PARSE_TIMEOUT} seconds is given up, and the message
is handed on as its raw bytes (L{smtpproxy.mime.message.abandoned}).

Threads would not help here: CPython's regular expressions and the standard
library's header parser hold the GIL while they run, so a worker thread
cannot be interrupted and still stalls the reactor.  Slicing works because
no single step is long: the longest is one linear pass over at most
C{SMTP_MAX_MESSAGE_SIZE} bytes in C code (decoding a large part).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator

from smtpproxy.mime.message import Email, ParseSteps, abandoned, parse_steps

_T = TypeVar("_T")

DEFAULT_TIMEOUT = 10.0
# CPU time one parse may take before the reactor gets a turn, and one
# cooperator tick before it does.  Small enough that a probe session's
# greeting never waits long, large enough that a 25 MB message does not
# cost thousands of reactor turns.
SLICE = 0.005
# A message larger than this gets only its first step (the header block) at
# once; the rest waits for the cooperator.  A step over a large body (one
# decode of a 24 MB text part takes some 30 ms) is short on its own, but
# twenty such messages whose final dots arrive in the same reactor turn
# would each take theirs in that turn, one after another: 0.7 s in which
# no other session was served, before this limit.
SYNC_BYTES = 256 * 1024


class MessageParser:
    """Parses messages within a time budget, a slice at a time.

    @param reactor: supplies C{seconds} (the budget) and C{callLater} (the
        next slice); a L{twisted.internet.task.Clock} in tests.
    @param timeout: seconds after which a parse is abandoned.
    @param slice_seconds: CPU time per slice, as measured by C{timer}.
    @param timer: the clock slices are measured with; zero-length slices
        (C{slice_seconds=0}) make every step its own reactor turn.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        slice_seconds: float = SLICE,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._slice = slice_seconds
        self._timer = timer
        # Large bodies are read back and parsed one at a time (see
        # parse_body); the cooperator still slices that one parse.
        self._large = DeferredSemaphore(1)
        self._cooperator = Cooperator(
            terminationPredicateFactory=self._slice_over,
            scheduler=lambda work: reactor.callLater(0, work),
        )

    def _slice_over(self) -> Callable[[], bool]:
        stop = self._timer() + self._slice
        return lambda: self._timer() >= stop

    def parse(
        self, envelope_from: str, envelope_to: Sequence[str], raw: bytes
    ) -> Email | Deferred[Email]:
        """The parsed message: at once when one slice was enough, else a Deferred.

        The Deferred never fails: a parse over budget fires with an
        abandoned L{Email} (C{abandoned=True}, raw bytes and envelope).
        """
        deadline = self._reactor.seconds() + self._timeout
        steps = parse_steps(envelope_from, envelope_to, raw)
        timer = self._timer
        stop = timer() + self._slice
        try:
            next(steps)
            while len(raw) <= SYNC_BYTES and timer() < stop:
                next(steps)
        except StopIteration as done:
            email: Email = done.value
            return email
        outcome: list[Email] = []
        work = self._rest(steps, deadline, outcome, (envelope_from, envelope_to, raw))
        finished: Deferred[Iterator[None]] = self._cooperator.cooperate(work).whenDone()
        return finished.addCallback(lambda _: outcome[0])

    def parse_body(
        self,
        envelope_from: str,
        envelope_to: Sequence[str],
        size: int,
        read: Callable[[], bytes],
    ) -> Email | Deferred[Email]:
        """Like L{parse}, for a body read back (from memory or its spool file) by C{read}.

        A body over L{SYNC_BYTES} waits its turn before it is read: large
        messages are read back and parsed one at a time, in arrival order.
        Parsed side by side, twenty 24 MB bodies would all sit in memory
        while the cooperator shared its turns among them; one at a time,
        memory holds one body and its parse, and every session is still
        served between the parse's steps.
        """
        if size <= SYNC_BYTES:
            return self.parse(envelope_from, envelope_to, read())

        def parse_in_turn(_: object) -> Deferred[Email]:
            try:
                result = self.parse(envelope_from, envelope_to, read())
            except BaseException:
                parsed: Deferred[Email] = fail()
            else:
                parsed = result if isinstance(result, Deferred) else succeed(result)
            return parsed.addBoth(next_in_turn)

        def next_in_turn(result: _T) -> _T:
            # The next body is read in a later reactor turn: by then this
            # one has usually been handed to the provider and let go of, so
            # two large bodies are not in memory at once.
            self._reactor.callLater(0, self._large.release)
            return result

        return self._large.acquire().addCallback(parse_in_turn)

    def _rest(
        self,
        steps: ParseSteps,
        deadline: float,
        outcome: list[Email],
        message: tuple[str, Sequence[str], bytes],
    ) -> Iterator[None]:
        """The remaining steps, one per iteration, until done or past C{deadline}."""
        while True:
            if self._reactor.seconds() > deadline:
                steps.close()
                why = f"not finished within {self._timeout:g} s"
                outcome.append(abandoned(*message, why))
                return
            try:
                next(steps)
            except StopIteration as done:
                outcome.append(done.value)
                return
            yield None
