"""Attacks against a real relay, and what each costs everyone else.

Each attack from issue 9 runs against a fresh C{twistd smtpproxy} with the
default settings (stdout provider, stdout to /dev/null, the JSON log on
stderr kept in a file).  While the attack runs, a probe session connects
from 127.0.0.1 every 50 ms and times how long it waits for its greeting,
which is what every other client of the relay feels.  For each attack the
script reports:

  - the probe's longest wait for a greeting, and how many probes got a
    C{220} (a C{421} means the relay was full and turned the probe away);
  - how long the attacker waited for the reply it was after, when there is
    one (the C{250} after a hostile message);
  - the log bytes written during the attack;
  - RSS growth: peak (C{VmHWM}) during the attack minus C{VmRSS} before.

Attackers use other loopback addresses (127.0.0.2 and up), so the
per-address connection cap never turns the probe away; only the total cap
can.  Every socket has a timeout, every loop a count and a deadline; all
traffic stays on loopback.

    .venv/bin/python bench/adversarial.py              # every attack, a few minutes
    .venv/bin/python bench/adversarial.py --only h1,h2
    .venv/bin/python bench/adversarial.py --docs       # and write docs/performance.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402

HOST = "127.0.0.1"
IO_TIMEOUT = 60.0
PROBE_EVERY = 0.05
PROBE_TIMEOUT = 30.0
SETTLE = 1.0  # seconds of probing before and after each attack
BEGIN = "<!-- adversarial:begin (written by bench/adversarial.py --docs; edit outside) -->"
END = "<!-- adversarial:end -->"


def relay_env(port: int, extra: dict[str, str]) -> dict[str, str]:
    """Default settings, as an abuser meets them; only what the bench needs is set."""
    return {
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        "SMTP_LISTEN": f"tcp:{port}:interface={HOST}",
        "HTTP_LISTEN": "",
        "SMTP_HOSTNAME": "adversarial.test",
        "SMTP_SHUTDOWN_TIMEOUT": "5",
        "PROVIDER": "stdout",
        **extra,
    }


@dataclass
class Relay:
    port: int
    proc: subprocess.Popen[bytes]
    errlog: Path

    def log_bytes(self) -> int:
        return self.errlog.stat().st_size


@contextlib.contextmanager
def relay(name: str, extra: dict[str, str]) -> Iterator[Relay]:
    port = run.free_port()
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    errlog = run.RESULTS / f"adversarial-{name}.stderr.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [str(run.VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "smtpproxy"],
            cwd=ROOT,
            env={**os.environ, **relay_env(port, extra)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + run.START_TIMEOUT
        while not run.greets(port):
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited with {proc.returncode}; see {errlog}")
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not greet in time")
            time.sleep(0.1)
        yield Relay(port, proc, errlog)
    finally:
        run.stop(proc)


# -- the probe -------------------------------------------------------------------


@dataclass
class ProbeResult:
    waits: list[float] = field(default_factory=list)
    greeted: int = 0
    refused: int = 0
    failed: int = 0

    @property
    def longest(self) -> float:
        return max(self.waits, default=0.0)


class Probe:
    """Connects every 50 ms from 127.0.0.1 and times the wait for the first reply line."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 5)

    def _loop(self) -> None:
        for _ in range(100_000):
            if self._stop.is_set():
                return
            self.once()
            self._stop.wait(PROBE_EVERY)

    def once(self) -> None:
        started = time.monotonic()
        try:
            with socket.create_connection((HOST, self.port), timeout=PROBE_TIMEOUT) as s:
                first = s.recv(512)
                self.result.waits.append(time.monotonic() - started)
                if first.startswith(b"220"):
                    self.result.greeted += 1
                    s.sendall(b"QUIT\r\n")
                else:
                    self.result.refused += 1
        except OSError:
            self.result.waits.append(time.monotonic() - started)
            self.result.failed += 1


# -- attack helpers ---------------------------------------------------------------


def connect_from(port: int, source: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))
    return s


def read_reply(s: socket.socket, limit: int = 64 * 1024) -> bytes:
    """One whole (possibly multi-line) reply."""
    data = b""
    while len(data) < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
        lines = data.split(b"\r\n")
        complete = [line for line in lines[:-1] if line]
        if complete and complete[-1][3:4] == b" ":
            break
    return data


def send_message(port: int, source: str, message: bytes, recipients: int = 1) -> tuple[str, float]:
    """One transaction; the reply after the dot and the seconds it took to come."""
    with connect_from(port, source) as s:
        read_reply(s)
        s.sendall(b"EHLO attacker.test\r\n")
        read_reply(s)
        s.sendall(b"MAIL FROM:<attacker@example.com>\r\n")
        read_reply(s)
        for n in range(recipients):
            local = f"r{n:03d}-" + "x" * 53  # 70 characters with the domain
            s.sendall(f"RCPT TO:<{local}@example.com>\r\n".encode())
            read_reply(s)
        s.sendall(b"DATA\r\n")
        answer = read_reply(s)
        if not answer.startswith(b"354"):
            raise RuntimeError(f"DATA refused: {answer[:60]!r}")
        body = message.replace(b"\r\n.", b"\r\n..")
        s.sendall(body + b"\r\n.\r\n")
        started = time.monotonic()
        reply = read_reply(s)
        took = time.monotonic() - started
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
        return reply.decode("ascii", "replace").strip()[:60], took


