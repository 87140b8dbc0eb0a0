"""L{smtpproxy.twisted_private}: the private Twisted API in use, and its alarm.

The check runs here against the installed Twisted, so an upgrade that
changes the PROXY v2 parser or the TCP write buffer fails CI; and, with each
use broken on purpose, the check is shown to fail loudly and to stop
C{twistd smtpproxy} at start-up with one line.
"""

from __future__ import annotations

from twisted.internet import abstract
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import tap, twisted_private
from smtpproxy.twisted_private import TwistedChangedError


class CheckTests(SynchronousTestCase):
    def test_installed_twisted_passes(self) -> None:
        """The installed Twisted parses the known v2 headers and buffers TCP writes
        as smtpproxy expects."""
        twisted_private.check()

    def test_proxy_v2_parse_of_a_known_header(self) -> None:
        """The wrapper returns the addresses a v2 header names, and None for LOCAL."""
        self.assertEqual(
            twisted_private.parse_proxy_v2(twisted_private._V2_TCP4),
            (IPv4Address("TCP", "192.0.2.1", 56324), IPv4Address("TCP", "198.51.100.2", 25)),
        )
        self.assertEqual(twisted_private.parse_proxy_v2(twisted_private._V2_LOCAL), (None, None))

    def test_changed_v2_parser_fails_loudly(self) -> None:
        """A parser that reads the header differently is named in the error."""

        class Changed:
            @staticmethod
            def parse(header: bytes) -> object:
                raise AttributeError("no such thing")

        self.patch(twisted_private, "V2Parser", Changed)
        with self.assertRaises(TwistedChangedError) as caught:
            twisted_private.check()
        self.assertIn("PROXY v2 parser", str(caught.exception))
        self.assertIn("twisted_private.py", str(caught.exception))

    def test_changed_write_buffer_fails_loudly(self) -> None:
        """A transport whose write() no longer goes through the buffers sendnow reads
        is named in the error."""

        def write_elsewhere(self: abstract.FileDescriptor, data: bytes) -> None:
            self.__dict__.setdefault("elsewhere", []).append(data)

        self.patch(abstract.FileDescriptor, "write", write_elsewhere)
        with self.assertRaises(TwistedChangedError) as caught:
            twisted_private.check()
        self.assertIn("TCP write buffer", str(caught.exception))

    def test_startup_stops_with_one_line(self) -> None:
        """postOptions runs the check first: a changed Twisted stops twistd with one
        line, before any setting is read or any port bound."""

        def changed() -> None:
            raise TwistedChangedError("Twisted 99: the PROXY v2 parser ... changed")

        self.patch(twisted_private, "check", changed)
        with self.assertRaises(SystemExit) as caught:
            tap.Options(environ={"HTTP_LISTEN": ""}).parseOptions([])
        self.assertEqual(
            str(caught.exception.code), "smtpproxy: Twisted 99: the PROXY v2 parser ... changed"
        )
