"""The queue's front door: an SMTP transaction in queue mode, over a StringTransport.

The session, the delivery avatar and the front door are the real ones; the
store is the in-memory one of L{tests.queue.memory} (the real backends are
covered by their contract tests and the end-to-end tests).
"""

from __future__ import annotations

import dataclasses
import json
import re

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IMessageDelivery
from twisted.mail.smtp import Address, User
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.delivery import RelayRealm
from smtpproxy.dsn import Dsn, RecipientDsn
from smtpproxy.identities.model import Identity
from smtpproxy.identities.realm import IdentityRealm
from smtpproxy.policy.guard import Guard
from smtpproxy.policy.identity import IdentityPolicy
from smtpproxy.queue.front import (
    QueueFront,
    dsn_from_meta,
    mailbox_from_meta,
    meta_json,
    new_queue_id,
    route_for,
)
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import RelayProtocol
from smtpproxy.spool import MessageBody
from tests.queue.memory import MemoryStore
from tests.support import OPEN, RecordingProvider, session_defaults

BODY = b"Subject: queued?\r\n\r\n" + b"A line of the body.\r\n" * 200
TRANSACTION = (
    b"EHLO c\r\nMAIL FROM:<a@example.com> RET=HDRS ENVID=e1\r\n"
    b"RCPT TO:<b@example.org> NOTIFY=FAILURE\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
    + BODY
    + b".\r\n"
)


def body_of(data: bytes) -> MessageBody:
    body = MessageBody()
    body.write(data)
    return body


QUEUED = re.compile(rb"250 2\.0\.0 OK: queued as ([0-9a-f]{24})\r\n")


