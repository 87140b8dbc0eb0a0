"""The durable queue, measured: ingress against Postfix's, memory, restart.

Issue 12 asks for four figures from one run, side by side on one machine:

  1. queued ingress: smtpproxy with C{QUEUE_URL=sqlite} (the stdout provider
     behind it, delivering while mail arrives) against Postfix accepting into
     its own queue (C{smtpd} -> C{cleanup} -> the incoming queue, fsynced before
     the 250, then delivered to the C{discard} transport), 10 KB messages from
     50 sessions;
  2. queued against direct mode (the same relay without a queue);
  3. one 150 MB message through the queue: the relay's peak RSS growth;
  4. with 10,000 messages queued: the time from a SIGKILL'd relay's restart to
     its first delivery.

1 and 2 go in alternating A/B pairs, as C{bench/ab.py} does, and report the
median of the pairwise ratios; the load is Postfix's C{smtp-source}.  The
Postfix instance is a private one (its own configuration, queue and log in a
temporary directory, loopback only), started and stopped here; it needs
Debian's C{postfix} package and root, as C{bench/run.py}'s peers do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
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
PAIRS = 6
BIG = 150 * 1024 * 1024
BACKLOG = 10_000

# A private Postfix (tests/postfix.py) that accepts from loopback into its
# queue and discards: the peer the queued relay's ingress is measured against.
POSTFIX_LINES = (
    "mynetworks = 127.0.0.0/8",
    "smtpd_relay_restrictions = permit_mynetworks, reject",
    "default_transport = discard:bench",
    "relay_transport = discard:bench",
    "message_size_limit = 0",
    "smtpd_client_connection_count_limit = 0",
    "smtpd_client_connection_rate_limit = 0",
)


@contextmanager
def postfix(port: int) -> Iterator[int]:
    """A private Postfix accepting on 127.0.0.1:C{port}; yields its master's pid."""
    instance = PrivatePostfix(
        POSTFIX_LINES, port=port, hostname="bench.test", prefix="smtpproxy-bench-postfix-"
    )
    with instance:
        yield instance.master_pid()


def relay(queue_url: str, extra: dict[str, str] | None = None) -> run.Server:
    """The relay as bench/run.py starts it, with a queue (or none) and more settings."""

    def env(port: int) -> dict[str, str]:
        return {**run.relay_env(port), "QUEUE_URL": queue_url, **(extra or {})}

    key = "smtpproxy-queued" if queue_url else "smtpproxy-direct"
    return run.Server(key, key, run.SERVERS[0].argv, env)


def load(port: int, messages: int = MESSAGES) -> float:
    """smtp-source's rate against C{port}: messages per second."""
    return messages / run.smtp_source(port, SESSIONS, messages, False, run.MESSAGE_SIZE)


def pairs(ports: dict[str, int], first: str, second: str, count: int) -> dict[str, Any]:
    """C{count} alternating pairs; the median ratio of C{first}'s rate to C{second}'s."""
    ratios = []
    rates: dict[str, list[float]] = {first: [], second: []}
    for i in range(count):
        order = (first, second) if i % 2 == 0 else (second, first)
        for key in order:
            rates[key].append(load(ports[key]))
        ratios.append(rates[first][-1] / rates[second][-1])
    return {
        "pairs": count,
        "median_ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        f"{first}_msg_s": round(statistics.median(rates[first]), 1),
        f"{second}_msg_s": round(statistics.median(rates[second]), 1),
    }


def ingress(count: int, with_postfix: bool) -> dict[str, Any]:
    """Figures 1 and 2: queued ÷ Postfix and queued ÷ direct, in A/B pairs."""
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpproxy-q-")))
        queued = stack.enter_context(run.started(relay(f"sqlite:///{tmp}/queue.db")))
        direct = stack.enter_context(run.started(relay("")))
        ports = {"queued": queued.port, "direct": direct.port}
        for port in ports.values():
            run.warm_up(port)
        if with_postfix:
            why = postfix_missing()
            if why is None:
                ports["postfix"] = run.free_port()
                stack.enter_context(postfix(ports["postfix"]))
                run.warm_up(ports["postfix"])
                results["queued_vs_postfix"] = pairs(ports, "queued", "postfix", count)
            else:
                results["queued_vs_postfix"] = {"skipped": why}
        results["queued_vs_direct"] = pairs(ports, "queued", "direct", count)
    return results


