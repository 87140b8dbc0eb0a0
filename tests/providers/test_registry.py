"""Tests for the provider registry: entry points, provider-owned settings, the default."""

from __future__ import annotations

from twisted.trial import unittest

from smtpproxy import config, providers
from smtpproxy.providers.graph import settings as graph_settings


class RegistryTests(unittest.TestCase):
    def test_config_declares_no_provider_setting(self) -> None:
        """config.py's own table holds no GRAPH_* setting; Graph's come from its module."""
        own = {s.env for s in config.SETTINGS}
        self.assertFalse([name for name in own if name.startswith("GRAPH_")])
        every = {s.env for s in config.settings()}
        self.assertLessEqual({s.env for s in graph_settings.SETTINGS}, every)

    def test_builtins_found_without_installing(self) -> None:
        """From a source tree (no entry points installed) both built-ins are registered."""
        self.assertLessEqual({"graph", "stdout"}, set(providers.names()))

    def test_choice(self) -> None:
        """PROVIDER wins; else the first configured provider; else stdout."""
        self.assertEqual(providers.choose("", []), "stdout")
        self.assertEqual(providers.choose("", ["graph"]), "graph")
        self.assertEqual(providers.choose("stdout", ["graph"]), "stdout")

    def test_graph_settings_read_as_attributes(self) -> None:
        """A provider's setting reads like any other, set or defaulted, and stays secret."""
        loaded = config.load(
            {
                "GRAPH_TENANT_ID": "t",
                "GRAPH_CLIENT_ID": "c",
                "GRAPH_CLIENT_SECRET": "s3cret",
                "GRAPH_SENDER": "a@contoso.example",
            },
            fqdn=lambda: "relay.example",
        )
        self.assertEqual(loaded.provider, "graph")
        self.assertEqual(loaded.graph_sender, ("a@contoso.example",))
        self.assertEqual(loaded.graph_max_concurrency, 4)
        self.assertNotIn("s3cret", repr(loaded))

    def test_unknown_keyword_refused(self) -> None:
        """Config.build refuses a name no setting declares, as a dataclass would."""
        self.assertRaises(TypeError, config.Config.build, graph_tennant_id="x")
