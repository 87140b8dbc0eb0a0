"""Property tests: any byte stream leaves the session well-behaved.

Hypothesis throws mixtures of valid commands, hostile fragments and random
bytes at a session (in memory, with a Clock) split at arbitrary points.
Whatever arrives, the server must only ever write well-formed replies, never
raise, never log an error, and report exactly the deliveries it made.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.delivery import RelayRealm
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.sasl import StaticPasswordChecker
from tests.support import PASSWORD, USER, RecordingProvider, open_guard, session_defaults

FRAGMENTS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@example.com>\r\n",
    b"MAIL FROM:<a@example.com> SIZE=100\r\n",
    b"RCPT TO:<b@example.org>\r\n",
    b"RCPT TO:<\xc3\xa9@example.org>\r\n",
    b"DATA\r\n",
    b"Subject: hi\r\n\r\nbody\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN AHJlbGF5LXVzZXIAczNjcmV0LVBhNTU=\r\n",
    b"*\r\n",
    b"=\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"\x00\r\n",
    b"x" * 700 + b"\r\n",
    # CHUNKING, BINARYMIME and DSN (RFC 3030, 3461).
    b"BDAT 5\r\n",
    b"BDAT 12 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT x\r\n",
    b"BDAT 3 LATER\r\n",
    b"MAIL FROM:<a@example.com> BODY=BINARYMIME RET=HDRS ENVID=a+2Bb\r\n",
    b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@example.org\r\n",
    b"RCPT TO:<c@example.org> NOTIFY=NEVER,DELAY\r\n",
]

REPLY = re.compile(rb"^[2-5][0-9][0-9][ -]")

streams = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), min_size=1, max_size=40
)


class ProtocolPropertyTests(SynchronousTestCase):
    @given(pieces=streams, cut=st.integers(min_value=1, max_value=64))
    def test_any_stream(self, pieces: list[bytes], cut: int) -> None:
        """Replies are well-formed, nothing raises, deliveries match the 250s."""
        clock = Clock()
        provider = RecordingProvider()
        portal = Portal(RelayRealm(provider, clock))
        portal.registerChecker(AllowAnonymousAccess())
        portal.registerChecker(StaticPasswordChecker(USER, PASSWORD))
        settings = session_defaults(
            max_message_size=2000,
            auth_enabled=bool(len(pieces) % 2),
            allow_insecure_auth=True,
            binarymime=True,
        )
        factory = RelayFactory(settings, portal, None, clock, open_guard(settings, clock))
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000))
        protocol.makeConnection(transport)
        stream = b"".join(pieces)
        for start in range(0, len(stream), cut):
            protocol.dataReceived(stream[start : start + cut])
        clock.advance(10_000)
        protocol.connectionLost(None)

        lines = transport.value().split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        for line in lines[:-1]:
            self.assertTrue(REPLY.match(line), line)
        delivered = sum(1 for line in lines if line.startswith(b"250 2.0.0 OK: delivered"))
        self.assertEqual(delivered, len(provider.emails))
        self.assertEqual(self.flushLoggedErrors(), [])
