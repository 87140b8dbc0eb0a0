"""docs/operations.md lists every log message the code can write, and nothing else.

The list is read from the source, not from a run: every call of a logger
method (C{log.info(...)}, C{log.failure(...)}, ...), of a log summary's
C{emit} and of the PROXY wrapper's C{_log_refusal} whose message is written
in the code.  A message added without a line in the doc fails here, and so
does a doc line for a message that no longer exists.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "smtpproxy"
OPERATIONS = ROOT / "docs" / "operations.md"

_LEVELS = frozenset({"debug", "info", "warn", "error", "critical", "failure"})


@dataclass(frozen=True)
class Message:
    """A log message as written in the code: whole, or the fixed pieces of an f-string."""

    where: str
    pieces: tuple[str, ...]
    whole: bool


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _message_argument(call: ast.Call) -> ast.expr | None:
    """The argument holding the message, for the calls that log one."""
    func = call.func
    if isinstance(func, ast.Name) and func.id == "emit" and call.args:
        return call.args[0]  # a logger method chosen at run time (graph.py)
    if not isinstance(func, ast.Attribute):
        return None
    logger_like = "log" in _receiver(func.value).lower()
    if func.attr in _LEVELS and logger_like and call.args:
        return call.args[0]
    if func.attr == "emit" and logger_like and len(call.args) > 1:
        return call.args[1]  # LogSummary.emit(level, event, client, ...)
    if func.attr == "_log_refusal" and call.args:
        return call.args[0]
    return None


def _pieces(node: ast.expr, where: str) -> Iterator[Message]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield Message(where, (node.value,), True)
    elif isinstance(node, ast.JoinedStr):
        fixed = tuple(
            part.value
            for part in node.values
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and part.value.strip()
        )
        yield Message(where, fixed, False)
    elif isinstance(node, ast.IfExp):
        yield from _pieces(node.body, where)
        yield from _pieces(node.orelse, where)
    # A plain name (LogSummary passing its caller's event on) is covered
    # where the caller writes the text.


def logged_messages() -> list[Message]:
    found: list[Message] = []
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                argument = _message_argument(node)
                if argument is not None:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.extend(_pieces(argument, where))
    return found


def documented_messages() -> list[str]:
    """The backticked C{msg} values in the first column of the log tables."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("## Log lines", 1)[1].split("\n## ", 1)[0]
    names: list[str] = []
    for line in section.splitlines():
        cells = line.split(" | ")
        if not line.startswith("| `") or len(cells) < 3 or line.startswith("| `msg` |"):
            continue  # not a table row, or a table's heading
        names += re.findall(r"`([^`]+)`", cells[0])
    return names


class LogMessagesDocumentedTests(SynchronousTestCase):
    def test_scan_finds_the_messages(self) -> None:
        """The scan sees plain messages, f-strings, run-time-chosen methods, summaries and
        PROXY refusals (else the next test could pass by finding nothing)."""
        whole = {m.pieces[0] for m in logged_messages() if m.whole}
        for known in (
            "message delivered",
            "adjusting how the message is sent",
            "connection refused",
            "no PROXY header received, closing",
            "session table has room again: idle limits restored",
            "setting replaced by a fallback",
        ):
            self.assertIn(known, whole)
        fixed = {piece for m in logged_messages() if not m.whole for piece in m.pieces}
        self.assertTrue({" (repeated)", "closing connection: ", " validation failed"} <= fixed)

    def test_every_message_in_the_code_is_documented(self) -> None:
        """Each message, or each fixed piece of an f-string message, appears in a log
        table of docs/operations.md."""
        documented = documented_messages()
        text = "\n".join(documented)
        missing = []
        for message in logged_messages():
            if message.whole and message.pieces[0] not in documented:
                missing.append(f"{message.where}: {message.pieces[0]!r}")
            elif not message.whole and not all(piece in text for piece in message.pieces):
                missing.append(f"{message.where}: pieces {message.pieces!r}")
        self.assertEqual(missing, [], "log messages missing from docs/operations.md")

    def test_every_documented_message_exists(self) -> None:
        """Each msg in the doc's tables is one the code writes: written whole, or matching
        an f-string's fixed pieces with the placeholders filled in (a <name> in the doc)."""
        messages = logged_messages()
        whole = {m.pieces[0] for m in messages if m.whole}
        templates = [m.pieces for m in messages if not m.whole]
        stale = []
        for name in documented_messages():
            if name in whole:
                continue
            if any(_fits(name, pieces) for pieces in templates):
                continue
            stale.append(name)
        self.assertEqual(stale, [], "docs/operations.md lists messages the code never writes")


def _fits(name: str, pieces: tuple[str, ...]) -> bool:
    """Does C{name} contain C{pieces} in order, with something (or a <placeholder>) between?"""
    position = 0
    for piece in pieces:
        found = name.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    return True
