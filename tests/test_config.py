"""Settings from the environment over YAML: defaults, overrides, errors."""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.config import Config, ConfigError, listen_endpoint, load
from smtpproxy.providers.stdout import StdoutProvider

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

    def test_shutdown_handover_grace(self) -> None:
        """SMTP_SHUTDOWN_HANDOVER_GRACE is 1.5 s unless set; 0 to 60 s are taken (with an
        optional "s", as other seconds); anything else stops the start with a message
        naming the setting and its range."""
        self.assertEqual(_load({}).smtp_shutdown_handover_grace, 1.5)
        for raw, seconds in (("5", 5.0), ("0", 0.0), ("60s", 60.0), ("2.5", 2.5)):
            config = _load({"SMTP_SHUTDOWN_HANDOVER_GRACE": raw})
            self.assertEqual(config.smtp_shutdown_handover_grace, seconds, raw)
        for raw in ("61", "-1", "abc", "nan", "inf", ""):
            message = self.error({"SMTP_SHUTDOWN_HANDOVER_GRACE": raw})
            self.assertIn("SMTP_SHUTDOWN_HANDOVER_GRACE", message, raw)
            self.assertIn("0 to 60", message, raw)

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


class EnvironmentNamesTests(SynchronousTestCase):
    """Issue 10: a misspelled relay variable stops the relay instead of being ignored."""

    def error(self, env: dict[str, str]) -> str:
        with self.assertRaises(ConfigError) as caught:
            _load(env)
        return str(caught.exception)

    def test_typo_refused_with_the_closest_setting(self) -> None:
        """SMTP_LISTN and GRAPH_TENANTID (which would silently send mail to stdout) stop
        the relay with one line naming each and the setting it was probably meant to be."""
        self.assertEqual(
            self.error({"SMTP_LISTN": ":25"}),
            "SMTP_LISTN (did you mean SMTP_LISTEN?): no such setting in this version of "
            "smtpproxy; fix or unset this environment variable (twistd smtpproxy "
            "--help-settings lists every setting)",
        )
        message = self.error({**GRAPH, "GRAPH_TENANT_ID": "", "GRAPH_TENANTID": "t"})
        self.assertTrue(message.startswith("GRAPH_TENANTID (did you mean GRAPH_TENANT_ID?): "))
        self.assertEqual(message.count("\n"), 0)

    def test_every_prefix_is_checked(self) -> None:
        """Each of the project's prefixes is the relay's, also those without settings yet
        (QUEUE_WOMBAT_BANANA, as QUEUE_URL was before the queue existed)."""
        for name in (
            "SMTP_X",
            "SMTPS_X",
            "GRAPH_X",
            "HTTP_X",
            "TLS_X",
            "QUEUE_WOMBAT_BANANA",
            "RELAY_WOMBAT_BANANA",
            "AUTH_X",
            "MAILBOX_X",
            "STDOUT_X",
        ):
            message = self.error({name: "1"})
            # A hint may come between (HTTP_X is close to HTTPS_PROXY).
            self.assertTrue(message.startswith(f"{name}"), name)
            self.assertIn(": no such setting in this version", message, name)

    def test_hints_are_useful_or_absent(self) -> None:
        """SMTP_PORT points at SMTP_LISTEN (not at SMTP_PASSWORD, which it spells like); a
        name close to nothing gets no hint."""
        self.assertIn("SMTP_PORT (did you mean SMTP_LISTEN?)", self.error({"SMTP_PORT": "25"}))
        self.assertIn("HTTP_PORT (did you mean HTTP_LISTEN?)", self.error({"HTTP_PORT": "80"}))
        self.assertIn("TLS_KEY (did you mean TLS_KEY_FILE?)", self.error({"TLS_KEY": "k"}))
        self.assertNotIn("did you mean", self.error({"QUEUE_URL": "redis://"}))

    def test_several_named_in_one_bounded_line(self) -> None:
        """Several unknown names are listed in one line, sorted, at most five and a count."""
        message = self.error({"SMTP_LISTN": "1", "GRAPH_TENANTID": "2"})
        self.assertTrue(message.startswith("GRAPH_TENANTID (did you mean GRAPH_TENANT_ID?)"))
        self.assertIn("; also SMTP_LISTN (did you mean SMTP_LISTEN?);", message)
        self.assertIn("these environment variables", message)
        many = self.error({f"QUEUE_N{i:03}": "x" for i in range(500)})
        self.assertIn("QUEUE_N004, 495 more;", many)
        self.assertLess(len(many), 400)

    def test_variables_that_are_not_typos(self) -> None:
        """The config-file variable, HTTP_PROXY, other programs' names, lower case, and what
        Kubernetes service links and Docker links set for services named smtp, relay or graph
        do not stop the relay."""
        env = {
            "SMTP_PROXY_CONFIG": "",
            "HTTP_PROXY": "http://proxy:3128",
            "PATH": "/usr/bin",
            "LOG_LEVEL": "info",
            "smtp_listn": "x",
            "SMTPPROXY_SERVICE_HOST": "10.0.0.1",
            "SMTP_SERVICE_HOST": "10.0.0.2",
            "SMTP_SERVICE_PORT": "25",
            "SMTP_SERVICE_PORT_SMTP": "25",
            "SMTP_PORT": "tcp://10.0.0.2:25",
            "SMTP_PORT_25_TCP": "tcp://10.0.0.2:25",
            "SMTP_PORT_25_TCP_ADDR": "10.0.0.2",
            "SMTP_PORT_25_TCP_PORT": "25",
            "SMTP_PORT_25_TCP_PROTO": "tcp",
            "RELAY_NAME": "/web/relay",
            "RELAY_ENV_FOO": "bar",
            "GRAPH_API_SERVICE_HOST": "10.0.0.3",
        }
        self.assertEqual(_load(env).smtp_listen, "tcp:2525")

    def test_yaml_unknown_key_hint(self) -> None:
        """An unknown YAML key gets the same hint, as a YAML path."""
        with self.assertRaises(ConfigError) as caught:
            _load({}, "smtp:\n  lisen: ':25'\n")
        self.assertEqual(
            str(caught.exception),
            "config file: unknown setting 'smtp.lisen' (did you mean smtp.listen?)",
        )


