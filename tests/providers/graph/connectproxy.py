"""A small HTTP CONNECT proxy for tests, and a real tinyproxy when Debian's is installed.

L{ConnectProxy} does what a corporate proxy does for HTTPS: reads one
C{CONNECT host:port} request, checks C{Proxy-Authorization} when it has
credentials, opens a TCP connection to the target and then copies bytes
both ways without looking at them.  It records each tunnel it was asked
for, so a test can prove which requests went through it (and that the
proxy never saw anything but ciphertext: it keeps the bytes it relayed).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure


@dataclass
class Tunnel:
    """One CONNECT request the proxy received."""

    target: str
    authorization: str | None
    status: int = 0
    client_bytes: bytearray = field(default_factory=bytearray)


class _Upstream(Protocol):
    def __init__(self, downstream: _ProxyProtocol) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.downstream.transport
        transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        transport: Any = self.downstream.transport
        transport.loseConnection()


class _UpstreamFactory(ClientFactory):
    def __init__(self, downstream: _ProxyProtocol) -> None:
        self.downstream = downstream

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Upstream(self.downstream)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.downstream.refuse(502, "Bad Gateway")


class _ProxyProtocol(Protocol):
    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.upstream: _Upstream | None = None
        self.tunnel: Tunnel | None = None
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.client_bytes += data
            if self.upstream is not None:
                transport: Any = self.upstream.transport
                transport.write(data)
            else:
                self.pending += data
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = [*lines[0].split(" "), "", ""][:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.tunnel = Tunnel(target, headers.get("proxy-authorization"))
        self.tunnel.client_bytes += rest
        self.pending = rest
        self.proxy.tunnels.append(self.tunnel)
        if method != "CONNECT":
            self.refuse(405, "Method Not Allowed")
            return
        if self.proxy.credentials is not None:
            user, password = self.proxy.credentials
            wanted = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if headers.get("proxy-authorization") != wanted:
                self.refuse(407, "Proxy Authentication Required")
                return
        host, _, port = target.rpartition(":")
        from twisted.internet import reactor

        tcp: Any = reactor
        tcp.connectTCP(host.strip("[]"), int(port), _UpstreamFactory(self))

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        assert self.tunnel is not None
        self.tunnel.status = 200
        transport: Any = self.transport
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.pending:
            up: Any = upstream.transport
            up.write(self.pending)
            self.pending = b""

    def refuse(self, status: int, text: str) -> None:
        if self.tunnel is not None:
            self.tunnel.status = status
        transport: Any = self.transport
        extra = b"Proxy-Authenticate: Basic realm=test\r\n" if status == 407 else b""
        transport.write(
            f"HTTP/1.1 {status} {text}\r\n".encode() + extra + b"Content-Length: 0\r\n\r\n"
        )
        transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self.upstream is not None:
            transport: Any = self.upstream.transport
            transport.loseConnection()


class ConnectProxy(Factory):
    """The proxy's listening side: one L{_ProxyProtocol} per client connection.

    @param credentials: (user, password) the proxy requires, or None.
    """

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.tunnels: list[Tunnel] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        return _ProxyProtocol(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tinyproxy:
    """Debian's tinyproxy, started on a free loopback port with a private config.

    @raise FileNotFoundError: tinyproxy is not installed (tests skip).
    """

    def __init__(self, directory: str, credentials: tuple[str, str] | None = None) -> None:
        program = shutil.which("tinyproxy") or (
            "/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None
        )
        if program is None:
            raise FileNotFoundError("tinyproxy")
        directory = os.path.abspath(directory)
        self.port = _free_port()
        self.log = os.path.join(directory, "tinyproxy.log")
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            # No LogFile: in the foreground tinyproxy logs to stdout, which
            # goes to a file this process opens (it may run as nobody).
            "LogLevel Connect",
            "MaxClients 20",
            "Allow 127.0.0.1",
            # No ConnectPort line: CONNECT to any port (the fake's is random).
        ]
        if os.geteuid() == 0:
            lines += ["User nobody", "Group nogroup"]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        config = os.path.join(directory, "tinyproxy.conf")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                [program, "-d", "-c", config],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tinyproxy exited; see {self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("tinyproxy did not start listening")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def connects(self) -> list[str]:
        """The CONNECT targets tinyproxy logged."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return []
        marker = "): CONNECT "
        lines = [line for line in text.splitlines() if marker in line]
        return [line.split(marker, 1)[1].split()[0] for line in lines]
