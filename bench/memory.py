"""Memory under many large messages at once: the relay's RSS while they arrive and while
they are delivered.

Starts C{twistd smtpproxy} as C{bench/run.py} does (stdout provider, stdout to
/dev/null), opens C{--sessions} sessions, takes each to DATA and sends
C{--size} MB of body on all of them at once without the final dot; when the
relay has read every byte it reads C{VmRSS} and the peak C{VmHWM} of the
process (the peak is reset to the current RSS just before, through
C{/proc/PID/clear_refs}, where that is allowed).  Then it sends every final
dot at once and reads the peak again once every message has its 250.

    .venv/bin/python bench/memory.py                 # 20 sessions x 24 MB (the issue's figure)
    .venv/bin/python bench/memory.py --sessions 5 --size 8
    SMTP_SPOOL_THRESHOLD=1000000000 .venv/bin/python bench/memory.py   # no spooling

Settings in the environment (C{SMTP_SPOOL_*}, C{SMTP_MAX_INFLIGHT_BYTES})
reach the relay.  It prints a markdown table and saves it with the raw
figures under C{bench/results/}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as a script, only bench/ is on the path; run.py is imported as bench.run.
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402

MB = 1024 * 1024
HELLO = b"EHLO bench.client\r\n"
TRANSACTION = b"MAIL FROM:<bench@bench.client>\r\nRCPT TO:<sink@bench.test>\r\nDATA\r\n"
LINE = b"%06d memory bench: the quick brown fox jumps over the lazy dog, again, again\r\n"


def text_lines(count: int) -> bytes:
    """C{count} numbered 80-byte text lines (no end marker, no leading dots)."""
    return b"".join(LINE % (i % 1_000_000) for i in range(count))


def replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read C{count} final reply lines (continuations skipped)."""
    data = b""
    out: list[bytes] = []
    while len(out) < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {out!r}")
        data += chunk
        while b"\r\n" in data:
            line, data = data.split(b"\r\n", 1)
            if line[3:4] != b"-":
                out.append(line)
    return out


def unread_bytes(port: int) -> int:
    """Bytes the kernel holds for the server's sockets on C{port} that it has not read yet.

    C{sendall} returns once the kernel has the bytes; this says when the
    relay has read them all (the rx_queue column of /proc/net/tcp).
    """
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED
                total += int(fields[4].split(":")[1], 16)
    return total


def reset_peak(pid: int) -> bool:
    """Make VmHWM start again from VmRSS (Linux 4.0+, same user or root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def warm_up(port: int) -> None:
    """Twenty small messages on one session, so imports and caches are not in the figures.

    (run.warm_up needs Postfix's smtp-source; this bench needs nothing installed.)
    """
    text = b"Subject: warm-up\r\n\r\n" + text_lines(125) + b".\r\n"
    with socket.create_connection((run.HOST, port), timeout=60) as sock:
        replies(sock, 1)
        sock.sendall(HELLO)
        replies(sock, 1)
        for _ in range(20):
            sock.sendall(TRANSACTION)
            replies(sock, 3)
            sock.sendall(text)
            replies(sock, 1)
        sock.sendall(b"QUIT\r\n")


def wait_for(condition: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the relay did not keep up")
        time.sleep(0.05)


def measure(sessions: int, size_mb: int, spool_dir: str) -> dict[str, Any]:
    """The two phases against a fresh relay; figures in KiB."""
    server = run.Server(
        "smtpproxy",
        "smtpproxy (stdout provider)",
        run.SERVERS[0].argv,
        lambda port: {
            **run.relay_env(port),
            "SMTP_SPOOL_DIR": os.environ.get("SMTP_SPOOL_DIR", spool_dir),
        },
    )
    chunk = text_lines(MB // 80)  # 1 MiB less 16 bytes
    with run.started(server) as running:
        pid = running.pid
        warm_up(running.port)
        before = run.memory_kb(pid, "VmRSS")
        peak_reset = reset_peak(pid)
        started = time.monotonic()
        with ExitStack() as stack:
            socks = []
            for _ in range(sessions):
                sock = stack.enter_context(
                    socket.create_connection((run.HOST, running.port), timeout=300)
                )
                sock.sendall(HELLO + TRANSACTION)
                codes = [line[:3] for line in replies(sock, 5)]
                if codes != [b"220", b"250", b"250", b"250", b"354"]:
                    raise RuntimeError(f"unexpected replies {codes!r}")
                socks.append(sock)

            def send_body(sock: socket.socket) -> None:
                sock.sendall(b"Subject: memory bench\r\n\r\n")
                for _ in range(size_mb):
                    sock.sendall(chunk)

            with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
                list(pool.map(send_body, socks))
            wait_for(lambda: unread_bytes(running.port) == 0, 300)
            time.sleep(0.5)
            held = run.memory_kb(pid, "VmRSS")
            held_peak = run.memory_kb(pid, "VmHWM")
            received = time.monotonic() - started

            def finish(sock: socket.socket) -> bytes:
                sock.sendall(b".\r\n")
                return replies(sock, 1)[0]

            with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
                answers = list(pool.map(finish, socks))
            delivered = time.monotonic() - started
            after_peak = run.memory_kb(pid, "VmHWM")
        refused = [a.decode(errors="replace") for a in answers if not a.startswith(b"250")]
    return {
        "sessions": sessions,
        "size_mb": size_mb,
        "before_kb": before,
        "held_kb": held,
        "held_peak_kb": held_peak,
        "delivered_peak_kb": after_peak,
        "peak_reset": peak_reset,
        "received_s": round(received, 2),
        "delivered_s": round(delivered, 2),
        "refused": refused,
        "spool_threshold": os.environ.get("SMTP_SPOOL_THRESHOLD", "default"),
        "max_inflight_bytes": os.environ.get("SMTP_MAX_INFLIGHT_BYTES", "default"),
    }


def report(f: dict[str, Any]) -> str:
    mb = 1024

    def growth(key: str) -> str:
        return f"{(f[key] - f['before_kb']) / mb:.1f}"

    sent = f["sessions"] * f["size_mb"]
    lines = [
        f"{f['sessions']} sessions x {f['size_mb']} MB at once ({sent} MB of bodies); "
        f"SMTP_SPOOL_THRESHOLD={f['spool_threshold']}, "
        f"SMTP_MAX_INFLIGHT_BYTES={f['max_inflight_bytes']}.",
        "",
        "| phase | RSS MB | peak RSS MB | growth MB (peak - before) | seconds since start |",
        "| --- | --- | --- | --- | --- |",
        f"| before | {f['before_kb'] / mb:.1f} | | | |",
        f"| bodies received, no final dot | {f['held_kb'] / mb:.1f} | "
        f"{f['held_peak_kb'] / mb:.1f} | {growth('held_peak_kb')} | {f['received_s']} |",
        f"| every message delivered | | {f['delivered_peak_kb'] / mb:.1f} | "
        f"{growth('delivered_peak_kb')} | {f['delivered_s']} |",
    ]
    if not f["peak_reset"]:
        lines.append("")
        lines.append("(VmHWM could not be reset: the peaks include start-up and warm-up.)")
    if f["refused"]:
        lines.append("")
        lines.append(f"Not delivered: {f['refused']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="default 20")
    parser.add_argument("--size", type=int, default=24, help="MB of body per session (24)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smtpproxy-spool-") as spool_dir:
        figures = measure(args.sessions, args.size, spool_dir)
    text = report(figures)
    print(text)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (run.RESULTS / f"memory-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (run.RESULTS / f"memory-{stamp}.md").write_text(text + "\n")
    return 0 if not figures["refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