class _FrontCase(SynchronousTestCase):
    """A real session, avatar and front door over the in-memory store."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.provider = RecordingProvider()
        self.kicks = 0
        self.front = QueueFront(self.store, self.clock, "relay@contoso.example", self.kick)

    def kick(self) -> None:
        self.kicks += 1

    def session(self, spool_threshold: int = 1 << 20) -> tuple[RelayProtocol, StringTransport]:
        portal = Portal(RelayRealm(self.provider, self.clock, queue=self.front))
        portal.registerChecker(AllowAnonymousAccess())
        guard = Guard(dataclasses.replace(OPEN, auth_enabled=False), self.clock)
        session_settings = session_defaults(spool_threshold=spool_threshold)
        factory = RelayFactory(session_settings, portal, None, self.clock, guard)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        protocol.makeConnection(transport)
        return protocol, transport


class FrontDoorTests(_FrontCase):
    def test_answered_only_once_durable(self) -> None:
        """The 250 comes after the store's Deferred fired, names the id, and the store
        holds envelope, DSN parameters, route and body; nothing reached the provider."""
        self.store.hold_enqueue = []
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        self.assertNotIn(b"queued as", transport.value())
        self.assertEqual(self.store.entries, {})
        [held] = self.store.hold_enqueue
        held.callback(None)
        match = QUEUED.search(transport.value())
        assert match is not None, transport.value()
        id = match.group(1).decode()
        entry = self.store.entries[id]
        self.assertEqual(entry.envelope.sender, "a@example.com")
        self.assertEqual(entry.envelope.recipients, ("b@example.org", "c@example.org"))
        self.assertEqual(entry.envelope.client, "192.0.2.7")
        self.assertEqual(entry.envelope.route, "relay@contoso.example")
        dsn = dsn_from_meta(entry.envelope.meta)
        assert dsn is not None
        self.assertEqual((dsn.ret, dsn.envid), ("HDRS", "e1"))
        self.assertEqual(dsn.recipients[0].notify, ("FAILURE",))
        self.assertEqual(self.store.bodies[id], BODY)
        self.assertEqual(self.provider.emails, [])
        self.assertEqual(self.kicks, 1)

    def test_spooled_body_copied_without_a_memory_claim(self) -> None:
        """A body spooled to disk is copied to the store from its file, never claimed
        back into the in-memory budget."""
        self.store.hold_enqueue = []
        protocol, transport = self.session(spool_threshold=100)
        protocol.dataReceived(TRANSACTION)
        self.assertEqual(protocol.factory.spool.budget.held, 0)
        self.assertEqual(protocol.factory.spool.budget.waiting, 0)
        self.store.hold_enqueue[0].callback(None)
        match = QUEUED.search(transport.value())
        assert match is not None
        self.assertEqual(self.store.bodies[match.group(1).decode()], BODY)

    def test_queue_full_is_452(self) -> None:
        """Past QUEUE_MAX_BYTES the client hears 452 4.3.1 and nothing is stored."""
        self.store.max_bytes = 100
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        self.assertIn(b"452 4.3.1 ", transport.value())
        self.assertEqual(self.store.entries, {})

    def test_store_failure_is_451(self) -> None:
        """Any other store failure is a 451 4.3.0: the client keeps the message."""
        self.store.hold_enqueue = []
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        self.store.hold_enqueue[0].errback(OSError("disk on fire"))
        self.assertIn(b"451 4.3.0 ", transport.value())
        self.assertNotIn(b"disk on fire", transport.value())
        self.flushLoggedErrors(OSError)

    def test_waits_for_the_store_to_open(self) -> None:
        """A message finished while the store is still opening waits for it, then is
        answered 250; if the store cannot open, 451."""
        self.front = QueueFront(self.store, self.clock, open=False)
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        self.assertNotIn(b"queued as", transport.value())
        self.front.opened()
        self.assertIsNotNone(QUEUED.search(transport.value()))

        self.front = QueueFront(self.store, self.clock, open=False)
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        self.front.open_failed()
        self.assertIn(b"451 4.3.0 the queue is not available", transport.value())
        self.flushLoggedErrors()


class ForcedShutdownTests(_FrontCase):
    """SMTP_SHUTDOWN_TIMEOUT runs out while the store holds a session's message.

    The session asks the store to withdraw it: "not accepted" only when the
    store confirms it will never commit; otherwise the real outcome.
    """

    def held_at_shutdown(self) -> tuple[RelayProtocol, StringTransport, str]:
        """A session whose message waits in the store when the shutdown timeout forces it."""
        self.store.hold_enqueue = []
        protocol, transport = self.session()
        protocol.dataReceived(TRANSACTION)
        [id] = self.store.withdrawable
        protocol.factory.shutdown(1.0)
        self.assertNotIn(b"421", transport.value())
        return protocol, transport, id

    def test_withdrawn_then_421(self) -> None:
        """The store withdrew the message: 421 "not accepted", and nothing is stored."""
        _, transport, _ = self.held_at_shutdown()
        self.clock.advance(1.0)
        self.assertIn(b"421 4.3.2 Shutting down, message not accepted", transport.value())
        self.assertNotIn(b"queued as", transport.value())
        self.assertEqual((self.store.entries, self.store.hold_enqueue), ({}, []))

    def test_commit_under_way_answers_250(self) -> None:
        """The store could no longer withdraw it (its commit was under way): no 421
        "not accepted"; once it commits the client hears 250 queued, then the
        ordinary 421 of a shutdown."""
        _, transport, id = self.held_at_shutdown()
        self.store.sealed.add(id)
        self.clock.advance(1.0)
        self.assertNotIn(b"421", transport.value())
        assert self.store.hold_enqueue is not None
        self.store.hold_enqueue[0].callback(None)
        reply = transport.value()
        match = QUEUED.search(reply)
        assert match is not None, reply
        self.assertEqual(match.group(1).decode(), id)
        self.assertIn(id, self.store.entries)
        self.assertNotIn(b"not accepted", reply)
        self.assertIn(b"421 4.3.2 ", reply[match.end() :])

    def test_commit_unanswered_gets_no_reply(self) -> None:
        """A commit under way that does not answer within the grace: the connection is
        cut without a reply (neither "not accepted" nor 250 would be known true)."""
        _, transport, id = self.held_at_shutdown()
        self.store.sealed.add(id)
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertTrue(transport.disconnected)
        self.assertNotIn(b"421", transport.value())
        self.assertNotIn(b"queued as", transport.value())


class IdTests(SynchronousTestCase):
    def test_ids_are_96_bits_time_first(self) -> None:
        """24 hex digits; later ids sort after earlier ones; 10,000 in one millisecond
        are all distinct."""
        ids = {new_queue_id(1_700_000_000.0) for _ in range(10_000)}
        self.assertEqual(len(ids), 10_000)
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids))
        self.assertLess(max(ids), new_queue_id(1_700_000_000.002))

    def test_route(self) -> None:
        """One mailbox is the route; several (chosen by the From header) share one lane."""
        self.assertEqual(route_for(("Relay@Contoso.example",)), "relay@contoso.example")
        self.assertEqual(route_for(("a@x.example", "b@x.example")), "")
        self.assertEqual(route_for(()), "")


class BoundMailboxTests(SynchronousTestCase):
    """An identity's policy mailbox travels with the message, direct and queued."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.provider = RecordingProvider()

    def send(self, queue: QueueFront | None, mailbox: str) -> str:
        """One message through the identity realm's avatar; fires with its id."""
        realm = IdentityRealm(RelayRealm(self.provider, self.clock, queue=queue), self.clock)
        identity = Identity("apps", "app", IdentityPolicy(mailbox=mailbox))
        _, delivery, _ = realm.requestAvatar(identity, None, IMessageDelivery)
        delivery.validateFrom((b"c", b"192.0.2.7"), Address(b"a@example.com"))
        factory = delivery.validateTo(User(b"b@example.org", b"c", None, Address(b"a@example.com")))
        assert callable(factory)
        message = factory()
        message.bodyReceived(body_of(b"Subject: hi\r\n\r\nHello.\r\n"))
        return str(self.successResultOf(message.eomReceived()))

    def test_direct_email_carries_the_mailbox(self) -> None:
        """Direct mode: the provider's Email names the identity's mailbox."""
        self.send(None, "billing@contoso.example")
        [email] = self.provider.emails
        self.assertEqual(email.mailbox, "billing@contoso.example")

    def test_unbound_identity_leaves_the_choice_to_the_provider(self) -> None:
        """An identity without a mailbox sends with an empty one: the provider chooses."""
        self.send(None, "")
        [email] = self.provider.emails
        self.assertEqual(email.mailbox, "")

    def test_queued_entry_keeps_the_mailbox_and_its_lane(self) -> None:
        """Queue mode: the stored meta names the mailbox (read back by mailbox_from_meta,
        DSN-free) and the route is that mailbox's lane, not the provider's default."""
        front = QueueFront(self.store, self.clock, "relay@contoso.example")
        id = self.send(front, "Billing@Contoso.example")
        entry = self.store.entries[id]
        self.assertEqual(mailbox_from_meta(entry.envelope.meta), "Billing@Contoso.example")
        self.assertIsNone(dsn_from_meta(entry.envelope.meta))
        self.assertEqual(entry.envelope.route, "billing@contoso.example")
        self.assertEqual(self.provider.emails, [])


