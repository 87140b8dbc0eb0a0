"""Cred hygiene: every avatar the session gets from the portal is logged out once.

Logout is a no-op for today's realm, but an identity backend may hold a
connection or a lease per login.  The realm here wraps the relay's own and
records each login and logout; the sessions run in process over a
StringTransport (one that can start TLS, for STARTTLS).
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from twisted.cred import credentials
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtpproxy import tls
from smtpproxy.delivery import RelayRealm
from smtpproxy.policy.guard import Guard
from smtpproxy.policy.rules import parse_networks
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.smtp.sasl import StaticPasswordChecker
from tests.recorder import TLSStringTransport
from tests.support import OPEN, PASSWORD, USER, RecordingProvider, certificate, session_defaults

CLIENT = IPv4Address("TCP", "192.0.2.1", 4000)
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


@implementer(IRealm)
class RecordingRealm:
    """The relay's realm, with each login and logout written to C{events}."""

    def __init__(self, realm: RelayRealm) -> None:
        self.realm = realm
        self.events: list[tuple[str, str]] = []

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        kind, avatar, _ = self.realm.requestAvatar(avatarId, mind, *interfaces)
        name = "anonymous" if avatarId is ANONYMOUS else avatarId.decode()
        self.events.append(("login", name))
        return kind, avatar, lambda: self.events.append(("logout", name))


