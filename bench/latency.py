"""A small SMTP load client that times every message: latency percentiles.

C{smtp-source} (C, from Postfix) drives the throughput figures because it is
never the bottleneck, but it does not time single messages.  This client
does: with C{--reuse} each session connects, sends EHLO once, then sends
messages one after another over the same connection (as C{smtp-source -d}
does), and the time from C{MAIL FROM} to the 250 after the final dot is one
sample.  Commands are
not pipelined, so a sample is the server's answer time for four round trips
plus the transfer of the body, the same work C{smtp-source} asks for.

Three modes, each printing one JSON object on stdout:

  - C{load}: C{--sessions} sessions share C{--messages} messages of
    C{--size} bytes; reports p50/p90/p99/max in milliseconds.  Without
    C{--reuse} every message has a connection of its own (as most
    applications send, and as C{smtp-source} without C{-d}); a sample then
    runs from the connect to the 250 after the dot.
  - C{big}: one message of C{--size} bytes carrying a base64 attachment,
    the shape a 25 MB message has in practice (it makes a relay decode).
  - C{idle}: opens C{--sessions} connections, greets each with EHLO, prints
    C{{"ready": n}} and holds them until stdin closes (or C{--hold} seconds
    pass), then says QUIT on each.  The harness reads the server's memory
    while they are held.

Every loop is bounded by a count and by C{--deadline} seconds; the client
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
SENDER = b"bench@bench.test"
RECIPIENT = b"rcpt@bench.test"


class SMTPReplyError(Exception):
    """The server answered something other than what the step expects."""


@dataclass
class Tally:
    """What all sessions of one run share: work left and results so far."""

    remaining: int
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one (possibly multi-line) reply; return its code and last line."""
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise SMTPReplyError("connection closed by server")
        if line[3:4] != b"-":
            return int(line[:3]), line.rstrip()
    raise SMTPReplyError("reply with more than 100 lines")


async def expect(reader: asyncio.StreamReader, code: int) -> None:
    got, line = await read_reply(reader)
    if got != code:
        raise SMTPReplyError(f"expected {code}, got {line.decode('ascii', 'replace')}")


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, code: int
) -> None:
    writer.write(line + b"\r\n")
    await expect(reader, code)


async def open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # A 64 KiB line limit is plenty for SMTP replies.
    reader, writer = await asyncio.open_connection(HOST, port, limit=65536)
    await expect(reader, 220)
    await command(reader, writer, b"EHLO bench.client", 250)
    return reader, writer


async def send_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> None:
    """One transaction: MAIL, RCPT, DATA, body, dot; body is already dot-stuffed."""
    await command(reader, writer, b"MAIL FROM:<" + SENDER + b">", 250)
    await command(reader, writer, b"RCPT TO:<" + RECIPIENT + b">", 250)
    await command(reader, writer, b"DATA", 354)
    writer.write(body)
    writer.write(b".\r\n")
    await expect(reader, 250)


async def quit_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(b"QUIT\r\n")
        await asyncio.wait_for(read_reply(reader), 5)
    except (OSError, SMTPReplyError, TimeoutError):
        pass
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


# -- messages -------------------------------------------------------------


def headers(subject: str, extra: list[str]) -> list[str]:
    return [
        f"From: Bench <{SENDER.decode()}>",
        f"To: <{RECIPIENT.decode()}>",
        f"Subject: {subject}",
        "Date: Mon, 02 Nov 2026 10:00:00 +0000",
        "Message-ID: <bench.1@bench.client>",
        "MIME-Version: 1.0",
        *extra,
    ]


def text_message(size: int) -> bytes:
    """A plain-text message of exactly C{size} bytes (at least the headers)."""
    head = "\r\n".join(headers("bench", ["Content-Type: text/plain; charset=us-ascii"]))
    out = bytearray(head.encode() + b"\r\n\r\n")
    for line in range(size):
        room = size - 2 - len(out)
        if room <= 0:
            break
        text = f"{line:06d} the quick brown fox jumps over the lazy dog, again and again "
        out += text.encode()[: min(76, room)] + b"\r\n"
    return stuff(bytes(out))


