"""L{smtpproxy.smtp.listeners}: what SMTP_LISTEN and SMTPS_LISTEN values turn into (no sockets)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import config
from smtpproxy.smtp.listeners import Listener, ListenError, certificate_files, plan


class PlanTests(SynchronousTestCase):
    def test_plain_listener_is_starttls(self) -> None:
        """A tcp: value on SMTP_LISTEN is plain SMTP (STARTTLS), with the relay's backlog."""
        spec = plan("SMTP_LISTEN", "tcp:2525")
        self.assertEqual(spec, Listener("SMTP_LISTEN", "tcp:2525:backlog=1024"))

    def test_smtps_listen_is_always_implicit_tls(self) -> None:
        """SMTPS_LISTEN wraps whatever endpoint it names in TLS, unix: included."""
        for value, endpoint in [
            ("tcp:465:interface=127.0.0.1", "tcp:465:interface=127.0.0.1:backlog=1024"),
            ("unix:/run/smtps.sock", "unix:/run/smtps.sock:backlog=1024"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ]:
            spec = plan("SMTPS_LISTEN", value, implicit_tls=True)
            self.assertEqual(
                (spec.endpoint, spec.implicit_tls, spec.proxy), (endpoint, True, False)
            )

    def test_ssl_value_becomes_tcp_with_its_certificate_files(self) -> None:
        """ssl: keeps port, interface and backlog; its key files become the certificate."""
        spec = plan(
            "SMTP_LISTEN",
            r"ssl:465:interface=\:\:1:backlog=64:privateKey=/etc/k.pem:certKey=/etc/c.pem",
        )
        self.assertEqual(spec.endpoint, r"tcp:465:interface=\:\:1:backlog=64")
        self.assertTrue(spec.implicit_tls)
        self.assertEqual((spec.cert_file, spec.key_file), ("/etc/c.pem", "/etc/k.pem"))

    def test_ssl_with_one_file_and_escaped_path(self) -> None:
        """privateKey= alone names a file holding both (as Twisted reads it); \\: is a colon."""
        spec = plan("SMTP_LISTEN", r"ssl:port=465:privateKey=C\:/tls/both.pem")
        self.assertEqual(spec.endpoint, "tcp:port=465:backlog=1024")
        self.assertEqual((spec.cert_file, spec.key_file), ("C:/tls/both.pem", "C:/tls/both.pem"))

    def test_ssl_without_files_uses_the_relay_certificate(self) -> None:
        """ssl:465 names no files: the relay's own certificate serves it."""
        spec = plan("SMTP_LISTEN", "ssl:465")
        self.assertEqual((spec.endpoint, spec.implicit_tls), ("tcp:465:backlog=1024", True))
        self.assertEqual((spec.cert_file, spec.key_file), ("", ""))

    def test_haproxy_composes_with_implicit_tls(self) -> None:
        """haproxy: in front of ssl: or on SMTPS_LISTEN: PROXY header first, then TLS."""
        for setting, value, implicit in [
            ("SMTP_LISTEN", "haproxy:ssl:465", False),
            ("SMTPS_LISTEN", "haproxy:tcp:465", True),
        ]:
            spec = plan(setting, value, implicit_tls=implicit)
            self.assertEqual(
                (spec.endpoint, spec.proxy, spec.implicit_tls), ("tcp:465:backlog=1024", True, True)
            )

    def test_refused_values(self) -> None:
        """ssl: options that bypass the relay's TLS policy, and haproxy: twice, are refused."""
        for value, words in [
            ("ssl:465:sslmethod=TLSv1_METHOD", "'sslmethod' is not supported"),
            ("ssl:465:extraCertChain=/chain.pem", "'extraCertChain' is not supported"),
            ("ssl:465:dhParameters=/dh.pem", "'dhParameters' is not supported"),
            ("ssl:465:certKey=/c.pem", "certKey= needs privateKey="),
            ("ssl:465:/k.pem", "takes the port, then name=value options"),
            ("haproxy:haproxy:tcp:25", "only once"),
        ]:
            with self.assertRaises(ListenError) as caught:
                plan("SMTP_LISTEN", value)
            self.assertIn(words, str(caught.exception))


class CertificateFilesTests(SynchronousTestCase):
    def test_sources(self) -> None:
        """TLS_CERT_FILE, or one ssl: value's files, or none (generated); never two."""
        with_files = plan("SMTP_LISTEN", "ssl:465:privateKey=/k.pem:certKey=/c.pem")
        plain = plan("SMTPS_LISTEN", "tcp:465", implicit_tls=True)
        self.assertEqual(certificate_files("", "", [plain]), ("", ""))
        self.assertEqual(certificate_files("/t.pem", "/t.key", [plain]), ("/t.pem", "/t.key"))
        self.assertEqual(certificate_files("", "", [with_files, plain]), ("/c.pem", "/k.pem"))
        same = plan("SMTPS_LISTEN", "ssl:465:privateKey=/k.pem:certKey=/c.pem")
        self.assertEqual(certificate_files("", "", [with_files, same]), ("/c.pem", "/k.pem"))
        with self.assertRaises(ListenError):
            certificate_files("/t.pem", "/t.key", [with_files])
        other = plan("SMTPS_LISTEN", "ssl:465:privateKey=/other.pem")
        with self.assertRaises(ListenError):
            certificate_files("", "", [with_files, other])


class SettingTests(SynchronousTestCase):
    def test_smtps_listen_setting(self) -> None:
        """SMTPS_LISTEN is off by default and takes the same forms as SMTP_LISTEN."""
        self.assertEqual(config.load({}, None).smtps_listen, "")
        self.assertEqual(config.load({"SMTPS_LISTEN": ":465"}, None).smtps_listen, "tcp:465")
        loaded = config.load({}, "smtps:\n  listen: '127.0.0.1:465'\n")
        self.assertEqual(loaded.smtps_listen, "tcp:465:interface=127.0.0.1")
