"""The mailbox provider's ingress beside the stdout provider's, in one run.

Issue 16's goal: a relay with C{PROVIDER=mailbox} accepts mail within 20% of
the rate it does with C{PROVIDER=stdout} (both parse every message; the
mailbox then keeps it, searchable, evicting the oldest past
C{MAILBOX_MAX_MESSAGES}).  Both relays run at once, started as
C{bench/run.py} starts its own; Postfix's C{smtp-source} sends 10 KB
messages from 50 sessions to each in turn, in alternating pairs, and the
median of the pairwise ratios is the figure.  C{--file} adds a third relay
keeping its mailbox in a SQLite file (C{MAILBOX_PATH}), measured against
stdout the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402

MESSAGES = 2_000
SESSIONS = 50
PAIRS = 6
GOAL = 0.80


def relay(provider: str, extra: dict[str, str] | None = None) -> run.Server:
    """The relay as bench/run.py starts it, with C{provider} and more settings."""

    def env(port: int) -> dict[str, str]:
        settings = {**run.relay_env(port), "PROVIDER": provider, **(extra or {})}
        if provider == "mailbox":
            # The mailbox needs its page's listener; any free loopback port will do.
            settings["HTTP_LISTEN"] = f"tcp:0:interface={run.HOST}"
        return settings

    key = f"smtpproxy-{provider}" + ("-file" if extra and "MAILBOX_PATH" in extra else "")
    return run.Server(key, key, run.SERVERS[0].argv, env)


def rate(port: int, messages: int) -> float:
    """smtp-source's rate against C{port}: messages per second."""
    return messages / run.smtp_source(port, SESSIONS, messages, False, run.MESSAGE_SIZE)


def pairs(
    ports: dict[str, int], first: str, second: str, count: int, messages: int
) -> dict[str, Any]:
    """C{count} alternating pairs; the median ratio of C{first}'s rate to C{second}'s."""
    ratios = []
    rates: dict[str, list[float]] = {first: [], second: []}
    for i in range(count):
        order = (first, second) if i % 2 == 0 else (second, first)
        for key in order:
            rates[key].append(rate(ports[key], messages))
        ratios.append(rates[first][-1] / rates[second][-1])
    median = statistics.median(ratios)
    return {
        "pairs": count,
        "messages": messages,
        "median_ratio": round(median, 3),
        "ratios": [round(r, 3) for r in ratios],
        f"{first}_msg_s": round(statistics.median(rates[first]), 1),
        f"{second}_msg_s": round(statistics.median(rates[second]), 1),
        "goal_met": median >= GOAL,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--file", action="store_true", help="also measure MAILBOX_PATH")
    options = parser.parse_args(argv)
    if not run.ensure_postfix_tools():
        print("smtp-source is needed (Debian's postfix package)", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        stdout = stack.enter_context(run.started(relay("stdout")))
        mailbox = stack.enter_context(run.started(relay("mailbox")))
        ports = {"stdout": stdout.port, "mailbox": mailbox.port}
        if options.file:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpproxy-mb-")))
            kept = relay("mailbox", {"MAILBOX_PATH": str(tmp / "mailbox.sqlite")})
            ports["mailbox_file"] = stack.enter_context(run.started(kept)).port
        for port in ports.values():
            run.warm_up(port)
        results["mailbox_vs_stdout"] = pairs(
            ports, "mailbox", "stdout", options.pairs, options.messages
        )
        if options.file:
            results["mailbox_file_vs_stdout"] = pairs(
                ports, "mailbox_file", "stdout", options.pairs, options.messages
            )
    text = json.dumps(results, indent=2)
    print(text)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "mailbox.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