class HostnameFallbackTests(SynchronousTestCase):
    """Issue 10: a system host name that is no DNS name must not stop the relay."""

    def test_invalid_system_name_falls_back_to_localhost(self) -> None:
        """With SMTP_HOSTNAME unset, mail_relay01 gives localhost and a warning naming the
        setting to set, instead of a traceback."""
        config = load({}, fqdn=lambda: "mail_relay01")
        self.assertEqual(config.smtp_hostname, "localhost")
        [(setting, detail)] = config.startup_warnings
        self.assertEqual(setting, "SMTP_HOSTNAME")
        self.assertIn("'mail_relay01' is not a valid DNS name", detail)
        self.assertIn("set SMTP_HOSTNAME", detail)

    def test_other_unusable_names(self) -> None:
        """Empty, non-ASCII, spaced and over-long names fall back too, the shown name cut."""
        for found in ("", "relais-é", "my host", "x" * 300 + "_"):
            config = load({}, fqdn=functools.partial(str, found))
            self.assertEqual(config.smtp_hostname, "localhost", found)
            self.assertLess(len(config.startup_warnings[0][1]), 250)

    def test_valid_system_name_kept_without_warning(self) -> None:
        """A valid name is used as before, with no warning."""
        config = load({}, fqdn=lambda: "relay-01.example.com")
        self.assertEqual(config.smtp_hostname, "relay-01.example.com")
        self.assertEqual(config.startup_warnings, ())

    def test_warning_logged_at_start(self) -> None:
        """The fallback is logged as a warn line naming the setting once the relay starts,
        next to "smtpproxy started"."""
        from smtpproxy import tap
        from smtpproxy.smtp.factory import RelayFactory

        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        settings = load({"HTTP_LISTEN": ""}, fqdn=lambda: "mail_relay01")
        # Starting the log needs neither a listener nor a real factory.
        no_factory = cast(RelayFactory, None)
        provider = StdoutProvider(io.StringIO())
        service = tap.RelayService(settings, no_factory, provider, observer, "")
        service._log_start()
        [event] = [e for e in events if e["log_format"] == "setting replaced by a fallback"]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["setting"], "SMTP_HOSTNAME")
        self.assertIn("mail_relay01", event["detail"])

    def test_explicit_invalid_name_still_refused(self) -> None:
        """SMTP_HOSTNAME=mail_relay01, set by the operator, is still an error: only the
        system's default falls back."""
        with self.assertRaises(ConfigError) as caught:
            load({"SMTP_HOSTNAME": "mail_relay01"}, fqdn=lambda: "ok.example")
        self.assertTrue(str(caught.exception).startswith("SMTP_HOSTNAME: "))


class DeclaredOnceTests(SynchronousTestCase):
    def test_defaults_are_declared_once(self) -> None:
        """The settings classes built from a Config carry no defaults of their own.

        A second copy of a default (a literal on a dataclass field) can drift
        from the one in config.py that the docs and --help-settings show;
        this fails as soon as one is written.
        """
        from smtpproxy.policy.guard import GuardSettings
        from smtpproxy.providers.graph.settings import GraphSettings
        from smtpproxy.queue.policy import Schedule
        from smtpproxy.queue.worker import RunnerSettings
        from smtpproxy.smtp.session import SessionSettings

        for cls in (SessionSettings, GuardSettings, GraphSettings, Schedule, RunnerSettings):
            for f in dataclasses.fields(cls):
                where = f"{cls.__name__}.{f.name}"
                self.assertIs(f.default, dataclasses.MISSING, where)
                self.assertIs(f.default_factory, dataclasses.MISSING, where)

    def test_graph_settings_take_the_declared_defaults(self) -> None:
        """An unset Graph setting gets the default its Setting declares."""
        from smtpproxy.providers.graph.settings import SETTINGS, GraphSettings

        graph = GraphSettings.from_config(Config(smtp_hostname="relay.test"))
        for setting in SETTINGS:
            name = setting.attr.removeprefix("graph_")
            self.assertEqual(getattr(graph, name), setting.default, name)
