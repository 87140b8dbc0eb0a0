"""PROXY headers: parsing without sockets (what each header says, or why it is refused),
then the binary form through a real loopback listener."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtpproxy.smtp.proxyheader import (
    MAX_HEADER,
    V1_MAX,
    V2_SIGNATURE,
    HeaderError,
    ProxyHeader,
    parse_header,
    split_proxy,
)
from tests.support import async_test, in_thread, listen_behind_proxy, start_relay, until_ehlo_reply


def v2(command: int, family: int, body: bytes) -> bytes:
    """A binary (v2) header: signature, version 2 + command, family, length, body."""
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


V2_TCP4 = v2(1, 0x11, bytes([203, 0, 113, 9, 10, 0, 0, 1]) + struct.pack("!HH", 40000, 2525))


class V1Tests(SynchronousTestCase):
    """The text form."""

    def test_tcp4_and_tcp6(self) -> None:
        """TCP4 and TCP6 lines give the client and local addresses and the header length."""
        line = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 2525\r\n"
        self.assertEqual(
            parse_header(line + b"EHLO x\r\n"),
            ProxyHeader(
                IPv4Address("TCP", "203.0.113.9", 40000),
                IPv4Address("TCP", "10.0.0.1", 2525),
                len(line),
            ),
        )
        header = parse_header(b"PROXY TCP6 2001:db8:0::9 ::1 1 65535\r\n")
        assert header is not None
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::9", 1))
        self.assertEqual(header.destination, IPv6Address("TCP", "::1", 65535))

    def test_unknown(self) -> None:
        """UNKNOWN, bare or followed by anything, names no address: the peer's is used."""
        for line in (
            b"PROXY UNKNOWN\r\n",
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            b"PROXY UNKNOWN \xff\xfe\r\n",
        ):
            self.assertEqual(parse_header(line + b"QUIT\r\n"), ProxyHeader(None, None, len(line)))

    def test_incomplete(self) -> None:
        """Every proper prefix of a valid header asks for more bytes."""
        line = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 2525\r\n"
        for end in range(len(line)):
            self.assertIsNone(parse_header(line[:end]), line[:end])

    def test_refused(self) -> None:
        """Malformed, non-ASCII, out-of-range and oversize headers raise HeaderError."""
        cases = {
            b"PROXY TCP4 \xff\xfe.0.0.1 10.0.0.1 1 2\r\n": "not printable ASCII",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2\tx\r\n": "not printable ASCII",
            b"PROXY TCP4 1.2.3.4\n10.0.0.1 1 2\r\n": "not printable ASCII",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1\r\n": "malformed",
            b"PROXY TCP4 1.2.3.4  10.0.0.1 1 2\r\n": "malformed",
            b"PROXY TCP5 1.2.3.4 10.0.0.1 1 2\r\n": "malformed",
            b"PROXY \r\n": "malformed",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1 65536\r\n": "bad port",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 -1 2\r\n": "bad port",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 \xd9\xa1 2\r\n": "not printable ASCII",
            b"PROXY TCP4 localhost 10.0.0.1 1 2\r\n": "bad address",
            b"PROXY TCP4 01.2.3.4 10.0.0.1 1 2\r\n": "bad address",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n": "bad address",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n": "bad address",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n": "bad address",
            b"PROXY TCP4 " + b"1" * V1_MAX: "too long",
            b"EHLO client\r\n": "no PROXY header",
            b"\r\n\r\nX": "no PROXY header",
        }
        for data, reason in cases.items():
            with self.assertRaises(HeaderError, msg=data) as caught:
                parse_header(data)
            self.assertIn(reason, str(caught.exception), data)

    @given(st.binary(max_size=200))
    def test_any_bytes(self, tail: bytes) -> None:
        """Whatever follows "PROXY ", the answer is a header, None or HeaderError: never
        another exception."""
        with contextlib.suppress(HeaderError):
            parse_header(b"PROXY " + tail)


class V2Tests(SynchronousTestCase):
    """The binary form."""

    def test_tcp4(self) -> None:
        """A v2 PROXY command over TCP4 names the client."""
        header = parse_header(V2_TCP4 + b"EHLO x\r\n")
        self.assertEqual(
            header,
            ProxyHeader(
                IPv4Address("TCP", "203.0.113.9", 40000),
                IPv4Address("TCP", "10.0.0.1", 2525),
                len(V2_TCP4),
            ),
        )

    def test_local_and_unspecified(self) -> None:
        """LOCAL (a balancer's own check) and an unspecified family name no address."""
        for data in (v2(0, 0x00, b""), v2(1, 0x00, b"")):
            self.assertEqual(parse_header(data), ProxyHeader(None, None, len(data)))

    def test_incomplete(self) -> None:
        """Every proper prefix of a valid v2 header asks for more bytes."""
        for end in range(len(V2_TCP4)):
            self.assertIsNone(parse_header(V2_TCP4[:end]))

    def test_refused(self) -> None:
        """Oversize, wrong version, UDP and UNIX-socket headers raise HeaderError."""
        too_long = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER)
        self.assertRaises(HeaderError, parse_header, too_long)
        self.assertRaises(HeaderError, parse_header, V2_SIGNATURE + b"\x11\x11\x00\x00")
        udp = v2(1, 0x12, bytes(12))
        self.assertIn("not TCP over IP", str(self.assertRaises(HeaderError, parse_header, udp)))
        unix = v2(1, 0x31, bytes(216))
        self.assertRaises(HeaderError, parse_header, unix)


class SplitTests(SynchronousTestCase):
    def test_split_proxy(self) -> None:
        """The haproxy: prefix is recognised and removed; other descriptions pass through."""
        self.assertEqual(split_proxy("haproxy:tcp:2525"), (True, "tcp:2525"))
        self.assertEqual(split_proxy("tcp:2525"), (False, "tcp:2525"))


class ListenerTests(TestCase):
    """The binary form through a real listener, as a load balancer sends it."""

    @async_test
    async def test_v2_names_the_client(self) -> None:
        """A v2 PROXY header over TCP4, sent with the first command, makes the session
        greet and judge the client the header names."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)
        reply = (await in_thread(until_ehlo_reply, port, V2_TCP4 + b"EHLO c\r\n")).decode()
        self.assertTrue(reply.startswith("220 relay.test"), reply)
        self.assertIn("[203.0.113.9]", reply)

    @async_test
    async def test_v2_local_uses_the_peer(self) -> None:
        """A v2 LOCAL header (the balancer's own check) is served with the peer's address."""
        relay = start_relay(self)
        port = listen_behind_proxy(self, relay)
        reply = (await in_thread(until_ehlo_reply, port, v2(0, 0x00, b"") + b"EHLO c\r\n")).decode()
        self.assertIn("[127.0.0.1]", reply)
