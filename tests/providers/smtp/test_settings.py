"""The RELAY_* settings: parsing, the provider choice, half configurations, secrecy."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import config, providers
from smtpproxy.providers.smtp.provider import SmtpProvider
from smtpproxy.providers.smtp.settings import RelaySettings


def load(**env: str) -> config.Config:
    return config.load(env, fqdn=lambda: "relay.example")


class SettingsTests(SynchronousTestCase):
    def test_host_chooses_the_provider(self) -> None:
        """RELAY_HOST alone selects PROVIDER=smtp with the documented defaults."""
        loaded = load(RELAY_HOST="mail.example.com")
        self.assertEqual(loaded.provider, "smtp")
        settings = RelaySettings.from_config(loaded)
        self.assertEqual(
            (settings.port, settings.tls, settings.tls_verify, settings.helo),
            (587, "starttls", True, "relay.example"),
        )

    def test_values_parsed(self) -> None:
        """Each setting reads its own form; the password is kept exactly and never shown."""
        loaded = load(
            RELAY_HOST="[2001:db8::1]",
            RELAY_PORT="465",
            RELAY_TLS="Implicit",
            RELAY_USERNAME="app",
            RELAY_PASSWORD=" p@ss ",
            RELAY_TLS_VERIFY="no",
            RELAY_MAX_CONNECTIONS="3",
            RELAY_TIMEOUT="5s",
            RELAY_HELO="out.example.com",
            RELAY_FROM=" <relay@example.com>",
        )
        settings = RelaySettings.from_config(loaded)
        self.assertEqual(settings.sender, "relay@example.com")
        self.assertEqual(RelaySettings.from_config(load(RELAY_HOST="h")).sender, "")
        self.assertEqual(settings.host, "2001:db8::1")
        self.assertEqual(
            (settings.port, settings.tls, settings.password), (465, "implicit", " p@ss ")
        )
        self.assertEqual((settings.max_connections, settings.timeout), (3, 5.0))
        self.assertFalse(settings.tls_verify)
        self.assertNotIn("p@ss", repr(loaded))
        self.assertNotIn("p@ss", repr(settings))

    def test_refusals(self) -> None:
        """Bad values and half configurations stop the start with the setting named."""
        for env, name in (
            ({"RELAY_HOST": "a b"}, "RELAY_HOST"),
            ({"RELAY_HOST": "h", "RELAY_PORT": "0"}, "RELAY_PORT"),
            ({"RELAY_HOST": "h", "RELAY_TLS": "ssl"}, "RELAY_TLS"),
            ({"RELAY_HOST": "h", "RELAY_FROM": "relay"}, "RELAY_FROM"),
            ({"RELAY_HOST": "h", "RELAY_FROM": "a b@example.com"}, "RELAY_FROM"),
            ({"RELAY_FROM": "a@example.com"}, "RELAY_HOST"),
            ({"RELAY_HOST": "h", "RELAY_USERNAME": "u"}, "RELAY_PASSWORD"),
            ({"RELAY_HOST": "h", "RELAY_CLIENT_CERT_FILE": "c"}, "RELAY_CLIENT_KEY_FILE"),
            ({"RELAY_PORT": "25"}, "RELAY_HOST"),
            ({"PROVIDER": "smtp"}, "PROVIDER"),
        ):
            error = self.assertRaises(
                config.ConfigError, config.load, env, fqdn=lambda: "r.example"
            )
            self.assertTrue(str(error).startswith(f"{name}:"), (env, str(error)))

    def test_capabilities_declared(self) -> None:
        """The provider sends raw bytes (an abandoned parse is fine) but offers no BINARYMIME."""
        self.assertIn("smtp", providers.names())
        self.assertTrue(SmtpProvider.accepts_raw_mime)
        self.assertFalse(SmtpProvider.binary_mime)
