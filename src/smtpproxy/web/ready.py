"""The readiness probe: C{GET /readyz}, can this relay take and deliver mail now?

C{/healthz} says the process is alive; C{/readyz} says whether to route mail
to it: C{200} when its listeners are up, it is not stopping, its provider can
work (for Graph: a token was obtained, or can be now) and, in queue mode, its
queue can take a message now; otherwise C{503} with a JSON body naming each
check and what failed.  The slow checks come from
L{smtpproxy.web.status.StatusPoller}, so the probe never waits.

A queue that answers a query is not yet a queue that stores mail: the
store's L{smtpproxy.queue.store.QueueStore.writable} check takes the write
lock and gives it back (SQLite) or asks whether the session may write
(PostgreSQL, which a failover can leave connected to a standby), and
reports the free space beside the queue's files, which must hold one
message of C{SMTP_MAX_MESSAGE_SIZE} with room to spare (L{room_needed});
a queue at C{QUEUE_MAX_BYTES} refuses new mail with 452 and is "full".

L{readiness} and L{queue_problem} are the decisions as pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.web.resource import Resource
from twisted.web.server import Request

from smtpproxy.queue.model import Stats, Writability
from smtpproxy.web.health import only_get
from smtpproxy.web.site import Mount, respond_json
from smtpproxy.web.status import StatusPoller

__all__ = [
    "Facts",
    "ReadyResource",
    "mount",
    "queue_full",
    "queue_problem",
    "readiness",
    "room_needed",
]

OK = "ok"

_MB = 1024 * 1024
#: The least room kept beside the largest message (see L{room_needed}).
MIN_MARGIN = 10 * _MB
#: Room under C{QUEUE_MAX_BYTES} below which the queue counts as full (see L{queue_full}).
FULL_ROOM = 64 * 1024


def room_needed(max_message_size: int) -> int:
    """Free bytes the queue's filesystem must have for the relay to be ready.

    One message of the largest size accepted, plus half as much again (at
    least L{MIN_MARGIN}) for what is written beside it: SQLite's WAL, the
    rows, the other messages arriving at the same moment.  Less than that
    and the next large message may be the one that hits a full disk.
    """
    return max_message_size + max(max_message_size // 2, MIN_MARGIN)


def queue_full(held: int, max_bytes: int) -> bool:
    """Whether a queue holding C{held} bytes refuses most new mail with 452.

    An enqueue is refused once C{held} plus its size would pass
    C{max_bytes}, so a queue a few bytes short of its limit refuses nearly
    everything: full means less than L{FULL_ROOM} (64 KiB, the size under
    which most mail falls) is left, or less than half the limit when the
    limit itself is that small.  C{max_bytes} 0 is no limit.
    """
    if max_bytes <= 0:
        return False
    return max_bytes - held < min(FULL_ROOM, max_bytes // 2 or 1)


def queue_problem(
    *,
    is_open: bool,
    stats: Stats | None,
    stats_problem: str | None,
    writability: Writability | None,
    write_problem: str | None,
    max_bytes: int,
    need_bytes: int,
) -> str | None:
    """Why the queue cannot take a new message now, or None when it can.

    Every reason found is named (joined by "; "), so one look at the probe
    shows a full queue on a read-only disk as both.

    @param is_open: the store's open finished.
    @param stats: the last statistics, for the bytes held.
    @param stats_problem: why the last statistics did not come back, or None.
    @param writability: the last write check's finding.
    @param write_problem: why the last write check did not answer, or None.
    @param max_bytes: C{QUEUE_MAX_BYTES} (0: no limit).
    @param need_bytes: free bytes the queue's filesystem must have
        (L{room_needed}); unchecked where the store knows no free space.
    """
    if not is_open:
        return "queue not open"
    problems: list[str] = []
    for asked in (stats_problem, write_problem):
        if asked is not None and asked not in problems:
            problems.append(asked)
    if writability is not None:
        if writability.problem is not None:
            problems.append(writability.problem)
        free = writability.free_bytes
        if free is not None and free < need_bytes:
            problems.append(f"disk has {free // _MB} MB free, need {-(-need_bytes // _MB)} MB")
    if stats is not None and queue_full(stats.bytes, max_bytes):
        problems.append(f"queue full: {stats.bytes} of {max_bytes} bytes")
    return "; ".join(problems) or None


@dataclass(frozen=True, slots=True)
class Facts:
    """What readiness is decided from.

    @ivar provider_problem: None when the provider can work, else why not.
    @ivar queue_problem: None when the queue can take a message now (or
        there is no queue), else why not (L{queue_problem}).
    """

    listening: bool
    stopping: bool
    provider_problem: str | None
    queue_problem: str | None
    queued_mode: bool


def readiness(facts: Facts) -> tuple[int, dict[str, object]]:
    """The status code and body for a readiness check."""
    checks: dict[str, str] = {
        "listeners": OK if facts.listening else "not listening",
        "shutdown": "stopping" if facts.stopping else OK,
        "provider": facts.provider_problem or OK,
    }
    if facts.queued_mode:
        checks["queue"] = facts.queue_problem or OK
    ready = all(value == OK for value in checks.values())
    return (200 if ready else 503), {"status": "ready" if ready else "not ready", "checks": checks}


class ReadyResource(Resource):
    """C{/readyz}: reads the facts, answers with L{readiness}."""

    isLeaf = True

    def __init__(self, facts: Callable[[], Facts]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is unannotated
        self._facts = facts

    def render(self, request: Request) -> bytes:
        wrong = only_get(request)
        if wrong is not None:
            return wrong
        code, body = readiness(self._facts())
        return respond_json(request, code, body)


def facts_from(
    poller: StatusPoller,
    listening: Callable[[], bool],
    stopping: Callable[[], bool],
    queue_open: Callable[[], bool] | None,
    queue_max_bytes: int = 0,
    queue_need_bytes: int = 0,
) -> Callable[[], Facts]:
    """Read the current facts from the service and the poller's last answers.

    @param queue_need_bytes: free bytes the queue's filesystem must have
        (L{room_needed} of C{SMTP_MAX_MESSAGE_SIZE}).
    """

    def read() -> Facts:
        problem = None
        if queue_open is not None:
            problem = queue_problem(
                is_open=queue_open(),
                stats=poller.queue_stats,
                stats_problem=poller.queue_problem,
                writability=poller.queue_writability,
                write_problem=poller.queue_write_problem,
                max_bytes=queue_max_bytes,
                need_bytes=queue_need_bytes,
            )
        return Facts(
            listening=listening(),
            stopping=stopping(),
            provider_problem=poller.provider_problem,
            queue_problem=problem,
            queued_mode=queue_open is not None,
        )

    return read


def mount(facts: Callable[[], Facts]) -> Mount:
    """C{/readyz} for the site."""
    return Mount("/readyz", ReadyResource(facts))
