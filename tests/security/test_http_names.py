"""Security regression suite: what the API writes reads back as posted (SEC-150, SEC-151).

Review 5 found that a display name longer than a line, quoted by the
builder, lost its quotes when the header registry folded the header: a
name holding C{<someone@else>, } became a mailbox of its own, one the
key's sender and recipient checks never saw.  Every test here posts over
real HTTP (treq) to the API on a loopback site and reads what the
recording provider received: its L{Email} view and its raw bytes, parsed
again by the C{email} package and by the relay's own parser.
docs/security.md maps each control to its test.
"""

from __future__ import annotations

import email
import email.policy

from twisted.trial.unittest import TestCase

from smtpproxy.mime.message import parse_message
from smtpproxy.policy.rules import parse_address_patterns
from tests.support import async_test
from tests.web.api.harness import ApiServer, key, message

#: Names that once went out as two mailboxes, in ASCII and not.
INJECTED_NAMES = (
    "Support <ceo@example.com>, " + "y" * 60,
    'a;"<ceo@example.com>",\\' + "x" * 80,
    "Zoë <ceo@example.com>, " + "y" * 60,
    "=?utf-8?q?Boss?= <ceo@example.com>, " + "y" * 60,
)


class DisplayNameInjectionTests(TestCase):
    @async_test
    async def test_SEC_150_long_display_name_cannot_add_a_mailbox(self) -> None:
        """A key limited to one sender and one domain posts long display names holding an
        address and a comma in From, To, Cc and Reply-To: the message is delivered with
        exactly the mailboxes posted, in the provider's view, in the bytes as the package
        reads them and in the relay's own parse; the name's address is in none of them."""
        limited = key(
            allowed_senders=parse_address_patterns("app@example.com"),
            allowed_recipients=parse_address_patterns("@example.org"),
        )
        server = ApiServer(self, keys=(limited,))
        for name in INJECTED_NAMES:
            document = message(
                **{"from": {"address": "app@example.com", "name": name}},
                to=[{"address": "rcpt@example.org", "name": name}],
                cc=[{"address": "copy@example.org", "name": name}],
                reply_to={"address": "app@example.com", "name": name},
            )
            answer = await server.send(document)
            self.assertEqual(answer.status, 200, name)
        self.assertEqual(len(server.provider.emails), len(INJECTED_NAMES))
        posted = {
            "From": ["app@example.com"],
            "To": ["rcpt@example.org"],
            "Cc": ["copy@example.org"],
            "Reply-To": ["app@example.com"],
        }
        for delivered in server.provider.emails:
            parsed = email.message_from_bytes(delivered.raw, policy=email.policy.default)
            relay = parse_message(delivered.envelope_from, delivered.envelope_to, delivered.raw)
            for view in (delivered, relay):
                found = {
                    "From": [m.address for m in view.from_],
                    "To": [m.address for m in view.to],
                    "Cc": [m.address for m in view.cc],
                    "Reply-To": [m.address for m in view.reply_to],
                }
                self.assertEqual(found, posted)
            for header, addresses in posted.items():
                self.assertEqual([a.addr_spec for a in parsed[header].addresses], addresses)
            self.assertEqual(delivered.envelope_to, ("rcpt@example.org", "copy@example.org"))


class ProviderViewTests(TestCase):
    @async_test
    async def test_SEC_151_provider_view_agrees_with_the_bytes(self) -> None:
        """Names, header values and file names that a reader decodes or unquotes
        (C{=?utf-8?q?Boss?=}, C{<report>}) reach the provider as the message's own bytes
        read them, and the bytes read as posted where the format allows: the name and the
        X- value as posted, a long message id and unsubscribe URL unencoded."""
        server = ApiServer(self)
        link = "<https://news.example.com/u?token=" + "Ab9" * 50 + ">"
        message_id = "<AM0PR01MB1234567890ABCDEF1234567890ABCDEF@AM0PR01MB1234.eurprd01.prod.x.com>"
        document = message(
            to=[{"address": "rcpt@example.org", "name": "=?utf-8?q?Boss?="}],
            headers={
                "X-Ticket": "=?utf-8?b?SGk=?=",
                "List-Unsubscribe": link,
                "References": message_id,
            },
            attachments=[
                {"filename": "<report>", "content": "aGk="},
                {"filename": "=?utf-8?q?x?=.pdf", "content": "aGk="},
            ],
        )
        answer = await server.send(document)
        self.assertEqual(answer.status, 200)
        [delivered] = server.provider.emails
        relay = parse_message(delivered.envelope_from, delivered.envelope_to, delivered.raw)
        self.assertEqual((delivered.to, delivered.attachments), (relay.to, relay.attachments))
        parsed = email.message_from_bytes(delivered.raw, policy=email.policy.default)
        self.assertEqual(parsed["To"].addresses[0].display_name, "=?utf-8?q?Boss?=")
        self.assertEqual(str(parsed["X-Ticket"]), "=?utf-8?b?SGk=?=")
        head = delivered.raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ")
        self.assertIn(b"List-Unsubscribe: " + link.encode(), head)
        self.assertIn(b"References: " + message_id.encode(), head)