def header_spaces() -> bytes:
    """H1: a field of 15,000 spaces and a bare CR, then the blank line."""
    return b"X:" + b" " * 15_000 + b"\rY\r\nSubject: h1\r\n\r\nbody\r\n"


def angle_run() -> bytes:
    """H2: an address header of one long run without an at-sign."""
    return b"To: <" + b"a" * 160_000 + b">\r\nSubject: h2\r\n\r\nbody\r\n"


def semicolons() -> bytes:
    """M1: 150 parts whose MIME headers are 8 KB of semicolons each."""
    parts = [b'Content-Type: multipart/mixed; boundary="b"\r\nSubject: m1\r\n\r\n']
    for n in range(150):
        parts.append(
            b"--b\r\nContent-Type: text/plain" + b";" * 8_000 + b"\r\n"
            b"Content-Disposition: attachment" + b";" * 8_000 + b"\r\n\r\n"
            b"part %d\r\n" % n
        )
    parts.append(b"--b--\r\n")
    return b"".join(parts)


def warning_flood() -> bytes:
    """H3: 40,000 header fields whose values are not UTF-8."""
    fields = b"".join(b"X%d: \xff\r\n" % n for n in range(40_000))
    return fields + b"Subject: h3\r\n\r\nbody\r\n"


@dataclass
class Attack:
    key: str
    label: str
    run: Callable[[Relay], dict[str, Any]]
    env: dict[str, str] = field(default_factory=dict)


def one_message(builder: Callable[[], bytes], recipients: int = 1) -> Callable[[Relay], Any]:
    def attack(relay: Relay) -> dict[str, Any]:
        reply, took = send_message(relay.port, "127.0.0.2", builder(), recipients)
        return {"attacker_reply": reply, "attacker_wait_s": round(took, 3)}

    return attack


def refused_loop(relay: Relay, seconds: float = 10.0, sources: int = 30) -> dict[str, Any]:
    """H4: refused addresses connect and hang up in a loop."""
    deadline = time.monotonic() + seconds
    counts = [0] * sources

    def loop(index: int) -> None:
        source = f"127.0.1.{index + 1}"
        for _ in range(1_000_000):
            if time.monotonic() > deadline:
                return
            try:
                with connect_from(relay.port, source, timeout=5) as s:
                    s.recv(512)
                counts[index] += 1
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return {"refused_connections": sum(counts)}