class MetaTests(SynchronousTestCase):
    def test_mailbox_round_trip_beside_dsn(self) -> None:
        """meta_json keeps mailbox and DSN side by side; each reads back alone."""
        dsn = Dsn("FULL", "e9", (RecipientDsn("b@example.org", ("NEVER",), None),))
        meta = meta_json(dsn, "billing@contoso.example")
        self.assertEqual(mailbox_from_meta(meta), "billing@contoso.example")
        self.assertEqual(dsn_from_meta(meta), dsn)
        self.assertEqual(meta_json(None, ""), "{}")

    def test_meta_written_before_mailboxes_has_none(self) -> None:
        """A row queued by an older relay (no mailbox key, or unreadable meta) reads as no
        mailbox: the provider chooses as it did then."""
        old = json.dumps({"dsn": {"ret": "HDRS", "envid": None, "recipients": []}})
        for meta in (old, "{}", "", "{", "[]", json.dumps({"mailbox": 7})):
            self.assertEqual(mailbox_from_meta(meta), "")

    def test_unreadable_meta_is_no_dsn(self) -> None:
        """A meta that is not the expected JSON gives no DSN rather than an error."""
        for meta in ("", "{", "[]", json.dumps({"dsn": 3}), "{}"):
            self.assertIsNone(dsn_from_meta(meta))
