"""JSON log lines on a text stream, built on C{twisted.logger}.

Every event becomes one JSON object on one line (R6.1)::

    {"ts": "2026-02-23T10:00:00.123Z", "level": "info", "logger": "smtpproxy.delivery",
     "msg": "message accepted", "id": "a1b2c3", "sender": "app@example.com", ...}

The convention for the whole code base is a plain message plus keyword
fields: C{log.info("message accepted", id=..., sender=...)}.  The message
says what happened; the fields carry the values a log search filters on.
Twisted's own events, with C{{format}} strings, and legacy
C{twisted.python.log.msg} calls come out the same way, so an operator reads
one format whatever emitted the line.

Lines go to stderr: stdout belongs to the stdout provider, whose output is
the mail itself.  A field whose name mentions a password, secret, token or
authorization is printed as C{"***"}; that is a safety net for R6.5, not a
licence to log such values.

For C{twistd}, C{--logger=smtpproxy.jsonlog.observer} selects this format;
the level comes from C{LOG_LEVEL}.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogBeginner,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "JSONLogObserver",
    "install",
    "make_observer",
    "observer",
    "parse_level",
    "render_event",
]

#: Field names containing any of these (case-insensitively) are never printed.
SENSITIVE = ("password", "passwd", "secret", "token", "authorization")
REDACTED = "***"

#: Keys every line has, in this order.  A field with one of these names is
#: printed as C{field_<name>} rather than overwriting them.  C{error} is
#: reserved only on lines that carry a traceback.
_RESERVED = frozenset({"ts", "level", "logger", "msg"})

#: Keys C{twisted.python.log.msg} adds; their content already reaches the
#: line through C{msg}, C{level} and C{error}.
_LEGACY_KEYS = frozenset({"message", "time", "isError", "system", "failure", "why", "format"})

#: How deep L{_redact} looks into nested dicts and lists.
_MAX_DEPTH = 8


def parse_level(name: str) -> object:
    """Map a configured level name (C{debug}, C{info}, C{warn}, C{error}) to Twisted's.

    Returns the L{LogLevel} constant (typed loosely: Twisted's constants come
    from the untyped C{constantly} package).

    C{warning} is accepted for C{warn}, and Twisted's C{critical} is allowed.

    @raise ValueError: for any other name.
    """
    key = name.strip().lower()
    try:
        return LogLevel.levelWithName("warn" if key == "warning" else key)
    except InvalidLogLevelError:
        raise ValueError(
            f"unknown log level {name!r}; expected debug, info, warn or error"
        ) from None


# --- the pure part: one event in, one line out -----------------------------


def render_event(event: LogEvent) -> str:
    """Render one Twisted log event as a single line of JSON (no newline).

    Never raises for odd field values: anything JSON cannot carry is
    printed as its C{repr}, and a failing C{repr} as a placeholder.
    """
    failure, legacy = _failure_of(event)
    clean = _redacted_event(event)
    if failure is not None and legacy:
        # The legacy text of log.err() is the whole traceback; keep the
        # line's message short and put the traceback under "error".
        message = str(event.get("why") or "Unhandled error")
    else:
        message = formatEvent(clean)

    level = event.get("log_level")
    parts: list[tuple[str, str]] = [
        ("ts", _dumps(_timestamp(event.get("log_time")))),
        ("level", _dumps(str(getattr(level, "name", "info")))),
        ("logger", _dumps(str(event.get("log_namespace") or "-"))),
        ("msg", _dumps(message)),
    ]
    if legacy and event.get("system") not in (None, "-"):
        parts.append(("system", _dumps(str(event["system"]))))
    for key, value in clean.items():
        if not isinstance(key, str) or key.startswith("log_"):
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        taken = key in _RESERVED or (key == "error" and failure is not None)
        name = f"field_{key}" if taken else key
        parts.append((name, _dumps(value)))
    if failure is not None:
        parts.append(("error", _dumps(_traceback(failure))))
    return "{" + ", ".join(f"{json.dumps(name)}: {text}" for name, text in parts) + "}"


def _failure_of(event: LogEvent) -> tuple[Failure | None, bool]:
    """The event's failure, and whether the event came from C{twisted.python.log}."""
    legacy = isinstance(event.get("message"), tuple) and "isError" in event
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        return failure, legacy
    failure = event.get("failure") if legacy else None
    return (failure if isinstance(failure, Failure) else None), legacy


