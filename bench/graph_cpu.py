"""CPU per message of the Graph path against the stdout path, side by side.

The Graph provider does more work per message than the stdout provider (an
HTTP request, its JSON or base64 body, the reply), and the question is how
much more.  This starts three relays at once: the stdout provider, the Graph
provider against the fake Graph over plain HTTP, and the Graph provider
against a second fake over HTTPS (a throw-away self-signed certificate the
relay trusts through C{SSL_CERT_FILE}).  Each fake runs in its own process
(C{bench/peers/fake_graph.py}), so its work is not counted as the relay's.

After a warm-up each, the same load (C{smtp-source}, 10 KB messages, 20
sessions, a connection per message) goes to one relay after the other, the
order rotating every round; each relay's user + system CPU time over its
load, divided by the messages, is its CPU per message.  The report gives
the median over the rounds of each figure and of the ratios graph ÷ stdout
(the goal: at most 1.5x over plain HTTP).

With C{--baseline DIR} (a source tree exported from an earlier commit) a
fourth relay runs that tree's Graph provider over HTTP against a fake of its
own, so before and after are measured in the same rounds, under the same
load.  Each fake also reports the TCP connections it accepted: persistent
connections keep that at a handful for all the rounds.

Run: C{.venv/bin/python bench/graph_cpu.py [--rounds 5] [--messages 2000] [--baseline DIR]}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "src"):  # bench.run, and smtpproxy.tls for the certificate
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench import run  # noqa: E402

from smtpproxy import tls  # noqa: E402

SESSIONS = 20
MESSAGES = 2_000
ROUNDS = 5
# By default the fake answers at once: the figure is CPU, not latency
# (--delay 0.02 holds each answer as run.py's graph scenario does).
DELAY = 0.0


def self_signed(directory: Path) -> tuple[Path, Path]:
    """The relay's own throw-away certificate (it names 127.0.0.1) and key, as PEM files."""
    cert, key = tls.self_signed(run.HOST)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    return cert_file, key_file


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    return int(after_name[11]) / run.TICKS, int(after_name[12]) / run.TICKS


KEYS = ("stdout", "graph-http", "graph-https")
BASELINE = "graph-http (baseline)"


def from_tree(server: run.Server, tree: Path) -> run.Server:
    """C{server} run from another source tree (an export of an earlier commit)."""
    env = server.env
    return run.Server(
        server.key,
        server.label,
        server.argv,
        lambda port: {**env(port), "PYTHONPATH": f"{tree / 'src'}:{tree}"},
    )


def measure(
    rounds: int,
    messages: int,
    sessions: int,
    delay: float = DELAY,
    baseline: Path | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """CPU ms per message of each relay, one figure per round (and its system part).

    @param baseline: a source tree whose relay (Graph over HTTP, a fake of
        its own) is measured alongside, for before/after in one run.
    @return: the figures, and the TCP connections each fake accepted in all
        (the warm-up included): persistent connections keep it at a handful.
    """
    keys = (*KEYS, BASELINE) if baseline is not None else KEYS
    figures: dict[str, list[float]] = {k: [] for k in keys}
    figures.update({f"{k} (system)": [] for k in keys})
    figures["load average (1 min)"] = []
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cert, key = self_signed(directory)
        http_port, http_stats = stack.enter_context(run.fake_graph(delay=delay))
        https_port, https_stats = stack.enter_context(
            run.fake_graph("--tls", str(cert), str(key), delay=delay)
        )
        fakes = {"graph-http": http_stats, "graph-https": https_stats}
        relays = {
            "stdout": stack.enter_context(run.started(run.SERVERS[0])),
            "graph-http": stack.enter_context(run.started(run.graph_relay(http_port))),
            "graph-https": stack.enter_context(
                run.started(run.graph_relay(https_port, "https", {"SSL_CERT_FILE": str(cert)}))
            ),
        }
        if baseline is not None:
            base_port, fakes[BASELINE] = stack.enter_context(run.fake_graph(delay=delay))
            relays[BASELINE] = stack.enter_context(
                run.started(from_tree(run.graph_relay(base_port), baseline))
            )
        for running in relays.values():
            run.warm_up(running.port)
        order = list(relays)
        for n in range(rounds):
            figures["load average (1 min)"].append(os.getloadavg()[0])
            turn = n % len(order)
            for key_ in order[turn:] + order[:turn]:
                running = relays[key_]
                user, system = user_system(running.pid)
                run.smtp_source(running.port, sessions, messages, False, run.MESSAGE_SIZE)
                user_after, system_after = user_system(running.pid)
                cpu = user_after - user + system_after - system
                figures[key_].append(1000 * cpu / messages)
                figures[f"{key_} (system)"].append(1000 * (system_after - system) / messages)
                if running.proc.poll() is not None:
                    raise RuntimeError(f"{key_} exited")
            run.log(
                f"round {n + 1} (load {figures['load average (1 min)'][-1]:.2f}): "
                + ", ".join(f"{k} {figures[k][-1]:.3f} ms" for k in keys)
            )
        connections: dict[str, int] = {}
        for what, stats in fakes.items():
            seen = stats()
            if seen["violation_count"]:
                raise RuntimeError(f"fake ({what}) saw violations: {seen['violations']}")
            expected = (rounds * messages) + 100
            if seen["deliveries"] != expected:
                raise RuntimeError(
                    f"fake ({what}) got {seen['deliveries']} messages, expected {expected}"
                )
            connections[what] = int(seen["connections"])
    return figures, connections


def report(
    figures: dict[str, list[float]], messages: int, sessions: int, connections: dict[str, int]
) -> str:
    stdout = figures["stdout"]
    load = figures["load average (1 min)"]
    lines = [
        f"{len(stdout)} rounds of {messages:,} messages of {run.MESSAGE_SIZE:,} bytes, "
        f"{sessions} sessions, a connection per message; relay CPU ms per message, median "
        f"(min-max); load average (1 min) at the rounds' starts {min(load):.2f}-{max(load):.2f}:",
        "",
        "| relay | CPU ms/msg | ÷ stdout (same round) | connections to the fake |",
        "|---|---|---|---|",
    ]
    for key, values in figures.items():
        if key == "load average (1 min)":
            continue
        if key.endswith("(system)"):
            lines.append(f"| {key} | {statistics.median(values):.3f} | | |")
            continue
        ratios = [v / s for v, s in zip(values, stdout, strict=True) if s > 0]
        opened = f"{connections[key]:,}" if key in connections else ""
        lines.append(
            f"| {key} | {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {opened} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--delay", type=float, default=DELAY, help="the fake's answer delay, s")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source tree (e.g. `git archive COMMIT src | tar -x -C DIR`) whose Graph relay"
        " is measured alongside (over HTTP), for before/after in the same run",
    )
    args = parser.parse_args(argv)
    run.raise_file_limit()
    if not run.ensure_postfix_tools():
        run.log("smtp-source is required (Debian package postfix)")
        return 2
    figures, connections = measure(
        args.rounds, args.messages, args.sessions, args.delay, args.baseline
    )
    text = report(figures, args.messages, args.sessions, connections)
    print(text)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = run.RESULTS / f"graph-cpu-{stamp}.json"
    document: dict[str, Any] = {
        "figures": figures,
        "messages": args.messages,
        "connections": connections,
    }
    out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