def big_message() -> dict[str, Any]:
    """Figure 3: one 150 MB message through the queue; the relay's peak RSS growth."""
    with tempfile.TemporaryDirectory(prefix="smtpproxy-q-") as tmp:
        server = relay(f"sqlite:///{tmp}/queue.db", {"SMTP_MAX_MESSAGE_SIZE": str(BIG + (1 << 20))})
        with run.started(server) as running:
            run.warm_up(running.port)
            time.sleep(0.5)
            before = run.memory_kb(running.pid, "VmRSS")
            line = b"x" * 998 + b"\r\n"
            body = b"Subject: big\r\n\r\n" + line * (BIG // len(line))
            size = len(body)
            started = time.perf_counter()
            with socket.create_connection((run.HOST, running.port), timeout=600) as sock:
                reader = sock.makefile("rb")

                def reply() -> bytes:
                    while (line := reader.readline())[3:4] == b"-":
                        pass
                    return line

                reply()
                for command in (b"EHLO bench.test", b"MAIL FROM:<big@bench.test>"):
                    sock.sendall(command + b"\r\n")
                    reply()
                sock.sendall(b"RCPT TO:<rcpt@bench.test>\r\n")
                reply()
                sock.sendall(b"DATA\r\n")
                reply()
                sock.sendall(body)
                # Ingress alone: the whole body is in before the final dot,
                # and nothing is queued or parsed until it comes.
                time.sleep(1.0)
                ingress = run.memory_kb(running.pid, "VmHWM")
                sock.sendall(b".\r\n")
                answer = reply()
                if not answer.startswith(b"250"):
                    raise RuntimeError(f"the big message was refused: {answer!r}")
                sock.sendall(b"QUIT\r\n")
            seconds = time.perf_counter() - started
            del body
            delivered_in = wait_until_empty(Path(tmp) / "queue.db", 300)
            time.sleep(1.0)
            peak = run.memory_kb(running.pid, "VmHWM")
    return {
        "bytes": size,
        "seconds_to_250": round(seconds, 2),
        "rss_before_mb": round(before / 1024, 1),
        "ingress_peak_growth_mb": round((ingress - before) / 1024, 1),
        "peak_growth_mb": round((peak - before) / 1024, 1),
        "seconds_250_to_delivered": round(delivered_in, 2),
    }


def wait_until_empty(database: Path, timeout: float) -> float:
    """Seconds until the queue at C{database} holds no message (read-only looks)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            if db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0:
                break
        time.sleep(0.1)
    return time.perf_counter() - started


def restart(count: int) -> dict[str, Any]:
    """Figure 4: SIGKILL with C{count} queued, restart, time to the first delivery.

    The messages are kept queued by a Graph provider pointing at a closed
    port (every attempt fails fast and is deferred); the restart uses the
    stdout provider, whose first line on stdout is the first delivery.
    """
    with tempfile.TemporaryDirectory(prefix="smtpproxy-q-") as tmp:
        url = f"sqlite:///{tmp}/queue.db"
        dead = run.free_port()
        unreachable = {
            **run.GRAPH_ENV,
            "GRAPH_ENDPOINT": f"http://127.0.0.1:{dead}",
            "GRAPH_AUTHORITY_HOST": f"http://127.0.0.1:{dead}",
            "QUEUE_RETRY_MIN_INTERVAL": "3600",
        }
        with run.started(relay(url, unreachable)) as running:
            fill_started = time.perf_counter()
            run.smtp_source(running.port, SESSIONS, count, False, run.MESSAGE_SIZE)
            fill_seconds = time.perf_counter() - fill_started
            os.kill(running.pid, signal.SIGKILL)
            running.proc.wait(30)
        port = run.free_port()
        env = {**os.environ, **relay(url).env(port)}
        started = time.perf_counter()
        proc = subprocess.Popen(
            relay(url).argv(port),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.read(1)
            seconds = time.perf_counter() - started
        finally:
            run.stop(proc)
    return {
        "queued": count,
        "fill_msg_s": round(count / fill_seconds, 1),
        "seconds_to_first_delivery": round(seconds, 2) if first else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--backlog", type=int, default=BACKLOG)
    parser.add_argument("--only", choices=("ingress", "big", "restart"), action="append")
    parser.add_argument("--no-postfix", action="store_true")
    options = parser.parse_args(argv)
    if not run.ensure_postfix_tools():
        print("smtp-source is needed (Debian's postfix package)", file=sys.stderr)
        return 1
    only = set(options.only or ("ingress", "big", "restart"))
    results: dict[str, Any] = {}
    if "ingress" in only:
        results.update(ingress(options.pairs, not options.no_postfix))
    if "big" in only:
        results["big_message"] = big_message()
    if "restart" in only:
        results["restart"] = restart(options.backlog)
    text = json.dumps(results, indent=2)
    print(text)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "queue.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
