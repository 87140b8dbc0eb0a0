"""Bare local parts qualified, and addresses the relay writes checked, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import ConfigError, load
from smtpproxy.providers.graph.settings import GraphSettings
from smtpproxy.qualify import default_domain, is_deliverable, qualify
from smtpproxy.smtp.commands import CommandError, parse_mail
from smtpproxy.smtp.protocol import session_settings


class QualifyTests(SynchronousTestCase):
    def test_bare_local_part_gets_the_domain(self) -> None:
        """C{root} and dotted local parts become C{local@domain}; anything else is unchanged."""
        self.assertEqual(qualify("root", "example.org"), "root@example.org")
        self.assertEqual(qualify("cron.daily", "example.org"), "cron.daily@example.org")
        for unchanged in ("a@b.example", "", "two words", '"quoted"', ".dot", "a..b", "a<b"):
            self.assertEqual(qualify(unchanged, "example.org"), unchanged)
        self.assertEqual(qualify("root", ""), "root")

    def test_deliverable(self) -> None:
        """Plain C{local@domain.tld} addresses (UTF-8 too) pass; what Graph refuses does not."""
        for good in ("a@b.example", "first.last+tag@mail.example.org", "jörg@müller.example"):
            self.assertTrue(is_deliverable(good), good)
        bad = (
            "root",
            "root@localhost",
            "a@b",
            "@b.example",
            "a@",
            '"a b"@c.example',
            "a@[192.0.2.1]",
            "a b@c.example",
            "a@b..example",
            ".a@b.example",
            "a@b@c.example",
            "a\x00@b.example",
            "x" * 65 + "@b.example",
            "a@" + "b" * 250 + ".example",
        )
        for address in bad:
            self.assertFalse(is_deliverable(address), address)

    def test_default_domain(self) -> None:
        """SMTP_DEFAULT_DOMAIN wins; else the first GRAPH_SENDER's domain; else empty."""
        self.assertEqual(default_domain("set.example", ("r@contoso.example",)), "set.example")
        self.assertEqual(default_domain("", ("r@contoso.example",)), "contoso.example")
        self.assertEqual(default_domain("", ()), "")

    def test_setting_reaches_the_session(self) -> None:
        """SMTP_DEFAULT_DOMAIN is a setting, validated as a host name, and sessions get it."""
        config = load({"SMTP_DEFAULT_DOMAIN": "corp.example"}, fqdn=lambda: "relay.test")
        self.assertEqual(session_settings(config).default_domain, "corp.example")
        graph = load(
            {
                "GRAPH_TENANT_ID": "t",
                "GRAPH_CLIENT_ID": "c",
                "GRAPH_CLIENT_SECRET": "s",
                "GRAPH_SENDER": "relay@contoso.example",
            },
            fqdn=lambda: "relay.test",
        )
        # The Graph provider's mailboxes reach the session through tap.
        senders = GraphSettings.from_config(graph).sender
        self.assertEqual(
            session_settings(graph, mailboxes=senders).default_domain, "contoso.example"
        )
        with self.assertRaises(ConfigError):
            load({"SMTP_DEFAULT_DOMAIN": "not a domain"}, fqdn=lambda: "relay.test")

    @given(st.text(max_size=400), st.sampled_from(["", "example.org"]))
    def test_never_raises(self, text: str, domain: str) -> None:
        """Any text is answered, and a qualified address is deliverable when the input
        was a plain local part."""
        qualified = qualify(text, domain)
        is_deliverable(qualified)
        if domain and qualified != text:
            self.assertTrue(is_deliverable(qualified), qualified)


class MailFromTests(SynchronousTestCase):
    def test_bare_sender_is_qualified(self) -> None:
        """C{MAIL FROM:<root>} is taken as C{root@domain}, as Postfix's append_at_myorigin
        does; with no domain to add it is refused as before."""
        self.assertEqual(parse_mail("FROM:<root>", 100, "example.org").sender, "root@example.org")
        self.assertEqual(
            parse_mail("FROM:root SIZE=10", 100, "example.org").sender, "root@example.org"
        )
        self.assertEqual(parse_mail("FROM:<>", 100, "example.org").sender, "")
        self.assertEqual(parse_mail("FROM:<a@b.example>", 100, "example.org").sender, "a@b.example")
        with self.assertRaises(CommandError) as caught:
            parse_mail("FROM:<root>", 100)
        self.assertEqual(caught.exception.reply.code, 501)
        with self.assertRaises(CommandError):
            parse_mail("FROM:<ro ot>", 100, "example.org")