def big_messages(relay: Relay, count: int = 20, size: int = 24_000_000) -> dict[str, Any]:
    """L1: twenty sessions each send a 24 MB message at once."""
    line = b"y" * 998 + b"\r\n"
    body = b"Subject: l1\r\n\r\n" + line * (size // len(line))
    replies: list[str] = []
    holding_rss: list[int] = []
    barrier = threading.Barrier(count + 1, timeout=IO_TIMEOUT)

    def sender(index: int) -> None:
        source = f"127.0.2.{index + 1}"
        with connect_from(relay.port, source) as s:
            read_reply(s)
            for command in (
                b"EHLO big.test",
                b"MAIL FROM:<big@example.com>",
                b"RCPT TO:<r@x.test>",
            ):
                s.sendall(command + b"\r\n")
                read_reply(s)
            s.sendall(b"DATA\r\n")
            read_reply(s)
            s.sendall(body)
            barrier.wait()  # every body is in; the relay holds 20 unfinished messages
            barrier.wait()  # RSS was read
            s.sendall(b"\r\n.\r\n")
            replies.append(read_reply(s).decode("ascii", "replace").strip()[:40])

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(1.0)  # let the relay read what the kernel still buffers
    holding_rss.append(run.memory_kb(relay.proc.pid, "VmRSS"))
    barrier.wait()
    for t in threads:
        t.join(IO_TIMEOUT * 4)
    return {
        "replies": sorted(set(replies)),
        "delivered": sum(r.startswith("250") for r in replies),
        "rss_holding_kb": holding_rss[0],
    }


def idle_storm(relay: Relay, seconds: float = 40.0, sources: int = 40, each: int = 50) -> Any:
    """2,000 connections from 40 addresses that never send a command, reopened when closed."""
    deadline = time.monotonic() + seconds
    opened = [0] * sources

    def holder(index: int) -> None:
        source = f"127.0.3.{index + 1}"
        held: list[socket.socket] = []
        try:
            for _ in range(100_000):
                if time.monotonic() > deadline:
                    return
                alive = []
                for s in held:
                    try:
                        s.setblocking(False)
                        data = s.recv(512)
                        if data == b"":
                            s.close()
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        s.close()
                        continue
                    alive.append(s)
                held = alive
                while len(held) < each and time.monotonic() < deadline:
                    try:
                        held.append(connect_from(relay.port, source, timeout=2))
                        opened[index] += 1
                    except OSError:
                        break
                time.sleep(0.2)
        finally:
            for s in held:
                s.close()

    threads = [threading.Thread(target=holder, args=(i,)) for i in range(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return {"attacker_connections": sum(opened)}


ATTACKS = [
    Attack(
        "h1", "H1: 15 KB of spaces and a bare CR in one header field", one_message(header_spaces)
    ),
    Attack("h2", "H2: `To: <` and 160,000 letters", one_message(angle_run)),
    Attack(
        "m1", "M1: 150 parts with 8 KB of semicolons in their MIME headers", one_message(semicolons)
    ),
    Attack(
        "h3",
        "H3: 40,000 non-UTF-8 header fields, 500 recipients",
        one_message(warning_flood, recipients=500),
    ),
    Attack(
        "h4",
        "H4: 30 refused addresses connecting in a loop for 10 s",
        refused_loop,
        {"SMTP_ALLOWED_NETWORKS": "127.0.0.1/32"},
    ),
    Attack("l1", "L1: 20 concurrent 24 MB messages", big_messages),
    Attack("storm", "2,000 idle connections from 40 addresses for 40 s", idle_storm),
]


def measure(attack: Attack) -> dict[str, Any]:
    with relay(attack.key, attack.env) as r:
        time.sleep(0.5)
        rss_before = run.memory_kb(r.proc.pid, "VmRSS")
        log_before = r.log_bytes()
        started = time.monotonic()
        with Probe(r.port) as probe:
            time.sleep(SETTLE)
            figures = attack.run(r)
            time.sleep(SETTLE)
        figures["seconds"] = round(time.monotonic() - started, 1)
        figures["log_bytes"] = r.log_bytes() - log_before
        figures["rss_growth_kb"] = run.memory_kb(r.proc.pid, "VmHWM") - rss_before
        if "rss_holding_kb" in figures:
            figures["rss_holding_growth_kb"] = figures.pop("rss_holding_kb") - rss_before
        figures["probe_longest_wait_ms"] = round(probe.result.longest * 1000, 1)
        figures["probes_greeted"] = probe.result.greeted
        figures["probes_refused"] = probe.result.refused + probe.result.failed
        return figures


def section(results: dict[str, dict[str, Any]]) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Under attack ({stamp}, `bench/adversarial.py`)",
        "",
        "Each attack against a fresh relay with the default settings; a probe connects every",
        "50 ms from another address. Goal: the probe's longest wait for its greeting stays",
        "under 100 ms on a quiet machine; 20 concurrent 24 MB messages grow RSS by 64 MB at most.",
        "",
        "| attack | probe: longest wait | probes greeted / turned away | attacker's reply (wait) "
        "| log bytes | RSS growth |",
        "|---|---|---|---|---|---|",
    ]
    for attack in ATTACKS:
        f = results.get(attack.key)
        if f is None:
            continue
        if "error" in f:
            lines.append(f"| {attack.label} | error: {f['error']} | | | | |")
            continue
        if "attacker_reply" in f:
            reply = f"`{f['attacker_reply'][:24]}` ({f['attacker_wait_s']:.2f} s)"
        elif "replies" in f:
            holding = f["rss_holding_growth_kb"] / 1024
            reply = f"{f['delivered']} x 250; RSS while holding +{holding:.0f} MB"
        else:
            extra = f.get("refused_connections", f.get("attacker_connections", 0))
            reply = f"{extra:,} connections"
        lines.append(
            f"| {attack.label} | {f['probe_longest_wait_ms']:.0f} ms "
            f"| {f['probes_greeted']} / {f['probes_refused']} | {reply} "
            f"| {f['log_bytes']:,} | {f['rss_growth_kb'] / 1024:.0f} MB |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    current = run.DOC.read_text(encoding="utf-8") if run.DOC.exists() else run.DOC_HEAD
    block = f"{BEGIN}\n{text}{END}\n"
    start, end = current.find(BEGIN), current.find(END)
    if start >= 0 and end > start:
        updated = current[:start] + block + current[end + len(END) + 1 :]
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    run.DOC.write_text(updated, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Attack a real relay; measure who else suffers.")
    parser.add_argument(
        "--only", help="comma-separated subset of: " + ", ".join(a.key for a in ATTACKS)
    )
    parser.add_argument("--docs", action="store_true", help="write docs/performance.md")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else {a.key for a in ATTACKS}
    results: dict[str, dict[str, Any]] = {}
    for attack in ATTACKS:
        if attack.key not in wanted:
            continue
        run.log(f"attack {attack.key}: {attack.label}")
        try:
            results[attack.key] = measure(attack)
        except Exception as error:  # one broken attack must not hide the others
            results[attack.key] = {"error": f"{type(error).__name__}: {error}"[:200]}
        run.log(f"  {json.dumps(results[attack.key])}")
    text = section(results)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (run.RESULTS / f"adversarial-{stamp}.json").write_text(json.dumps(results, indent=2))
    if args.docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
