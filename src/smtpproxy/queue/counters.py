"""Counters kept in the queue's database: the statements, shared by both backends.

A counter is a key (for example one mailbox's messages in one window), a
slot (a time bucket's number) and a count.  Adding is one
C{INSERT ... ON CONFLICT DO UPDATE SET n = n + ?} per slot: atomic in
SQLite and in PostgreSQL alike, so replicas sharing a PostgreSQL queue add
to the same row without losing each other's counts.  Reading takes the
slots of a key from a given one on; slots older than a window are deleted
as counts are added, so a key holds at most a window's worth of rows.

Each function is one transaction's work on a DB-API cursor; C{mark} is the
driver's placeholder (C{?} for sqlite3, C{%s} for psycopg).  The table is
created with C{IF NOT EXISTS} when the queue opens, so a queue made by an
earlier version gains it without a schema change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TABLE = """
CREATE TABLE IF NOT EXISTS queue_counters (
    key text NOT NULL,
    slot bigint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (key, slot)
)
"""


def add(
    cursor: Any,
    mark: str,
    counts: Sequence[tuple[str, int, int]],
    forget_before: Mapping[str, int],
) -> None:
    """Add each (key, slot, amount); drop each C{forget_before} key's slots before its value."""
    for key, slot, amount in counts:
        # mark is the driver's placeholder, a constant; the values are bound.
        values = f"VALUES ({mark}, {mark}, {mark})"
        cursor.execute(
            f"INSERT INTO queue_counters (key, slot, n) {values}"
            " ON CONFLICT (key, slot) DO UPDATE SET n = queue_counters.n + excluded.n",
            (key, slot, amount),
        )
    for key, before in forget_before.items():
        cursor.execute(
            f"DELETE FROM queue_counters WHERE key = {mark} AND slot < {mark}",  # noqa: S608
            (key, before),
        )


def read(cursor: Any, mark: str, since: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """The (key, slot, count) rows of each key of C{since}, from its slot on, counts above 0."""
    found: list[tuple[str, int, int]] = []
    for key, first in since.items():
        cursor.execute(
            f"SELECT slot, n FROM queue_counters WHERE key = {mark} AND slot >= {mark}"  # noqa: S608
            " AND n > 0 ORDER BY slot",
            (key, first),
        )
        found.extend((key, int(slot), int(n)) for slot, n in cursor.fetchall())
    return found
