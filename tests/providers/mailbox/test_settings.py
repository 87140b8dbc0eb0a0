"""The mailbox's settings as the relay reads them from the environment."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import ConfigError, load
from smtpproxy.policy.rules import DEFAULT_PRIVATE_NETWORKS, parse_networks
from smtpproxy.providers.mailbox.chaos import Trigger
from smtpproxy.providers.mailbox.settings import MailboxSettings


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """PROVIDER=mailbox alone: 1,000 messages, 100 MiB, memory, private networks, no
        auth, no release, no chaos; and the mailbox is never chosen without PROVIDER."""
        config = load({"PROVIDER": "mailbox"})
        settings = MailboxSettings.from_config(config)
        self.assertEqual((settings.max_messages, settings.max_bytes), (1000, 104_857_600))
        self.assertEqual((settings.path, settings.username, settings.release_provider), ("",) * 3)
        self.assertEqual(settings.allowed_networks, DEFAULT_PRIVATE_NETWORKS)
        self.assertFalse(settings.chaos.enabled)
        self.assertEqual(load({"MAILBOX_MAX_MESSAGES": "5"}).provider, "stdout")

    def test_values(self) -> None:
        """Each setting comes back typed; the password never shows in the repr."""
        config = load(
            {
                "PROVIDER": "mailbox",
                "MAILBOX_MAX_MESSAGES": "50",
                "MAILBOX_ALLOWED_NETWORKS": "10.0.0.0/8",
                "MAILBOX_USERNAME": "dev",
                "MAILBOX_PASSWORD": "hunter2",
                "MAILBOX_RELEASE_PROVIDER": "stdout",
                "MAILBOX_CHAOS": "recipient=451:20",
            }
        )
        settings = MailboxSettings.from_config(config)
        self.assertEqual(settings.max_messages, 50)
        self.assertEqual(settings.allowed_networks, parse_networks("10.0.0.0/8"))
        self.assertEqual(settings.chaos.recipient, Trigger(451, 20))
        self.assertEqual(settings.release_provider, "stdout")
        self.assertNotIn("hunter2", repr(settings))

    def test_mistakes_stop_the_relay_with_the_setting_named(self) -> None:
        """Half of basic auth, an unknown or circular release provider, bad chaos, no
        HTTP listener: one ConfigError naming the setting."""
        for env, name in (
            ({"MAILBOX_USERNAME": "dev"}, "MAILBOX_PASSWORD"),
            ({"MAILBOX_PASSWORD": "x"}, "MAILBOX_USERNAME"),
            ({"MAILBOX_RELEASE_PROVIDER": "nope"}, "MAILBOX_RELEASE_PROVIDER"),
            ({"MAILBOX_RELEASE_PROVIDER": "mailbox"}, "MAILBOX_RELEASE_PROVIDER"),
            ({"MAILBOX_CHAOS": "sender=200:5"}, "MAILBOX_CHAOS"),
            ({"MAILBOX_MAX_BYTES": "0"}, "MAILBOX_MAX_BYTES"),
            ({"HTTP_LISTEN": ""}, "HTTP_LISTEN"),
        ):
            with self.assertRaises(ConfigError) as caught:
                load({"PROVIDER": "mailbox", **env})
            self.assertIn(name, str(caught.exception), env)
