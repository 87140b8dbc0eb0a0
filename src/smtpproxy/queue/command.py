"""C{smtpproxy queue ...}: the operator's view of the durable queue, and its few levers.

It reads C{QUEUE_URL} and the rest of the settings exactly as the relay
does (environment over the C{SMTP_PROXY_CONFIG} YAML file, or C{--config}),
opens the same store and runs one operation on the reactor
(C{twisted.internet.task.react}); the relay may keep running meanwhile.
Output is a short table or a few lines meant for people; C{--json} prints
one JSON document for scripts instead.

Exit status: 0 done, 1 no such message (or it is being delivered), 2 a
usage or configuration problem, 3 the queue could not be opened or used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, NotRequired, TypedDict

from twisted.internet.interfaces import IReactorTime

from smtpproxy import config, providers
from smtpproxy.queue.backend import make_store
from smtpproxy.queue.model import Entry, State, Stats
from smtpproxy.queue.store import QueueStore

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

LIST_LIMIT = 100


class RefusedJson(TypedDict):
    """A recipient an attempt was refused for while others got the message."""

    address: str
    reply: str


class AttemptJson(TypedDict):
    """One delivery attempt in C{queue show --json}."""

    at: float
    outcome: str
    reply: str
    request_id: str | None
    worker: str
    refused: list[RefusedJson]


class EntryJson(TypedDict):
    """A queued message in C{queue list --json} and C{queue show --json}."""

    id: str
    state: str
    queued_at: float
    attempts: int
    next_attempt: float
    size: int
    sender: str
    recipients: list[str]
    failed: list[str]
    client: str
    user: str | None
    route: str
    last_reply: str
    lease_owner: str | None
    lease_until: float | None
    history: NotRequired[list[AttemptJson]]


class StatsJson(TypedDict):
    """C{queue stats --json}."""

    queued: int
    delivering: int
    dead: int
    bytes: int
    oldest_queued_at: float | None
    oldest_age_s: float | None


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add C{queue} and its subcommands to the C{smtpproxy} parser's C{commands}."""
    queue = commands.add_parser(
        "queue",
        help="look at and act on the durable queue (QUEUE_URL)",
        description="Look at and act on the durable queue named by QUEUE_URL.",
    )
    queue.add_argument("--config", help=f"YAML settings file (default: ${config.CONFIG_FILE_ENV})")
    queue.add_argument("--json", action="store_true", help="print JSON for scripts")
    actions = queue.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="queued, delivering and dead messages, oldest first")
    listing.add_argument("--state", choices=[s.value for s in State], help="only this state")
    listing.add_argument("--limit", type=int, default=LIST_LIMIT, help="at most this many")
    show = actions.add_parser("show", help="one message with its attempts")
    show.add_argument("id")
    retry = actions.add_parser("retry", help="make a message (or every dead one) due now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all-dead", action="store_true", help="every dead message")
    delete = actions.add_parser("delete", help="remove a message that is not being delivered")
    delete.add_argument("id")
    actions.add_parser("stats", help="counts by state, bytes held, the oldest message's age")
    queue.set_defaults(run=run)


