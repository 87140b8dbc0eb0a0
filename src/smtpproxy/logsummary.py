"""Repeated log events summarised per client and interval.

Some events happen as often as a client likes: a banned address that
connects in a loop is refused thousands of times a second, and one log line
per refusal turns a cheap attack into a disk-filling one.  Such events go
through a L{LogSummary}: the first event for a client is logged at once,
with all its fields; further ones within the interval are only counted, and
when the interval ends one line per client gives the count.  A client that
keeps going gets one line per interval; one that stops is forgotten after a
quiet interval, so its next event is again logged at once.

The table of clients is bounded (L{MAX_CLIENTS}): once it is full, events
from clients not in it are counted together and reported as one line for
"other clients".  Memory and log volume therefore stay bounded however many
addresses an attacker has.

L{RepeatCounter} is the pure part (no clock, no logger); L{LogSummary} adds
the timer, from the injected reactor, and the log calls.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

__all__ = ["INTERVAL", "MAX_CLIENTS", "LogSummary", "RepeatCounter"]

#: Seconds over which repeats of one event from one client are counted.
INTERVAL = 60.0
#: Distinct (event, client) pairs tracked at once.
MAX_CLIENTS = 1000


class RepeatCounter:
    """Counts repeats of events per client within one interval.

    @param max_keys: how many (event, client) pairs are tracked; past that,
        events are counted per event under "other clients".
    """

    def __init__(self, max_keys: int = MAX_CLIENTS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        # (event, client) -> events not logged in the current interval.
        self._repeats: dict[tuple[str, str], int] = {}
        # event -> events from clients the table had no room for.
        self._untracked: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._repeats)

    def __bool__(self) -> bool:
        return bool(self._repeats or self._untracked)

    def record(self, event: str, client: str) -> bool:
        """Note one C{event} from C{client}; True if it should be logged now."""
        key = (event, client)
        repeats = self._repeats.get(key)
        if repeats is not None:
            self._repeats[key] = repeats + 1
            return False
        if len(self._repeats) >= self.max_keys:
            self._untracked[event] = self._untracked.get(event, 0) + 1
            return False
        self._repeats[key] = 0
        return True

    def end_interval(self) -> list[tuple[str, str | None, int]]:
        """Close the interval: C{(event, client, count)} for each summary line to write.

        C{client} is None for the events of untracked clients.  Clients with
        repeats stay in the table (a continuing attack keeps being counted,
        not logged); clients that were quiet are forgotten.
        """
        report: list[tuple[str, str | None, int]] = []
        quiet: list[tuple[str, str]] = []
        for key, repeats in self._repeats.items():
            if repeats:
                report.append((key[0], key[1], repeats))
                self._repeats[key] = 0
            else:
                quiet.append(key)
        for key in quiet:
            del self._repeats[key]
        report.extend((event, None, count) for event, count in self._untracked.items())
        self._untracked.clear()
        return report


class LogSummary:
    """Logs the first of an event per client at once and summarises the repeats.

    @param log: where lines go.
    @param clock: the reactor (a C{Clock} in tests); a timer runs only while
        something is being counted.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        interval: float = INTERVAL,
        max_keys: int = MAX_CLIENTS,
    ) -> None:
        self._log = log
        self._clock = clock
        self.interval = interval
        self._counter = RepeatCounter(max_keys)
        # The level each event was first logged at, for its summary line.
        self._levels: dict[str, LogLevel] = {}
        self._timer: IDelayedCall | None = None
        self._since = 0.0  # when the interval being counted began

    def emit(self, level: LogLevel, event: str, client: str, **fields: object) -> None:
        """Log C{event} (a plain message) from C{client} now, or count it for the summary.

        @param level: the level of this line and of its summary lines.
        @param fields: the line's other fields; only the first event of an
            interval is logged with them.
        """
        self._levels.setdefault(event, level)
        if self._counter.record(event, client):
            self._log.emit(level, event, client=client, **fields)
        if self._timer is None:
            self._start_interval()

    def _start_interval(self) -> None:
        self._since = self._clock.seconds()
        self._timer = self._clock.callLater(self.interval, self._interval_over)

    def _interval_over(self) -> None:
        self._timer = None
        self.flush()
        if self._counter:
            self._start_interval()

    def flush(self) -> None:
        """Write the summary lines for the interval so far and start a new one."""
        seconds = round(self._clock.seconds() - self._since, 1)
        self._since = self._clock.seconds()
        for event, client, count in self._counter.end_interval():
            level = self._levels[event]
            if client is None:
                self._log.emit(
                    level,
                    f"{event} (repeated, other clients)",
                    count=count,
                    seconds=seconds,
                )
            else:
                self._log.emit(
                    level, f"{event} (repeated)", client=client, count=count, seconds=seconds
                )

    def stop(self) -> None:
        """Write what was counted and stop the timer (the listener is going away)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.flush()