@implementer(ICredentialsChecker)
class SlowChecker:
    """Accepts every password, but only when the test fires the answer."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[bytes | tuple[()]]] = []

    def requestAvatarId(
        self, creds: credentials.IUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        d: defer.Deferred[bytes | tuple[()]] = defer.Deferred()
        self.pending.append(d)
        return d


def codes(transport: TLSStringTransport) -> list[int]:
    """The codes of the complete replies sent so far."""
    lines = transport.value().split(b"\r\n")
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


class AvatarLogoutTests(SynchronousTestCase):
    def session(
        self, *, auth: bool = False, checker: ICredentialsChecker | None = None
    ) -> tuple[RelayProtocol, TLSStringTransport, RecordingRealm]:
        clock = Clock()
        realm = RecordingRealm(RelayRealm(RecordingProvider(), clock))
        portal = Portal(realm)
        portal.registerChecker(AllowAnonymousAccess())
        if auth:
            portal.registerChecker(checker or StaticPasswordChecker(USER, PASSWORD))
        settings = session_defaults(
            auth_enabled=auth,
            allow_insecure_auth=True,
            auth_users=(USER,) if auth else (),
        )
        # The client's network is trusted: it may send with or without AUTH.
        guard = dataclasses.replace(
            OPEN, auth_enabled=auth, trusted_networks=parse_networks("192.0.2.0/24")
        )
        context = tls.server_context(*certificate())
        factory = RelayFactory(settings, portal, context, clock, Guard(guard, clock))
        protocol = factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        protocol.makeConnection(transport)
        return protocol, transport, realm

    def end(self, protocol: RelayProtocol) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_session_end_logs_out_once(self) -> None:
        """The anonymous avatar of a plain session is logged out when it ends, once."""
        protocol, transport, realm = self.session()
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n")
        self.assertEqual(codes(transport), [220, 250, 250, 221])
        self.end(protocol)
        self.end(protocol)  # a second report of the end changes nothing
        self.assertEqual(realm.events, [("login", "anonymous"), ("logout", "anonymous")])

    def test_starttls_logs_out_the_avatar(self) -> None:
        """STARTTLS forgets the avatar (RFC 3207) and logs it out then, not at the end;
        the avatar of the TLS session is logged out when the session ends."""
        protocol, transport, realm = self.session()
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRSET\r\nSTARTTLS\r\n")
        self.assertTrue(transport.tls_started)
        self.assertEqual(realm.events, [("login", "anonymous"), ("logout", "anonymous")])
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(codes(transport), [220, 250, 250, 250, 220, 250, 250])
        self.end(protocol)
        self.assertEqual(realm.events, [("login", "anonymous"), ("logout", "anonymous")] * 2)

    def test_auth_replaces_the_anonymous_avatar(self) -> None:
        """AUTH after an anonymous MAIL (from a trusted network) logs the anonymous avatar
        out; a second AUTH is refused without a login; the end logs the user out."""
        protocol, transport, realm = self.session(auth=True)
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRSET\r\n")
        protocol.dataReceived(f"AUTH PLAIN {PLAIN}\r\nAUTH PLAIN {PLAIN}\r\n".encode())
        self.assertEqual(codes(transport), [220, 250, 250, 250, 235, 503])
        self.assertEqual(
            realm.events, [("login", "anonymous"), ("login", USER), ("logout", "anonymous")]
        )
        self.end(protocol)
        self.assertEqual(realm.events[3:], [("logout", USER)])

    def test_login_finishing_after_the_end_is_logged_out(self) -> None:
        """A login whose answer arrives after the connection is gone is logged out at
        once: nothing else would ever release that avatar."""
        checker = SlowChecker()
        protocol, _, realm = self.session(auth=True, checker=checker)
        protocol.dataReceived(f"EHLO c\r\nAUTH PLAIN {PLAIN}\r\n".encode())
        self.end(protocol)
        self.assertEqual(realm.events, [])
        checker.pending[0].callback(USER.encode())
        self.assertEqual(realm.events, [("login", USER), ("logout", USER)])


@implementer(ICredentialsChecker)
class SlowAnonymousChecker:
    """Lets anyone in anonymously, but only when the test fires the answer."""

    credentialInterfaces = (credentials.IAnonymous,)

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[bytes | tuple[()]]] = []

    def requestAvatarId(self, creds: credentials.IAnonymous) -> defer.Deferred[bytes | tuple[()]]:
        d: defer.Deferred[bytes | tuple[()]] = defer.Deferred()
        self.pending.append(d)
        return d


@implementer(IRealm)
class LateRealm:
    """A realm whose answer the test fires (C{pending}), or that raises (C{broken})."""

    def __init__(self, realm: RecordingRealm, broken: bool = False) -> None:
        self.realm = realm
        self.broken = broken
        self.pending: list[defer.Deferred[Any]] = []

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        if self.broken:
            raise RuntimeError("identity backend down")
        d: defer.Deferred[Any] = defer.Deferred()
        d.addCallback(lambda _: self.realm.requestAvatar(avatarId, mind, *interfaces))
        self.pending.append(d)
        return d


class AnonymousLoginTests(SynchronousTestCase):
    """The first MAIL's anonymous login, whichever way the portal answers.

    With Twisted's AllowAnonymousAccess the shell asks the realm itself
    (L{smtpproxy.smtp.logins.Logins._log_in_anonymously}); these tests pin
    that the replies, the wait and the logout are those of C{Portal.login}.
    """

    def session(
        self, realm: IRealm, checker: ICredentialsChecker | None
    ) -> tuple[RelayProtocol, TLSStringTransport]:
        clock = Clock()
        portal = Portal(realm)
        if checker is not None:
            portal.registerChecker(checker)
        settings = session_defaults(hostname="relay.test")
        factory = RelayFactory(settings, portal, None, clock, Guard(OPEN, clock))
        protocol = factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        protocol.makeConnection(transport)
        return protocol, transport

    def recording(self) -> RecordingRealm:
        return RecordingRealm(RelayRealm(RecordingProvider(), Clock()))

    def test_realm_answering_later_holds_the_pipeline(self) -> None:
        """A realm that answers with a Deferred: MAIL and the pipelined RCPT wait for it,
        then both are answered in order; the avatar is logged out at the end."""
        recording = self.recording()
        realm = LateRealm(recording)
        protocol, transport = self.session(realm, AllowAnonymousAccess())
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertNotIn(b"Sender OK", transport.value())
        realm.pending[0].callback(None)
        self.assertEqual(codes(transport), [220, 250, 250, 250])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recording.events, [("login", "anonymous"), ("logout", "anonymous")])

    def test_anonymous_checker_answering_later(self) -> None:
        """Another anonymous checker goes through Portal.login: MAIL waits for its answer."""
        recording = self.recording()
        checker = SlowAnonymousChecker()
        protocol, transport = self.session(recording, checker)
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        self.assertEqual(recording.events, [])
        checker.pending[0].callback(ANONYMOUS)
        self.assertIn(b"250 2.1.5", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recording.events, [("login", "anonymous"), ("logout", "anonymous")])

    def test_realm_raising_is_a_local_error(self) -> None:
        """A realm that raises gets the client 451 4.3.0 (as through Portal.login), logged
        with its traceback; the session goes on."""
        realm = LateRealm(self.recording(), broken=True)
        protocol, transport = self.session(realm, AllowAnonymousAccess())
        protocol.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        self.assertIn(b"451 4.3.0 Local error in processing\r\n250 2.0.0", transport.value())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
