"""Enough file descriptors for every connection the caps allow, checked at start-up.

SMTP sessions, HTTP connections, spooled bodies, the queue's database and
the provider's connections all draw on one per-process limit
(C{RLIMIT_NOFILE}).  Once it is reached the kernel refuses the next
C{accept()}, and SMTP clients get no greeting at all (1,500 idle HTTP
connections did that under a limit of 1,024).  The caps
(C{SMTP_MAX_CONNECTIONS}, C{HTTP_MAX_CONNECTIONS}) keep the connections
counted; this check makes sure the limit is above what they allow: it raises
the soft limit as far as needed (never past the hard one, which only root
may raise), or refuses to start with one line saying what to change.

L{plan} is the decision, pure; L{ensure} reads and sets the limit.
"""

from __future__ import annotations

import resource

__all__ = ["MARGIN", "FdLimitError", "ensure", "needed", "plan"]

#: Descriptors beyond the connections: listeners, log and spool files, the
#: queue's database, the provider's own connections, the reactor's waker.
MARGIN = 128


class FdLimitError(Exception):
    """The hard limit is below what the connection caps need."""


def needed(smtp_max_connections: int, http_max_connections: int) -> int | None:
    """Descriptors the caps need, or None when SMTP has no cap (0 = unlimited)."""
    if smtp_max_connections <= 0:
        return None
    return smtp_max_connections + http_max_connections + MARGIN


def plan(soft: int, hard: int, want: int | None) -> int | None:
    """The soft limit to set, or None to leave it as it is.

    With no cap to cover (C{want} None), the soft limit is raised to the
    hard one anyway: nothing bounds the connections, so the more the better.

    @raise FdLimitError: when even the hard limit is below C{want}.
    """
    unlimited = resource.RLIM_INFINITY
    if want is None:
        return hard if soft != unlimited and hard != soft else None
    if soft == unlimited or soft >= want:
        return None
    if hard != unlimited and hard < want:
        raise FdLimitError(
            f"the open-file limit is {hard} but SMTP_MAX_CONNECTIONS + "
            f"HTTP_MAX_CONNECTIONS + {MARGIN} need {want}; raise it (ulimit -n, "
            f"LimitNOFILE=, docker --ulimit nofile=) or lower the caps"
        )
    return want


def ensure(smtp_max_connections: int, http_max_connections: int) -> tuple[int, int]:
    """Raise the soft limit as L{plan} says; return (before, after).

    @raise FdLimitError: when the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = plan(soft, hard, needed(smtp_max_connections, http_max_connections))
    if target is None:
        return soft, soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, target
