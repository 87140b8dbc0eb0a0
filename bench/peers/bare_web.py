"""The framework's ceiling for bench/http_api.py: a bare twisted.web resource answering 200.

It reads the request body (as the API does, since twisted.web already
has) and answers a short JSON body; no checks, no message, no provider.
Run: python bench/peers/bare_web.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Ok(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        request.content.read()
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return b'{"status":"ok"}'


def main() -> None:
    site = Site(Ok())  # type: ignore[no-untyped-call]
    site.noisy = False
    tcp: Any = reactor
    tcp.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    tcp.run()


if __name__ == "__main__":
    main()
