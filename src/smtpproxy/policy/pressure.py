"""Connection storms: shorter idle limits while the session table is nearly full.

A client that connects and says nothing holds a session slot for as long as
the relay lets it idle.  With the plain 300 s command timeout, idle
connections that fill C{SMTP_MAX_CONNECTIONS} lock every other client out
for five minutes.  So, as Postfix's smtpd does under stress, the limits
shrink when the table fills up:

 - Before its first command (after the greeting, and again after STARTTLS,
   which covers a stalled handshake) a session may idle
   C{SMTP_GREETING_TIMEOUT} seconds (never more than the command timeout).
 - Once the open sessions reach L{ENTER} (80%) of C{SMTP_MAX_CONNECTIONS},
   the relay is I{stressed}: that limit becomes at most L{STRESSED_GREETING}
   seconds and the command timeout at most L{STRESSED_COMMAND} seconds, for
   sessions already open as well as new ones.
 - It stays stressed until the open sessions drop below L{LEAVE} (70%); the
   gap keeps a table hovering at the threshold from switching on every
   connection.

The DATA timeout and a session waiting for its delivery are not touched:
a message on its way is worth finishing.

Everything here is pure; L{smtpproxy.smtp.protocol} applies the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ENTER",
    "LEAVE",
    "LISTEN_BACKLOG",
    "STRESSED_COMMAND",
    "STRESSED_GREETING",
    "IdleLimits",
    "idle_limits",
    "split_endpoint",
    "stressed",
    "with_backlog",
]

ENTER = 0.8
LEAVE = 0.7
STRESSED_GREETING = 5.0
STRESSED_COMMAND = 10.0

#: The listen queue asked for when the operator's endpoint names none.
#: Twisted's default is 50: a burst of connections beyond that while the
#: reactor is busy gets SYNs dropped and clients retrying after a second or
#: more.  The kernel caps the value at C{net.core.somaxconn}.
LISTEN_BACKLOG = 1024

# Endpoint types whose listener takes a backlog parameter.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


@dataclass(frozen=True, slots=True)
class IdleLimits:
    """How long a session in command mode may stay silent, in seconds."""

    greeting: float
    command: float


def idle_limits(greeting: float, command: float, is_stressed: bool) -> IdleLimits:
    """The idle limits in force.

    @param greeting: the configured limit before the first command.
    @param command: the configured command timeout.
    """
    before_first = min(greeting, command)
    if is_stressed:
        return IdleLimits(min(before_first, STRESSED_GREETING), min(command, STRESSED_COMMAND))
    return IdleLimits(before_first, command)


def stressed(open_sessions: int, max_sessions: int, now_stressed: bool) -> bool:
    """Whether the relay is stressed with C{open_sessions} of C{max_sessions} open.

    C{max_sessions} of 0 means no cap, hence never stressed.
    """
    if max_sessions <= 0:
        return False
    if now_stressed:
        return open_sessions >= LEAVE * max_sessions
    return open_sessions >= ENTER * max_sessions


def with_backlog(endpoint: str, backlog: int = LISTEN_BACKLOG) -> str:
    """Add C{backlog=} to a server endpoint description that does not set one.

    Only endpoint types that take a backlog are changed; C{systemd:} and
    anything unknown pass through as written.
    """
    parts = split_endpoint(endpoint)
    if not parts or parts[0] not in _BACKLOG_TYPES:
        return endpoint
    if any(part.startswith("backlog=") for part in parts[1:]):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def split_endpoint(endpoint: str) -> list[str]:
    """Split on colons not escaped with a backslash (Twisted's endpoint syntax).

    The escapes stay in the parts, so joining them with colons gives the
    description back.
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in endpoint:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts
