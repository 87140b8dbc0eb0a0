"""A/B: smtpproxy against one peer, in many short alternating pairs.

C{bench/run.py} measures each server for a few long rounds one after another
and keeps each one's best, so on a shared machine a burst of other work that
lands on one server's round and not the other's moves the ratio between them
by 20% or more.  Here both servers are started once and kept running (each on
its own port), and the same short load (by default run.py's parallel50
scenario with 2,000 messages) goes to one and then the other, many times,
the order swapped every pair: A B, B A, A B...  Each pair gives a ratio of
two measurements taken seconds apart, which a slow drift in the machine's
load moves little; the median of those ratios ignores the pairs a burst did
hit.  CPU time per message (C{/proc/PID/stat}, as run.py reads it) is paired
the same way.

Everything about starting, loading and reading the servers is run.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as a script, only bench/ is on the path; run.py is imported as bench.run.
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402

OURS = run.SERVERS[0]
PEERS = {s.key: s for s in run.SERVERS[1:]}
# 2,000 rather than 1,000: CPU time is counted in 10 ms ticks, and smtp-sink
# spends about 0.2 ms per message, so 1,000 messages would be only ~20 ticks.
MESSAGES = 2_000
PAIRS = 10


@dataclasses.dataclass(frozen=True)
class Pair:
    """One pair of measurements: smtpproxy's and the peer's figures, and which went first."""

    first: str
    ours: dict[str, Any]
    theirs: dict[str, Any]

    @property
    def rate_ratio(self) -> float:
        """smtpproxy's msg/s over the peer's: above 1, smtpproxy is faster."""
        return float(self.ours["rate"]) / float(self.theirs["rate"])

    @property
    def cpu_ratio(self) -> float | None:
        """The peer's CPU per message over smtpproxy's: above 1, smtpproxy needs less.

        None when smtpproxy's CPU time rounded to no tick at all.
        """
        ours = float(self.ours["cpu_ms_per_message"])
        return float(self.theirs["cpu_ms_per_message"]) / ours if ours > 0 else None


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def scenario(messages: int, sessions: int) -> run.Throughput:
    """run.py's parallel50 scenario (a connection per message), resized."""
    base = run.make_plan(True, {"parallel50"}).throughput[0]
    return dataclasses.replace(
        base,
        key=f"parallel{sessions}",
        title=f"10 KB messages, {sessions} parallel sessions",
        sessions=sessions,
        messages=messages,
    )


def alive(running: run.Running) -> None:
    if running.proc.poll() is not None:
        raise RuntimeError(f"{running.server.key} exited with {running.proc.returncode}")


def measure_pairs(peer: run.Server, load: run.Throughput, pairs: int) -> list[Pair]:
    """Start both servers once, warm both up, then alternate the load between them.

    A failure ends the run early; the pairs completed so far are returned.
    """
    done: list[Pair] = []
    with ExitStack() as stack:
        ours = stack.enter_context(run.started(OURS))
        theirs = stack.enter_context(run.started(peer))
        run.log(f"{OURS.key} on port {ours.port}, {peer.key} on port {theirs.port}")
        for running in (ours, theirs):
            run.warm_up(running.port)
        for n in range(pairs):
            order = (ours, theirs) if n % 2 == 0 else (theirs, ours)
            figures: dict[str, dict[str, Any]] = {}
            try:
                for running in order:
                    figures[running.server.key] = run.throughput(
                        running, load, timed=False, warm=False
                    )
                    alive(running)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError) as e:
                run.log(f"pair {n + 1} failed: {e}")
                break
            pair = Pair(order[0].server.key, figures[OURS.key], figures[peer.key])
            done.append(pair)
            run.log(
                f"pair {n + 1} of {pairs} ({order[0].server.key} first): "
                f"{float(pair.ours['rate']):,.0f} vs {float(pair.theirs['rate']):,.0f} msg/s, "
                f"{pair.rate_ratio:.2f}x"
            )
    return done


def x(value: float) -> str:
    return f"{value:.2f}x"


