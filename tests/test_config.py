"""Settings from the environment over YAML: defaults, overrides, errors."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config, ConfigError, listen_endpoint, load

GRAPH = {
    "GRAPH_TENANT_ID": "tenant",
    "GRAPH_CLIENT_ID": "client",
    "GRAPH_CLIENT_SECRET": "secret-value",
    "GRAPH_SENDER": "relay@contoso.example",
}


def _load(env: dict[str, str], yaml_text: str | None = None) -> Config:
    return load(env, yaml_text, fqdn=lambda: "host.example")


class ConfigTests(SynchronousTestCase):
    def error(self, env: dict[str, str], yaml_text: str | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            _load(env, yaml_text)
        return str(caught.exception)

    def test_zero_config(self) -> None:
        """No settings: stdout, :2525, health on :8080, no AUTH, 25 MB, FQDN as hostname."""
        config = _load({})
        self.assertEqual(config.provider, "stdout")
        self.assertEqual(config.smtp_listen, "tcp:2525")
        self.assertEqual(config.http_listen, "tcp:8080")
        self.assertFalse(config.auth_enabled)
        self.assertEqual(config.smtp_max_message_size, 26_214_400)
        self.assertEqual(config.smtp_max_recipients, 500)
        self.assertEqual(config.smtp_hostname, "host.example")
        self.assertEqual(config.log_level, "info")

    def test_fqdn_not_looked_up_when_configured(self) -> None:
        """SMTP_HOSTNAME set means no DNS lookup at all."""

        def no_dns() -> str:
            raise AssertionError("looked up")

        self.assertEqual(
            load({"SMTP_HOSTNAME": "mx.example"}, fqdn=no_dns).smtp_hostname, "mx.example"
        )

    def test_listen_forms(self) -> None:
        """Listen values accept :port, host:port, [v6]:port and endpoint strings."""
        self.assertEqual(listen_endpoint(":25"), "tcp:25")
        self.assertEqual(listen_endpoint("2525"), "tcp:2525")
        self.assertEqual(listen_endpoint("127.0.0.1:2525"), "tcp:2525:interface=127.0.0.1")
        self.assertEqual(listen_endpoint("[::1]:2525"), "tcp6:2525:interface=\\:\\:1")
        self.assertEqual(listen_endpoint("haproxy:tcp:2525"), "haproxy:tcp:2525")
        for bad in ("nonsense", ":99999", "1.2.3:25", "[zz]:25", "host:port"):
            with self.assertRaises(ValueError):
                listen_endpoint(bad)

    def test_http_listen_empty_disables(self) -> None:
        """An empty HTTP_LISTEN turns the health endpoint off."""
        self.assertEqual(_load({"HTTP_LISTEN": ""}).http_listen, "")

    def test_graph_selected_when_complete(self) -> None:
        """All four GRAPH_* settings select the Graph provider; GRAPH_SENDER may list several."""
        config = _load({**GRAPH, "GRAPH_SENDER": "a@contoso.example, b@contoso.example"})
        self.assertEqual(config.provider, "graph")
        self.assertEqual(config.graph_sender, ("a@contoso.example", "b@contoso.example"))

    def test_partial_graph_refused(self) -> None:
        """Some GRAPH_* but not all: refuse to start, naming what is missing."""
        message = self.error({"GRAPH_TENANT_ID": "t", "GRAPH_CLIENT_ID": "c"})
        self.assertIn("GRAPH_CLIENT_SECRET", message)
        self.assertIn("GRAPH_SENDER", message)

    def test_auth_needs_both(self) -> None:
        """A username without a password (or the reverse) is an error naming the missing one."""
        self.assertIn("SMTP_PASSWORD", self.error({"SMTP_USERNAME": "u"}))
        self.assertIn("SMTP_USERNAME", self.error({"SMTP_PASSWORD": "p"}))
        self.assertTrue(_load({"SMTP_USERNAME": "u", "SMTP_PASSWORD": "p"}).auth_enabled)

    def test_invalid_values_name_the_setting(self) -> None:
        """Each malformed value's error starts with the variable's name."""
        cases = {
            "SMTP_MAX_MESSAGE_SIZE": "big",
            "SMTP_MAX_RECIPIENTS": "0",
            "LOG_LEVEL": "loud",
            "SMTP_ALLOW_INSECURE_AUTH": "perhaps",
            "GRAPH_SEND_TIMEOUT": "-1",
            "GRAPH_ENDPOINT": "ftp://x",
            "SMTP_LISTEN": "",
            "SMTP_HOSTNAME": "bad host",
        }
        for name, value in cases.items():
            self.assertTrue(self.error({name: value}).startswith(name + ":"), name)

    def test_yaml_base_env_overrides(self) -> None:
        """YAML supplies values; the environment wins where both are set (R5.4)."""
        yaml_text = """
smtp:
  listen: ":2626"
  max_recipients: 10
  allow_insecure_auth: true
log:
  level: debug
graph:
  sender: [a@contoso.example, b@contoso.example]
  tenant_id: t
  client_id: c
  client_secret: s
