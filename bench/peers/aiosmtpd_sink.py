"""aiosmtpd accepting every message and keeping none of it: the asyncio peer.

aiosmtpd reads DATA line by line inside a coroutine and collects the lines
into one C{bytes}; the handler below then answers 250 without looking at
it.  C{decode_data} stays off (the default), as a relay would configure it.

aiosmtpd is a benchmark-only dependency, installed by C{bench/run.py}; it is
imported by name at run time so that type checking the repository does not
need it.

Run: C{python bench/peers/aiosmtpd_sink.py PORT}
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from typing import Any


class NullHandler:
    """The aiosmtpd handler hook for DATA: accept and forget."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve(port: int) -> None:
    smtp = importlib.import_module("aiosmtpd.smtp")
    handler = NullHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: smtp.SMTP(handler, hostname="bench.test", data_size_limit=64 * 1024 * 1024),
        host="127.0.0.1",
        port=port,
        backlog=1024,
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    asyncio.run(serve(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv)