def run(
    arguments: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Carry out C{smtpproxy queue ...}; the exit status."""
    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        settings = _settings(arguments.config, environ)
    except (OSError, UnicodeDecodeError, config.ConfigError) as e:
        err.write(f"smtpproxy queue: {e}\n")
        return 2
    if not settings.queue_url:
        err.write("smtpproxy queue: QUEUE_URL is not set: this relay has no queue\n")
        return 2
    from twisted.internet import task

    status: list[int] = [3]

    async def main(reactor: IReactorTime) -> None:
        try:
            store = make_store(settings.queue_url, settings.queue_max_bytes, reactor, writer=False)
        except ValueError as e:
            err.write(f"smtpproxy queue: QUEUE_URL: {e}\n")
            status[0] = 2
            return
        try:
            await store.open()
        except Exception as e:
            err.write(f"smtpproxy queue: cannot open the queue: {e}\n")
            return
        try:
            status[0] = await _act(store, arguments, reactor.seconds(), out)
        except Exception as e:
            err.write(f"smtpproxy queue: {arguments.action} failed: {e!r}\n")
        finally:
            await store.close()

    def start(reactor: IReactorTime) -> Deferred[None]:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(main(reactor))

    # react() ends with sys.exit; the status is ours to return.
    with contextlib.suppress(SystemExit):
        task.react(start)
    return status[0]


def _settings(path: str | None, environ: Mapping[str, str]) -> config.Config:
    providers.names()  # registers the providers' settings, as the relay does
    path = path or environ.get(config.CONFIG_FILE_ENV) or None
    text = None
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return config.load(environ, text, yaml_source=path or "config file")


async def _act(store: QueueStore, arguments: argparse.Namespace, now: float, out: IO[str]) -> int:
    as_json: bool = arguments.json
    action = arguments.action
    if action == "list":
        state = State(arguments.state) if arguments.state else None
        entries = await store.list(state, max(1, arguments.limit))
        out.write(_dump([_entry(e) for e in entries]) if as_json else _table(entries, now))
        return 0
    if action == "show":
        entry = await store.show(arguments.id)
        if entry is None:
            out.write(_dump(None) if as_json else f"no message {arguments.id}\n")
            return 1
        out.write(_dump(_entry(entry, history=True)) if as_json else _details(entry, now))
        return 0
    if action == "retry" and arguments.all_dead:
        count = await store.retry_dead(now)
        out.write(_dump({"retried": count}) if as_json else f"{count} dead messages due now\n")
        return 0
    if action == "retry":
        found = await store.retry(arguments.id, now)
        text = f"{arguments.id} is due now\n" if found else f"no message {arguments.id}\n"
        out.write(_dump({"id": arguments.id, "retried": found}) if as_json else text)
        return 0 if found else 1
    if action == "delete":
        gone = await store.delete(arguments.id)
        text = (
            f"{arguments.id} deleted\n"
            if gone
            else f"{arguments.id}: no such message, or it is being delivered\n"
        )
        out.write(_dump({"id": arguments.id, "deleted": gone}) if as_json else text)
        return 0 if gone else 1
    stats = await store.stats(now)
    out.write(_dump(_stats(stats, now)) if as_json else _stats_text(stats, now))
    return 0


def _dump(document: object) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _entry(entry: Entry, history: bool = False) -> EntryJson:
    envelope = entry.envelope
    document: EntryJson = {
        "id": entry.id,
        "state": entry.state.value,
        "queued_at": entry.queued_at,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "size": entry.size,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "failed": list(entry.failed),
        "client": envelope.client,
        "user": envelope.user,
        "route": envelope.route,
        "last_reply": entry.last_reply,
        "lease_owner": entry.lease_owner,
        "lease_until": entry.lease_until,
    }
    if history:
        document["history"] = [
            {
                "at": a.at,
                "outcome": a.outcome.value,
                "reply": a.reply,
                "request_id": a.request_id,
                "worker": a.worker,
                "refused": [{"address": r.address, "reply": r.reply} for r in a.refused],
            }
            for a in entry.history
        ]
    return document


def _stats(stats: Stats, now: float) -> StatsJson:
    oldest = stats.oldest_queued_at
    return {
        "queued": stats.queued,
        "delivering": stats.delivering,
        "dead": stats.dead,
        "bytes": stats.bytes,
        "oldest_queued_at": oldest,
        "oldest_age_s": None if oldest is None else round(now - oldest, 3),
    }


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def age(seconds: float) -> str:
    """A duration as people read it: C{45s}, C{12m}, C{3h05m}, C{2d04h}."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _recipients(recipients: Sequence[str]) -> str:
    if not recipients:
        return ""
    more = f" (+{len(recipients) - 1})" if len(recipients) > 1 else ""
    return recipients[0] + more


#: What must not reach the operator's terminal as it is: C0 controls (tab and
#: line feed too: a field is one line), DEL, the C1 controls, the Unicode line
#: and paragraph separators and the bidirectional overrides.  Replies come
#: from the backend (Graph's error code and message) and addresses from SMTP
#: clients: an escape sequence in them must show, not run.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """C{text} with every terminal control written as an escape (C{\\x1b}, C{\\u202e})."""
    return _CONTROL.sub(_escape, text)


def _table(entries: Sequence[Entry], now: float) -> str:
    if not entries:
        return "the queue is empty\n"
    rows = [("ID", "STATE", "AGE", "TRIES", "NEXT", "SIZE", "FROM", "TO", "LAST REPLY")]
    for e in entries:
        due = (
            "-"
            if e.state == State.DEAD
            else ("now" if e.next_attempt <= now else "in " + age(e.next_attempt - now))
        )
        rows.append(
            (
                e.id,
                e.state.value,
                age(now - e.queued_at),
                str(e.attempts),
                due,
                str(e.size),
                e.envelope.sender or "<>",
                _recipients(e.envelope.recipients),
                e.last_reply[:60],
            )
        )
    shown = [tuple(visible(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in shown) for i in range(len(shown[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in shown
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _details(entry: Entry, now: float) -> str:
    envelope = entry.envelope
    lines = [
        f"id:          {entry.id}",
        f"state:       {entry.state.value}",
        f"queued:      {_when(entry.queued_at)} UTC ({age(now - entry.queued_at)} ago)",
        f"attempts:    {entry.attempts}",
        f"next:        {_when(entry.next_attempt)} UTC",
        f"size:        {entry.size} bytes",
        f"from:        {envelope.sender or '<>'}",
        f"to:          {', '.join(envelope.recipients)}",
        *([f"failed for:  {', '.join(entry.failed)}"] if entry.failed else []),
        f"client:      {envelope.client}",
        f"user:        {envelope.user or '-'}",
        f"route:       {envelope.route or '-'}",
    ]
    if entry.lease_owner:
        lines.append(f"leased by:   {entry.lease_owner} until {_when(entry.lease_until or 0)} UTC")
    if entry.last_reply:
        lines.append(f"last reply:  {entry.last_reply}")
    if entry.history:
        lines.append("history:")
        for a in entry.history:
            request = f" request-id {a.request_id}" if a.request_id else ""
            lines.append(f"  {_when(a.at)} UTC  {a.outcome.value:<9}  {a.reply}{request}")
            lines.extend(f"      refused <{r.address}>: {r.reply}" for r in a.refused)
    return "\n".join(visible(line) for line in lines) + "\n"


def _stats_text(stats: Stats, now: float) -> str:
    oldest = stats.oldest_queued_at
    lines = [
        f"queued:      {stats.queued}",
        f"delivering:  {stats.delivering}",
        f"dead:        {stats.dead}",
        f"bytes:       {stats.bytes}",
        "oldest:      " + ("-" if oldest is None else f"{age(now - oldest)} ago"),
    ]
    return "\n".join(lines) + "\n"