"""
        config = _load({"SMTP_LISTEN": ":2727"}, yaml_text)
        self.assertEqual(config.smtp_listen, "tcp:2727")
        self.assertEqual(config.smtp_max_recipients, 10)
        self.assertTrue(config.smtp_allow_insecure_auth)
        self.assertEqual(config.log_level, "debug")
        self.assertEqual(config.provider, "graph")
        self.assertEqual(config.graph_sender, ("a@contoso.example", "b@contoso.example"))

    def test_yaml_errors(self) -> None:
        """Unknown keys, wrong shapes and broken YAML are errors naming the problem."""
        self.assertIn("smtp.lisen", self.error({}, "smtp:\n  lisen: 1\n"))
        self.assertIn("unknown setting", self.error({}, "bogus: 1\n"))
        self.assertIn("must be a mapping", self.error({}, "smtp: 5\n"))
        self.assertIn("not valid YAML", self.error({}, "smtp: [\n"))
        self.assertIn("mapping", self.error({}, "- a\n- b\n"))
        self.assertEqual(_load({}, "").provider, "stdout")

    def test_yaml_numbers_and_booleans_for_typed_settings(self) -> None:
        """Number and boolean settings take unquoted YAML values, read as written (decimal),
        exactly as the same text from the environment would be."""
        yaml_text = (
            "smtp:\n  max_recipients: 010\n  max_message_size: 10_485_760\n"
            "  allow_insecure_auth: yes\n  command_timeout: 2.5\n  max_connections: 0\n"
        )
        config = _load({}, yaml_text)
        self.assertEqual(config.smtp_max_recipients, 10)
        self.assertEqual(config.smtp_max_message_size, 10_485_760)
        self.assertTrue(config.smtp_allow_insecure_auth)
        self.assertEqual(config.smtp_command_timeout, 2.5)
        self.assertEqual(config.smtp_max_connections, 0)
        env = {"SMTP_MAX_RECIPIENTS": "010", "SMTP_ALLOW_INSECURE_AUTH": "yes"}
        self.assertEqual(_load(env).smtp_max_recipients, config.smtp_max_recipients)

    def test_yaml_text_kept_as_written(self) -> None:
        """Quoted, explicitly tagged, block and plain text values reach the setting verbatim;
        an empty value is empty."""
        yaml_text = (
            "smtp:\n  username: !!str 0123\n  password: |\n    line one\n"
            "  hostname:\ngraph:\n  sender: [a@contoso.example, 'b@contoso.example']\n"
            "  tenant_id: '0042'\n  client_id: \"1e3\"\n  client_secret: plain-text\n"
        )
        config = _load({}, yaml_text)
        self.assertEqual(config.smtp_username, "0123")
        self.assertEqual(config.smtp_password, "line one\n")
        self.assertEqual(config.smtp_hostname, "host.example")
        self.assertEqual(config.graph_sender, ("a@contoso.example", "b@contoso.example"))
        self.assertEqual((config.graph_tenant_id, config.graph_client_id), ("0042", "1e3"))

    def test_yaml_coercion_refused_everywhere_text_is_expected(self) -> None:
        """A list item, a null spelled out and a float are refused for text settings too;
        the message names the setting, the line and the YAML path, never the value."""
        message = self.error({}, "smtp:\n  allowed_senders: [a@b.example, 5]\n")
        self.assertEqual(
            message,
            "SMTP_ALLOWED_SENDERS: config file line 2 (smtp.allowed_senders): YAML reads this "
            "unquoted value as a number, not as the text written; put it in quotes to keep "
            "it as written",
        )
        self.assertIn("as null", self.error({}, "smtp:\n  username: u\n  password: ~\n"))
        secret = self.error({}, "graph:\n  client_secret: 1234.5678\n")
        self.assertTrue(secret.startswith("GRAPH_CLIENT_SECRET: "), secret)
        self.assertNotIn("1234", secret)

    def test_yaml_tags_and_shapes_refused(self) -> None:
        """Non-scalar tags, nested lists and non-scalar keys are refused, not stringified."""
        self.assertIn(
            "tag tag:yaml.org,2002:binary is not allowed",
            self.error({}, "smtp:\n  password: !!binary aGk=\n"),
        )
        self.assertIn("not allowed", self.error({}, "smtp:\n  max_errors: !custom 5\n"))
        self.assertIn(
            "must be a single value", self.error({}, "smtp:\n  allowed_networks: [[10.0.0.0/8]]\n")
        )
        self.assertIn("must be a single value", self.error({}, "smtp:\n  hostname: {a: b}\n"))
        self.assertIn("expected a setting name", self.error({}, "? [a]\n: b\n"))
        self.assertEqual(_load({}, "~\n").provider, "stdout")

    def test_stdout_format(self) -> None:
        """STDOUT_FORMAT takes text or json (any case) and nothing else."""
        self.assertEqual(_load({}).stdout_format, "text")
        self.assertEqual(_load({}, "stdout:\n  format: json\n").stdout_format, "json")
        self.assertTrue(self.error({"STDOUT_FORMAT": "xml"}).startswith("STDOUT_FORMAT: "))

    def test_repr_hides_secrets(self) -> None:
        """repr() never shows the SMTP password or the Graph client secret."""
        config = _load({**GRAPH, "SMTP_USERNAME": "u", "SMTP_PASSWORD": "hunter2"})
        self.assertNotIn("hunter2", repr(config))
        self.assertNotIn("secret-value", repr(config))


class DerivedSettingsTests(SynchronousTestCase):
    def test_defaults_do_not_drift(self) -> None:
        """The session and guard settings built from a default Config equal their own defaults.

        Those classes carry defaults for tests and embedding; this keeps them
        the same as the documented configuration defaults.
        """
        from smtpproxy.guard import GuardSettings, settings_from
        from smtpproxy.smtp import SessionSettings, session_settings

        config = Config(smtp_hostname="relay.test")
        self.assertEqual(session_settings(config), SessionSettings(hostname="relay.test"))
        self.assertEqual(settings_from(config), GuardSettings())
