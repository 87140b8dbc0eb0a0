"""Files that hold mail are created readable by their owner only, whatever the umask.

SQLite creates a database file with the process umask, 0644 under the usual
022: every local user could read the mail in it.  Creating the empty file
first with C{os.open(O_CREAT | O_EXCL, 0o600)} fixes its mode before SQLite
opens it (an empty file is a valid new database), and SQLite gives the
C{-wal} and C{-shm} files it creates later the database file's own mode.

A file that already exists is left as it is: its mode may be the operator's
deliberate choice (a group that backs it up), and changing it behind their
back would hide the question.  The caller is told which existing files
group or others can reach, so it can log a warning.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

#: SQLite's companions of a WAL-mode database, created beside it with its mode.
SQLITE_COMPANIONS = ("-wal", "-shm")


#: Mode bits that make a file readable beyond its owner: group or others.
GROUP_OR_OTHERS = 0o077
#: Only others (a group that may read it, say for backups, is the operator's choice).
OTHERS = 0o007


def create_private(
    path: str,
    companions: Sequence[str] = SQLITE_COMPANIONS,
    reported: int = GROUP_OR_OTHERS,
) -> list[tuple[str, int]]:
    """Create C{path} empty with mode 0600 unless it exists; report the open ones.

    @return: L{exposed}C{(path, companions, reported)}.  An error creating the
        file is not raised here: the database open that follows reports it
        with its own words.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        pass  # exists (checked below), or cannot be made: SQLite's open says why
    else:
        os.close(descriptor)
    return exposed(path, companions, reported)


def exposed(
    path: str,
    companions: Sequence[str] = SQLITE_COMPANIONS,
    reported: int = GROUP_OR_OTHERS,
) -> list[tuple[str, int]]:
    """C{(name, mode)} of each existing file among C{path} and C{path + suffix} (each of
    C{companions}) whose mode has any of the C{reported} bits."""
    found = []
    for name in (path, *(path + suffix for suffix in companions)):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError:
            continue
        if mode & reported:
            found.append((name, mode))
    return found
