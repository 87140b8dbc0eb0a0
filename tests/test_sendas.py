"""The start-up check of the mailboxes logins are bound to (smtpproxy.sendas), without I/O."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config
from smtpproxy.sendas import provider_senders, unknown_mailbox


class UnknownMailboxTests(SynchronousTestCase):
    def test_graph_senders_compared_as_graph_compares(self) -> None:
        """With Graph, a mailbox is known when it is a GRAPH_SENDER up to case and angle
        brackets; the first unknown one is named with where it is written."""
        graph = Config.build(provider="graph", graph_sender=("relay@c.example", "scan@c.example"))
        self.assertEqual(provider_senders(graph), ("relay@c.example", "scan@c.example"))
        self.assertIsNone(unknown_mailbox([("a", "Scan@C.Example"), ("b", "")], graph))
        problem = unknown_mailbox(
            [("a", "relay@c.example"), ("provider 'x'", "x@c.example")], graph
        )
        self.assertEqual(
            problem,
            "provider 'x': mailbox 'x@c.example' is not one of GRAPH_SENDER "
            "(relay@c.example, scan@c.example)",
        )

    def test_other_providers_have_no_list(self) -> None:
        """stdout (and the other providers) send as the envelope says: nothing to check."""
        self.assertIsNone(provider_senders(Config()))
        self.assertIsNone(unknown_mailbox([("a", "x@c.example")], Config()))
