"""What the SQLite queue's I/O failed with, as the front door should see it.  (Pure.)

The store's threads meet the operating system's and SQLite's own errors:
C{OSError} with an errno from writing a body file, C{sqlite3.Error} with
SQLite's result code from a transaction.  A few of them have a clear
meaning for the client and the operator, and each gets an error type of
its own (L{smtpproxy.queue.model}), which L{smtpproxy.errors.reply_for_failure}
turns into the SMTP reply and the front doors into a log line naming the
cause; anything else is passed on unchanged and answered as a local error.
"""

from __future__ import annotations

import errno
import os
import sqlite3

from smtpproxy.queue.model import QueueBusyError, QueueFullError, QueueReadOnlyError

__all__ = ["WRITE_LOCK_WAIT", "storage_error"]

#: Seconds the relay's queue connection waits for SQLite's write lock when
#: another process holds it, before the work fails with L{QueueBusyError}.
#:
#: The relay's own transactions, and the operator command's, hold the lock
#: for milliseconds, so a wait this long only runs out when something else
#: keeps it (a C{sqlite3} shell left inside C{BEGIN}, a backup tool).  It is
#: short because the store has one connection, on one thread: while a
#: transaction waits, every other one waits behind it (the next enqueues,
#: the worker's claims, the readiness check), and a client in DATA waits
#: for its enqueue.  With 2 s an enqueue is answered within about two waits
#: (one batch ahead of it, then its own): a clear "451 4.3.0 queue busy"
#: rather than SQLite's old 30 s and a generic local error.
WRITE_LOCK_WAIT = 2.0

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_error(error: BaseException, lock_wait: float = WRITE_LOCK_WAIT) -> BaseException:
    """The error the front door should get for C{error}; C{error} itself when none fits.

    - No room (C{ENOSPC}, C{EDQUOT}, C{EFBIG}, SQLite's C{FULL}):
      L{QueueFullError}, answered 452 4.3.1.
    - A read-only filesystem (C{EROFS}) or database (SQLite's C{READONLY}
      and its extended codes): L{QueueReadOnlyError}, answered 451 4.3.0.
    - The write lock held elsewhere past C{lock_wait} (SQLite's C{BUSY}):
      L{QueueBusyError}, answered 451 4.3.0.
    """
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _FULL_ERRNOS:
            return QueueFullError(f"no room for the body: {os.strerror(error.errno)}")
        if error.errno == errno.EROFS:
            return QueueReadOnlyError(f"the queue's storage is read-only: {error}")
        return error
    if isinstance(error, sqlite3.Error):
        # The primary code: the low byte of an extended one (SQLITE_READONLY_DBMOVED...).
        code = int(getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return QueueFullError(f"the queue's database is full: {error}")
        if code == sqlite3.SQLITE_READONLY:
            return QueueReadOnlyError(f"the queue's database is read-only: {error}")
        if code == sqlite3.SQLITE_BUSY:
            return QueueBusyError(
                f"another process held the queue's write lock for over {lock_wait:g} s"
            )
    return error
