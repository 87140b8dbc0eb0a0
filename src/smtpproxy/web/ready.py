"""The readiness probe: C{GET /readyz}, can this relay take and deliver mail now?

C{/healthz} says the process is alive; C{/readyz} says whether to route mail
to it: C{200} when its listeners are up, it is not stopping, its provider can
work (for Graph: a token was obtained, or can be now) and, in queue mode, its
queue is open and answering; otherwise C{503} with a JSON body naming each
check and what failed.  The slow checks come from
L{smtpproxy.web.status.StatusPoller}, so the probe never waits.

L{readiness} is the decision as a pure function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.web.resource import Resource
from twisted.web.server import Request

from smtpproxy.web.health import only_get
from smtpproxy.web.site import Mount, respond_json
from smtpproxy.web.status import StatusPoller

__all__ = ["Facts", "ReadyResource", "mount", "readiness"]

OK = "ok"


@dataclass(frozen=True, slots=True)
class Facts:
    """What readiness is decided from.

    @ivar provider_problem: None when the provider can work, else why not.
    @ivar queue_problem: None when the queue is open and answering (or
        there is no queue), else why not.
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
) -> Callable[[], Facts]:
    """Read the current facts from the service and the poller's last answers."""

    def read() -> Facts:
        queue_problem = None
        if queue_open is not None:
            queue_problem = poller.queue_problem
            stats = poller.queue_stats
            if not queue_open():
                queue_problem = "queue not open"
            elif queue_max_bytes and stats is not None and stats.bytes >= queue_max_bytes:
                queue_problem = "queue full (QUEUE_MAX_BYTES)"
        return Facts(
            listening=listening(),
            stopping=stopping(),
            provider_problem=poller.provider_problem,
            queue_problem=queue_problem,
            queued_mode=queue_open is not None,
        )

    return read


def mount(facts: Callable[[], Facts]) -> Mount:
    """C{/readyz} for the site."""
    return Mount("/readyz", ReadyResource(facts))
