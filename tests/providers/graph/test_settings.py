"""The Graph provider's typed view of its settings."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config, load
from smtpproxy.providers.graph.settings import GraphSettings

ENV = {
    "GRAPH_TENANT_ID": "t-1",
    "GRAPH_CLIENT_ID": "c-1",
    "GRAPH_CLIENT_SECRET": "very-secret",
    "GRAPH_SENDER": "a@contoso.example,b@contoso.example",
    "GRAPH_SEND_TIMEOUT": "30",
    "GRAPH_MAX_CONCURRENCY": "2",
}


class GraphSettingsTests(SynchronousTestCase):
    def test_read_typed_from_the_configuration(self) -> None:
        """Every GRAPH_* value reaches the provider with its type; unset ones keep defaults."""
        settings = GraphSettings.from_config(load(ENV, fqdn=lambda: "relay.test"))
        self.assertEqual(settings.sender, ("a@contoso.example", "b@contoso.example"))
        self.assertEqual((settings.tenant_id, settings.client_id), ("t-1", "c-1"))
        self.assertEqual(settings.send_timeout, 30.0)
        self.assertEqual(settings.max_concurrency, 2)
        self.assertEqual(settings.send_mode, "auto")
        self.assertEqual(settings.endpoint, "https://graph.microsoft.com")

    def test_wrong_types_refused(self) -> None:
        """A Config built by hand with a value of the wrong type fails loudly, not later."""
        for name, value in (
            ("graph_sender", "a@contoso.example"),
            ("graph_max_concurrency", "4"),
            ("graph_send_timeout", "fast"),
            ("graph_tenant_id", 42),
        ):
            with self.assertRaises(TypeError, msg=name):
                GraphSettings.from_config(Config.build(**{name: value}))

    def test_repr_hides_the_secret(self) -> None:
        """The client secret never appears in a repr (which a traceback may log)."""
        settings = GraphSettings.from_config(load(ENV, fqdn=lambda: "relay.test"))
        self.assertNotIn("very-secret", repr(settings))