def attachment_message(size: int) -> bytes:
    """About C{size} bytes: a short text part and one base64 attachment."""
    boundary = "bench-boundary-1"
    head = "\r\n".join(
        headers("bench attachment", [f'Content-Type: multipart/mixed; boundary="{boundary}"'])
    )
    text_part = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "The report is attached.\r\n"
    )
    attach_head = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="report.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    tail = f"\r\n--{boundary}--\r\n"
    fixed = len(head) + 4 + len(text_part) + len(attach_head) + len(tail)
    # base64 in 76-character lines: 57 raw bytes per 78 bytes on the wire.
    raw_size = max(0, (size - fixed) * 57 // 78)
    pattern = bytes(range(256))
    raw = (pattern * (raw_size // 256 + 1))[:raw_size]
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    message = (
        head.encode()
        + b"\r\n\r\n"
        + text_part.encode()
        + attach_head.encode()
        + encoded
        + tail.encode()
    )
    return stuff(message)


def stuff(message: bytes) -> bytes:
    """Dot-stuff and make sure the message ends with CRLF, ready for DATA."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


# -- modes ----------------------------------------------------------------


async def load_session(port: int, body: bytes, tally: Tally, deadline: float) -> None:
    """Send messages over one connection until the shared count runs out."""
    try:
        reader, writer = await open_session(port)
    except (OSError, SMTPReplyError) as e:
        tally.errors.append(f"connect: {e}")
        return
    try:
        while tally.remaining > 0 and time.monotonic() < deadline:
            tally.remaining -= 1
            start = time.perf_counter()
            await send_one(reader, writer, body)
            tally.samples.append(time.perf_counter() - start)
    except (OSError, SMTPReplyError) as e:
        tally.errors.append(str(e))
    await quit_session(reader, writer)


async def fresh_session(port: int, body: bytes, tally: Tally, deadline: float) -> None:
    """Open a new connection for every message; a sample runs from connect to 250."""
    while tally.remaining > 0 and time.monotonic() < deadline:
        tally.remaining -= 1
        start = time.perf_counter()
        try:
            reader, writer = await open_session(port)
        except (OSError, SMTPReplyError) as e:
            tally.errors.append(f"connect: {e}")
            return
        try:
            await send_one(reader, writer, body)
            tally.samples.append(time.perf_counter() - start)
        except (OSError, SMTPReplyError) as e:
            tally.errors.append(str(e))
            writer.close()
            return
        await quit_session(reader, writer)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summary(tally: Tally, elapsed: float) -> dict[str, object]:
    samples = sorted(tally.samples)
    ms = 1000.0
    return {
        "messages": len(samples),
        "errors": len(tally.errors),
        "first_error": tally.errors[0] if tally.errors else None,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(len(samples) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(samples, 0.50) * ms, 3),
        "p90_ms": round(percentile(samples, 0.90) * ms, 3),
        "p99_ms": round(percentile(samples, 0.99) * ms, 3),
        "max_ms": round(samples[-1] * ms, 3) if samples else 0.0,
    }


async def run_load(
    port: int, sessions: int, messages: int, body: bytes, reuse: bool, limit: float
) -> None:
    tally = Tally(remaining=messages)
    start = time.perf_counter()
    deadline = time.monotonic() + limit
    session = load_session if reuse else fresh_session
    await asyncio.gather(*(session(port, body, tally, deadline) for _ in range(sessions)))
    print(json.dumps(summary(tally, time.perf_counter() - start)), flush=True)


async def run_idle(port: int, sessions: int, hold: float, limit: float) -> None:
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit

    async def one() -> None:
        try:
            held.append(await open_session(port))
        except (OSError, SMTPReplyError) as e:
            errors.append(str(e))

    # Open in batches so that no server sees its listen queue overflow.
    batch = 100
    for first in range(0, sessions, batch):
        if time.monotonic() > deadline:
            errors.append("deadline reached while connecting")
            break
        await asyncio.gather(*(one() for _ in range(min(batch, sessions - first))))
    print(
        json.dumps(
            {"ready": len(held), "errors": len(errors), "first_error": next(iter(errors), None)}
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), hold)
    await asyncio.gather(*(quit_session(r, w) for r, w in held))


async def run_big(port: int, size: int, limit: float) -> None:
    body = attachment_message(size)
    tally = Tally(remaining=1)
    start = time.perf_counter()
    await asyncio.wait_for(load_session(port, body, tally, time.monotonic() + limit), limit)
    result = summary(tally, time.perf_counter() - start)
    result["bytes"] = len(body)
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("load", "big", "idle"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument(
        "--reuse", action="store_true", help="load: keep each connection for many messages"
    )
    parser.add_argument("--hold", type=float, default=60.0, help="idle: longest hold, seconds")
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after, seconds")
    args = parser.parse_args(argv)
    if args.mode == "load":
        body = text_message(args.size)
        asyncio.run(
            run_load(args.port, args.sessions, args.messages, body, args.reuse, args.deadline)
        )
    elif args.mode == "big":
        asyncio.run(run_big(args.port, args.size, args.deadline))
    else:
        asyncio.run(run_idle(args.port, args.sessions, args.hold, args.deadline))


if __name__ == "__main__":
    main()
