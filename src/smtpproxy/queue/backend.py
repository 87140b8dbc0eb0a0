"""The store C{QUEUE_URL} names, built (not yet opened) for the relay and the command.

Each backend's module is imported only when it is chosen: the PostgreSQL
one needs its driver, which an installation using SQLite (or no queue) need
not have.
"""

from __future__ import annotations

import importlib
import sys

from twisted.internet.interfaces import IReactorTime

from smtpproxy.queue.store import QueueStore
from smtpproxy.queue.url import parse_queue_url

_CLASSES = {
    "sqlite": ("smtpproxy.queue.sqlite", "SQLiteStore"),
    "postgresql": ("smtpproxy.queue.postgres", "PostgresStore"),
}


#: The GIL switch interval in queue mode, in seconds (Python's default: 0.005).
SWITCH_INTERVAL = 0.0005


def share_the_gil() -> None:
    """Let the queue's database thread have the GIL back promptly.

    The database drivers release the GIL for each step of a statement (each
    row fetched, each row written) and need it back to go on; while the
    reactor thread runs Python code, each of those waits up to the switch
    interval.  A queue transaction takes a few dozen steps, so at Python's
    default of 5 ms the database thread spent most of its time waiting and
    every acknowledgement with it (measured: 25-35% more queued ingress at
    0.5 ms, the same CPU per message).  Only queue mode changes it.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))


class NoQueueError(ValueError):
    """C{QUEUE_URL} is empty: there is no queue to open."""


def check(url: str) -> None:
    """Fail now, with one line, if C{url} is unreadable or its backend cannot load.

    @raise ValueError: saying what is wrong.
    """
    kind, _ = parse_queue_url(url)
    if kind:
        _load(kind)


def _load(kind: str) -> type:
    module_name, class_name = _CLASSES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"the {kind} queue cannot be loaded: {e}") from e
    found: type = getattr(module, class_name)
    return found


def make_store(
    url: str, max_bytes: int, reactor: IReactorTime, *, writer: bool = True
) -> QueueStore:
    """The backend for C{url} (C{QUEUE_URL}); call its C{open} before use.

    @param writer: whether this process writes the queue (the relay).  The
        operator command and the doctor pass False: the SQLite store then
        leaves the files of a running relay's enqueues alone at open.

    @raise NoQueueError: C{url} is empty (direct mode).
    @raise ValueError: C{url} is not a form L{parse_queue_url} reads, or its
        backend cannot be loaded (the message says which).
    """
    kind, target = parse_queue_url(url)
    if not kind:
        raise NoQueueError("QUEUE_URL is empty: this relay delivers directly, without a queue")
    options = {} if kind != "sqlite" else {"writer": writer}
    store: QueueStore = _load(kind)(target, max_bytes, reactor, **options)
    return store
