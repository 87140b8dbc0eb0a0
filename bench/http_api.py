"""Submission API throughput: smtpproxy's POST /v1/messages beside a bare twisted.web resource.

Both servers run as their own process on this machine; `wrk` (Debian:
`apt-get install wrk`) posts the same 10 KB JSON message from 50
connections for a few seconds, several rounds alternating the order.  The
relay runs the whole path (key lookup, limits, strict JSON, the message
built by `email` and its parsed view written down from the request, the
stdout provider writing to /dev/null); the bare resource only reads the body and answers 200: the
framework's ceiling on this machine.  Reported: requests per second
(best round), p99 latency (of that round), and the ratio (goal >= 0.5).

    .venv/bin/python bench/http_api.py                # 3 rounds of 10 s each
    .venv/bin/python bench/http_api.py --seconds 5 --rounds 1
    .venv/bin/python bench/http_api.py --baseline /tmp/api-base   # A/B: another tree's relay too

With C{--baseline DIR} a third process, the relay from C{DIR/src} (an
exported older commit), runs in the same rounds, so the two relays are
compared in the same minutes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
SECRET = "bench-" + "b" * 40

LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {secret}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def payload(size: int) -> str:
    """A message document of about C{size} bytes of JSON."""
    line = "The quarterly figures are attached below, as agreed. " * 2 + "\n"
    text = (line * (size // len(line) + 1))[: size - 200]
    return json.dumps(
        {
            "from": "app@example.com",
            "to": ["rcpt@example.org"],
            "subject": "Benchmark message",
            "text": text,
        }
    )


def start_relay(port: int, src: Path = ROOT / "src") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "HTTP_", "GRAPH_"))}
    env.update(
        PYTHONPATH=str(src),
        SMTP_LISTEN=f"127.0.0.1:{free_port()}",
        HTTP_LISTEN=f"127.0.0.1:{port}",
        SMTP_HOSTNAME="relay.test",
        HTTP_API_KEYS=f"bench:{SECRET}",
        HTTP_API_RATE_LIMIT_PER_MIN="0",
        HTTP_API_RATE_LIMIT_PER_IP="0",
        HTTP_API_RATE_LIMIT_PER_KEY="0",
        LOG_LEVEL="warn",
    )
    return subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "smtpproxy"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tempfile.gettempdir(),
    )


def start_bare(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "peers" / "bare_web.py"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid} so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    wrk: str, url: str, script: str, seconds: int, connections: int, pid: int
) -> dict[str, float]:
    before = cpu_seconds(pid)
    result = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu = cpu_seconds(pid) - before
    out = result.stdout
    total = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if rate is None or p99 is None or total is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {
        "rps": float(rate.group(1)),
        "p99_ms": float(p99.group(1)) * scale,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "cpu_ms_per_request": cpu * 1000 / max(1, int(total.group(1))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--baseline", type=Path, help="another tree whose src/ relay runs too")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    load_before = os.getloadavg()[0]
    ports = {"smtpproxy": free_port(), "bare": free_port()}
    processes = {"smtpproxy": start_relay(ports["smtpproxy"]), "bare": start_bare(ports["bare"])}
    if args.baseline is not None:
        ports["baseline"] = free_port()
        processes["baseline"] = start_relay(ports["baseline"], args.baseline.resolve() / "src")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    try:
        for name, process in processes.items():
            wait_port(ports[name], process)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(LUA.format(body=json.dumps(payload(args.size)), secret=SECRET))
            script = f.name
        paths = {"smtpproxy": "/v1/messages", "bare": "/", "baseline": "/v1/messages"}
        for name in ports:  # warm-up
            url = f"http://127.0.0.1:{ports[name]}{paths[name]}"
            run_wrk(wrk, url, script, 2, 10, processes[name].pid)
        order = list(ports)
        for _ in range(args.rounds):
            for name in order:
                url = f"http://127.0.0.1:{ports[name]}{paths[name]}"
                pid = processes[name].pid
                results[name].append(run_wrk(wrk, url, script, args.seconds, args.connections, pid))
            order.reverse()
        os.unlink(script)
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    load_after = os.getloadavg()[0]
    best = {name: max(rounds, key=lambda r: r["rps"]) for name, rounds in results.items()}
    cpu = {name: min(r["cpu_ms_per_request"] for r in rounds) for name, rounds in results.items()}
    print(f"| server | requests/s (best of {args.rounds}) | p99 ms | CPU ms/request | non-2xx |")
    print("| --- | --- | --- | --- | --- |")
    for name, got in best.items():
        rate, p99, failed = got["rps"], got["p99_ms"], got["non_2xx"]
        print(f"| {name} | {rate:,.0f} | {p99:.1f} | {cpu[name]:.3f} | {failed:.0f} |")
    ratio = best["smtpproxy"]["rps"] / best["bare"]["rps"]
    # Each round measures both servers within seconds of each other: the
    # median of those pairwise ratios is steadier on a shared machine than
    # the ratio of two best rounds (see bench/README.md, "A/B").
    rounds = zip(results["smtpproxy"], results["bare"], strict=True)
    pairs = [relay["rps"] / bare["rps"] for relay, bare in rounds]
    print(f"\nsmtpproxy / bare twisted.web: {ratio:.2f} by best requests/s (goal >= 0.5),")
    print(f"median of {len(pairs)} pairwise ratios {statistics.median(pairs):.2f}", end=" ")
    print(f"(min {min(pairs):.2f}, max {max(pairs):.2f}),")
    print(f"{cpu['bare'] / cpu['smtpproxy']:.2f} by CPU per request")
    if "baseline" in results:
        mine = [r["cpu_ms_per_request"] for r in results["smtpproxy"]]
        theirs = [r["cpu_ms_per_request"] for r in results["baseline"]]
        shares = [m / t for m, t in zip(mine, theirs, strict=True)]
        median = statistics.median(shares)
        print(f"CPU per request, smtpproxy / baseline: median of pairs {median:.2f}")
        print(f"baseline / bare by CPU per request: {cpu['bare'] / cpu['baseline']:.2f}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print("all rounds:", json.dumps(results))
    return 0 if best["smtpproxy"]["non_2xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