def report(
    peer: run.Server, load: run.Throughput, pairs: list[Pair], wall: float, command: str
) -> tuple[str, dict[str, Any]]:
    """The markdown table and summary, and the same figures for the JSON file."""
    rates = [p.rate_ratio for p in pairs]
    cpus = [r for r in (p.cpu_ratio for p in pairs) if r is not None]
    rate = spread(rates)
    cpu = spread(cpus) if cpus else None
    rows = [
        [
            str(n),
            "smtpproxy" if p.first == OURS.key else peer.key,
            run.fmt(float(p.ours["rate"])),
            run.fmt(float(p.theirs["rate"])),
            x(p.rate_ratio),
            run.fmt(float(p.ours["cpu_ms_per_message"]), 3),
            run.fmt(float(p.theirs["cpu_ms_per_message"]), 3),
            "n/a" if p.cpu_ratio is None else x(p.cpu_ratio),
        ]
        for n, p in enumerate(pairs, 1)
    ]
    header = [
        "pair",
        "first",
        "smtpproxy msg/s",
        f"{peer.key} msg/s",
        f"smtpproxy ÷ {peer.key}",
        "smtpproxy CPU ms/msg",
        f"{peer.key} CPU ms/msg",
        f"CPU/msg {peer.key} ÷ smtpproxy",
    ]
    summary = (
        f"smtpproxy ÷ {peer.key}: median {x(rate['median'])} "
        f"(min {x(rate['min'])}, max {x(rate['max'])}) over {len(pairs)} pairs; "
        + (
            f"CPU per message ({peer.key} ÷ smtpproxy, above 1: smtpproxy needs less): "
            f"median {x(cpu['median'])} (min {x(cpu['min'])}, max {x(cpu['max'])})"
            if cpu
            else "CPU per message: n/a"
        )
    )
    lines = [
        f"## A/B: smtpproxy and {peer.label}",
        "",
        f"Command: `{command}`",
        "",
        f"{load.messages:,} messages of {run.MESSAGE_SIZE:,} bytes per measurement from "
        f"smtp-source (`-s {load.sessions}`), one connection per message. Both servers were "
        "started once, warmed up with 100 messages each and kept running on their own "
        "ports for the whole run; each pair measures one then the other, the order "
        f"swapped every pair. Wall time {wall:.0f} s; finished "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        *run.table(header, rows),
        "",
        summary,
    ]
    figures = {
        "peer": peer.key,
        "messages": load.messages,
        "sessions": load.sessions,
        "message_size": run.MESSAGE_SIZE,
        "servers": "started once, kept running",
        "wall_seconds": round(wall, 1),
        "command": command,
        "rate_ratio": rate,
        "cpu_ratio": cpu,
        "pairs": [
            {
                "first": p.first,
                "smtpproxy": p.ours,
                peer.key: p.theirs,
                "rate_ratio": p.rate_ratio,
                "cpu_ratio": p.cpu_ratio,
            }
            for p in pairs
        ],
    }
    return "\n".join(lines) + "\n", figures


def write_docs(peer_key: str, text: str) -> None:
    """Put this run's section into docs/performance.md, replacing the peer's last one.

    A new section goes after the other A/B sections, or else right after
    run.py's block of tables.
    """
    begin = f"<!-- ab:{peer_key}:begin (written by bench/ab.py --docs; edit outside) -->"
    end = f"<!-- ab:{peer_key}:end -->"
    block = f"{begin}\n{text}{end}\n"
    current = run.DOC.read_text(encoding="utf-8") if run.DOC.exists() else run.DOC_HEAD
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    others = list(re.finditer(r"<!-- ab:[\w-]+:end -->", current))
    if pattern.search(current):
        updated = pattern.sub(lambda m: block, current, count=1)
    elif others or run.END in current:
        # After the last A/B section, or else after run.py's tables.
        at = others[-1].end() if others else current.index(run.END) + len(run.END)
        updated = current[:at] + "\n\n" + block.rstrip("\n") + current[at:]
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    run.DOC.write_text(updated, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="smtpproxy against one peer: the median of many short alternating pairs."
    )
    parser.add_argument("--peer", choices=sorted(PEERS), default="twisted")
    parser.add_argument("--pairs", type=int, default=PAIRS, help=f"default {PAIRS}")
    parser.add_argument(
        "--messages", type=int, default=MESSAGES, help=f"per measurement (default {MESSAGES:,})"
    )
    parser.add_argument("--sessions", type=int, default=50, help="smtp-source -s (default 50)")
    parser.add_argument(
        "--docs",
        action="store_true",
        help="also write the result into docs/performance.md (make bench does)",
    )
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.messages < 1 or args.sessions < 1:
        parser.error("--pairs, --messages and --sessions must be at least 1")

    run.raise_file_limit()
    if not run.ensure_postfix_tools():
        run.log("smtp-source is required and could not be installed (Debian package postfix)")
        return 2
    peer = PEERS[args.peer]
    if not peer.needs():
        run.log(f"{peer.key}: could not install what it needs")
        return 2
    load = scenario(args.messages, args.sessions)

    started_at = time.monotonic()
    load_before = os.getloadavg()[0]
    pairs = measure_pairs(peer, load, args.pairs)
    wall = time.monotonic() - started_at
    if not pairs:
        run.log("no pair completed")
        return 1
    options = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "bench/ab.py", *options])
    text, figures = report(peer, load, pairs, wall, command)
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(text)
    if args.docs:
        write_docs(peer.key, text)
        run.log(f"wrote {run.DOC.relative_to(ROOT)}")
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = run.RESULTS / f"ab-{peer.key}-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1))
    out.with_suffix(".md").write_text(text)
    run.log(f"done in {wall:.0f} s; raw figures in {out.relative_to(ROOT)}.json")
    return 0 if len(pairs) == args.pairs else 1


if __name__ == "__main__":
    sys.exit(main())
