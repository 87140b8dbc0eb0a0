"""The upstream SMTP provider, measured: messages per second relayed end to end.

Issue 15 asks for the relay with C{PROVIDER=smtp} relaying to a local
C{smtp-sink}, side by side with Postfix relaying the same load to the same
sink.  Both get Postfix's C{smtp-source} (10 KB messages, 50 sessions):

  - smtpproxy answers 250 only once the sink accepted the message, so
    smtp-source's wall time is the end-to-end time;
  - Postfix answers 250 once the message is in its queue, and relays
    later, so its time runs until its maillog shows every message C{sent}
    to the sink (C{relayhost = [127.0.0.1]:sink}).

The two go in alternating pairs, and the median of each is reported.  The
Postfix instance is private (its own configuration, queue and log in a
temporary directory, loopback only); it needs Debian's C{postfix} package
and root, as C{bench/queue_ingress.py} does.

    .venv/bin/python bench/upstream.py [--messages 2000] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402
from tests.postfix import PrivatePostfix  # noqa: E402
from tests.postfix import missing as postfix_missing  # noqa: E402

MESSAGES = 2_000
SESSIONS = 50
PAIRS = 3
RELAY_CONNECTIONS = 20

# A private Postfix (tests/postfix.py) that relays everything it accepts to
# the sink, with as many connections as the relay gets.
POSTFIX_RELAY_LINES = (
    "mynetworks = 127.0.0.0/8",
    "smtpd_relay_restrictions = permit_mynetworks, reject",
    "relayhost = [127.0.0.1]:{sink}",
    "message_size_limit = 0",
    "smtpd_client_connection_count_limit = 0",
    "smtpd_client_connection_rate_limit = 0",
    "smtp_destination_concurrency_limit = {connections}",
    "default_destination_concurrency_limit = {connections}",
)


@contextmanager
def sink() -> Iterator[int]:
    """Postfix's smtp-sink on a free loopback port (PIPELINING, 8BITMIME; mail dropped)."""
    port = run.free_port()
    proc = subprocess.Popen(
        [run.SMTP_SINK, "-u", "postfix", f"{run.HOST}:{port}", "1024"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + run.START_TIMEOUT
        while not run.greets(port):
            if time.monotonic() > deadline:
                raise RuntimeError("smtp-sink did not greet")
            time.sleep(0.05)
        yield port
    finally:
        run.stop(proc)


@contextmanager
def postfix_relay(port: int, sink_port: int) -> Iterator[Path]:
    """A private Postfix on C{port} relaying everything to the sink; yields its maillog."""
    lines = [
        line.format(sink=sink_port, connections=RELAY_CONNECTIONS) for line in POSTFIX_RELAY_LINES
    ]
    instance = PrivatePostfix(
        lines, port=port, hostname="bench.test", prefix="smtpproxy-bench-relay-"
    )
    with instance:
        yield instance.maillog


def relay(sink_port: int) -> run.Server:
    """The relay as bench/run.py starts it, relaying to the sink."""

    def env(port: int) -> dict[str, str]:
        return {
            **run.relay_env(port),
            "PROVIDER": "smtp",
            "RELAY_HOST": run.HOST,
            "RELAY_PORT": str(sink_port),
            "RELAY_TLS": "none",
            "RELAY_MAX_CONNECTIONS": str(RELAY_CONNECTIONS),
        }

    return run.Server("smtpproxy-upstream", "smtpproxy (smtp provider)", run.SERVERS[0].argv, env)


def sent_lines(maillog: Path) -> int:
    if not maillog.exists():
        return 0
    with open(maillog, "rb") as f:
        return f.read().count(b" status=sent ")


def relay_rate(port: int, messages: int) -> float:
    """smtpproxy: end to end is the client's wall time (250 after the sink's 250)."""
    return messages / run.smtp_source(port, SESSIONS, messages, False, run.MESSAGE_SIZE)


def postfix_rate(port: int, maillog: Path, messages: int) -> float:
    """Postfix: from the first message in until the maillog shows all of them sent."""
    before = sent_lines(maillog)
    start = time.perf_counter()
    run.smtp_source(port, SESSIONS, messages, False, run.MESSAGE_SIZE)
    deadline = time.monotonic() + run.STEP_TIMEOUT
    while sent_lines(maillog) < before + messages:
        if time.monotonic() > deadline:
            raise RuntimeError("Postfix did not relay every message in time")
        time.sleep(0.02)
    return messages / (time.perf_counter() - start)


def measure(messages: int, pairs: int) -> dict[str, Any]:
    results: dict[str, Any] = {"messages": messages, "sessions": SESSIONS, "size": run.MESSAGE_SIZE}
    with ExitStack() as stack:
        sink_port = stack.enter_context(sink())
        ours = stack.enter_context(run.started(relay(sink_port)))
        run.warm_up(ours.port)
        why = postfix_missing()
        if why is not None:
            results["postfix"] = {"skipped": why}
            results["smtpproxy_msg_s"] = round(relay_rate(ours.port, messages), 1)
            return results
        postfix_port = run.free_port()
        maillog = stack.enter_context(postfix_relay(postfix_port, sink_port))
        run.warm_up(postfix_port)
        rates: dict[str, list[float]] = {"smtpproxy": [], "postfix": []}
        for i in range(pairs):
            order = ("smtpproxy", "postfix") if i % 2 == 0 else ("postfix", "smtpproxy")
            for key in order:
                if key == "smtpproxy":
                    rates[key].append(relay_rate(ours.port, messages))
                else:
                    rates[key].append(postfix_rate(postfix_port, maillog, messages))
        results.update(
            {
                "pairs": pairs,
                "smtpproxy_msg_s": round(statistics.median(rates["smtpproxy"]), 1),
                "postfix_msg_s": round(statistics.median(rates["postfix"]), 1),
                "rounds": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--pairs", type=int, default=PAIRS)
    args = parser.parse_args()
    if not Path(run.SMTP_SOURCE).exists() or not Path(run.SMTP_SINK).exists():
        print("smtp-source and smtp-sink are needed (Debian's postfix package)", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(measure(args.messages, args.pairs), indent=2))


if __name__ == "__main__":
    main()