def _traceback(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except Exception:  # the failure is already a bug report; do not lose the line
        return f"{failure.type!r}: {_safe_repr(failure.value)}"


def _timestamp(when: object) -> str:
    seconds = when if isinstance(when, int | float) else datetime.now(UTC).timestamp()
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_sensitive(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SENSITIVE)


def _redacted_event(event: LogEvent) -> dict[str, object]:
    """A copy of C{event} with sensitive fields masked, at any nesting depth.

    Twisted's own keys (C{log_*}) are left alone: they are objects the
    formatter needs, and none of them holds user data by name.
    """
    return {
        key: value if key.startswith("log_") else _redact(key, value, ())
        for key, value in event.items()
    }


def _redact(name: object, value: object, parents: tuple[int, ...]) -> object:
    """C{value}, or a copy of it, with sensitive entries masked.

    @param parents: ids of the containers above this one, so a structure
        that contains itself is left as it is (its repr shows the cycle).
    """
    if _is_sensitive(name):
        return REDACTED
    if len(parents) >= _MAX_DEPTH or id(value) in parents:
        return value
    inside = (*parents, id(value))
    if isinstance(value, Mapping):
        return {k: _redact(k, v, inside) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact("", v, inside) for v in value]
    return value


def _dumps(value: object) -> str:
    """JSON text for one value; whatever JSON cannot carry becomes its repr."""
    try:
        return json.dumps(value, default=_safe_repr, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        # Non-string dict keys, NaN, circular structures.
        return json.dumps(_safe_repr(value))


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


# --- the Twisted glue ---------------------------------------------------------


@implementer(ILogObserver)
class JSONLogObserver:
    """Write events at or above a level to C{stream}, one JSON line each.

    Each line is written with a single C{write()} and flushed, so lines from
    different threads never interleave and a crash loses nothing already
    logged.  The level applies to every namespace, Twisted's included.
    """

    def __init__(self, stream: TextIO, level: str = "info") -> None:
        self._stream = stream
        self._levels = LogLevelFilterPredicate(parse_level(level))

    def __call__(self, event: LogEvent) -> None:
        if self._levels(event) is PredicateResult.no:
            return
        self._stream.write(render_event(event) + "\n")
        self._stream.flush()

    def set_level(self, level: str) -> None:
        """Change the minimum level from now on (e.g. once a YAML file is read)."""
        self._levels.setLogLevelForNamespace("", parse_level(level))


def make_observer(level: str, stream: TextIO) -> JSONLogObserver:
    """An observer writing JSON lines at C{level} and above to C{stream}.

    @raise ValueError: if C{level} is not a level name.
    """
    return JSONLogObserver(stream, level)


def observer() -> JSONLogObserver:
    """The factory for C{twistd --logger=smtpproxy.jsonlog.observer}.

    Writes to stderr at the level in C{LOG_LEVEL}.  An unknown level falls
    back to C{info} here: configuration loading reports the bad value with
    its setting name, which is the more useful error.
    """
    level = os.environ.get("LOG_LEVEL", "info")
    try:
        parse_level(level)
    except ValueError:
        level = "info"
    return make_observer(level, sys.stderr)


def install(
    level: str,
    stream: TextIO,
    beginner: LogBeginner = globalLogBeginner,
) -> JSONLogObserver:
    """Make JSON lines on C{stream} the process's log output.

    For running without C{twistd}.  Standard I/O is not redirected into the
    log: stdout carries the stdout provider's output.

    @param beginner: the process-wide one unless a test passes its own.
    """
    made = make_observer(level, stream)
    beginner.beginLoggingTo([made], redirectStandardIO=False)
    return made
